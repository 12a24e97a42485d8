"""`minillm <stage> ...` under accelerate's own FSDP2 engine on a CPU, for tests only (tests/test_sharding.py).

accelerate 1.15 turns FSDP on only on GPUs: on a CPU an FSDP config gives every process plain DDP, and
minillm refuses that launch (`engine.check_engine`). This shim, launched with configs/accelerate/cpu-2proc.yaml,
sets on minillm's accelerator the state accelerate sets on GPUs for `fsdp_version: 2` (distributed type FSDP, an
FSDP2 plugin wrapping each decoder layer), so `acc.prepare` shards the student with accelerate's FSDP2 code and
every later call (clipping, no_sync, checkpoints) takes its FSDP branch. Not a supported setting: a test device.
"""

from __future__ import annotations

import sys

from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from minillm import cli
from minillm.config import TrainConfig
from minillm.train import engine

make_accelerator = engine.make_accelerator


def fsdp_accelerator(cfg: TrainConfig) -> Accelerator:
    acc = make_accelerator(cfg)
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True
    )
    return acc


if __name__ == "__main__":
    engine.make_accelerator = fsdp_accelerator
    cli.main(sys.argv[1:])
