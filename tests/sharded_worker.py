"""Run by tests/test_sharding.py in 2 gloo CPU processes: minillm's sharded-parameter code (`minillm.sharding`)
under FSDP2, checked in each process against an unsharded float64 copy of the same model on the whole batch.

accelerate 1.15 never turns FSDP on for a run on the CPU (docs/distributed.md), so the student is sharded with
the layout accelerate's FSDP2 engine applies (`accelerate.utils.fsdp_utils.fsdp2_prepare_model`: each decoder
layer a unit, the final norm and head (and a tied embedding) one unit kept whole after forward, the root), or
with a root-only layout whose head is resharded after every forward. Exits non-zero on the first mismatch.

usage: sharded_worker.py OUTPUT_DIR MODEL_DIR:LAYOUT ...   (LAYOUT: accelerate | root)
"""

from __future__ import annotations

import copy
import sys
from types import SimpleNamespace

import torch
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from minillm import sharding
from minillm.config import SFTConfig
from minillm.data.tokenize import Example, collate
from minillm.rollout import sample_responses
from minillm.train import engine
from minillm.train.supervised import ce_loss_sum

TOL = 1e-12  # float64 throughout: only the order of the ranks' gradient sums differs


def shard(model: torch.nn.Module, layout: str) -> torch.nn.Module:
    if layout == "accelerate":
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
        fake = SimpleNamespace(
            state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no", is_main_process=False
        )
        return fsdp2_prepare_model(fake, model)
    fully_shard(model, reshard_after_forward=True)
    return model


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def check(what: str, got: torch.Tensor, want: torch.Tensor, tol: float = TOL) -> None:
    err = (full(got) - want).abs()
    if float(err.max()) > tol:
        first = [int(i) for i in (err > tol).nonzero()[0]]
        raise AssertionError(f"{what}: max |diff| {float(err.max()):.3g} > {tol}, first at {first}")


def run(acc: Accelerator, model_dir: str, out: str, layout: str) -> None:
    rank, world = acc.process_index, acc.num_processes
    tok = AutoTokenizer.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    model = shard(copy.deepcopy(ref), layout)
    pad, eos = tok.pad_token_id, tok.eos_token_id
    g = torch.Generator().manual_seed(0)
    V = len(tok)
    # 4 examples of ragged lengths; rank r takes every 2nd, as engine.rank_micro_batches does
    examples = [
        Example(
            torch.randint(1, V, (3 + k,), generator=g).tolist(),
            torch.randint(1, V, (5 - k,), generator=g).tolist() + [eos],
        )
        for k in range(4)
    ]
    cfg = SFTConfig(model=model_dir, output_dir=out, lr=1e-2, warmup_steps=0, max_grad_norm=1.0, chunk_size=3)

    # 1. the chunked closed-form head loss and its gradients: each rank's half with the engine's loss scale,
    # FSDP's reduce-scatter averaging, equal the whole batch's in one unsharded model
    def losses(step: int) -> None:
        batch, mine = collate(examples, pad), collate(examples[rank::world], pad)
        n = engine.global_count(acc, int(mine["target_mask"].sum()))
        want = ce_loss_sum(ref, batch, cfg.chunk_size) / n
        want.backward()
        got = ce_loss_sum(model, mine, cfg.chunk_size) * engine.loss_scale(acc, n)
        got.backward()
        mean = engine.global_count(acc, float(got.detach())) / world
        check(f"step {step} loss", torch.tensor(mean, dtype=torch.float64), want.detach())
        grads = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            check(f"step {step} gradient of {name}", p.grad, grads[name].grad)

    opt = acc.prepare(engine.make_optimizer(model, cfg))
    sched = engine.make_scheduler(opt, cfg, 10)
    ref_opt = engine.make_optimizer(ref, cfg)
    ref_sched = engine.make_scheduler(ref_opt, cfg, 10)

    def step(k: int) -> None:
        losses(k)
        norm = engine.clip_and_step(acc, model, opt, sched, cfg)
        ref_norm = engine.clip_and_step(acc, ref, ref_opt, ref_sched, cfg)
        check(
            f"step {k} gradient norm",
            torch.tensor([norm], dtype=torch.float64),
            torch.tensor([ref_norm], dtype=torch.float64),
        )
        weights = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            check(f"step {k} weight {name}", p.detach(), weights[name].detach())

    step(0)

    # 2. sampling inside `gathered`: each rank decodes its own number of steps (no collective inside) and
    # draws what the unsharded model draws; training goes on afterwards
    prompts = [examples[rank].prompt_ids, examples[rank + 2].prompt_ids]
    settings = dict(eos_id=eos, pad_id=pad, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=3 + 4 * rank)
    with sharding.gathered(model):
        got, _ = sample_responses(model, prompts, generator=torch.Generator().manual_seed(rank), **settings)
        with sharding.gathered(model):  # nested: a no-op
            pass
        assert not isinstance(model.lm_head.weight, DTensor), "the head is not whole inside gathered"
    want, _ = sample_responses(ref, prompts, generator=torch.Generator().manual_seed(rank), **settings)
    assert got == want, f"rank {rank}: sampled {got}, unsharded {want}"
    step(1)

    # 3. checkpoint round trip: the saved files are the full model (read back as a plain model), and a fresh
    # sharded model and optimizer restored from them train on exactly as the saved ones
    state = engine.TrainerState(step=2)
    path = engine.save_checkpoint(acc, cfg, model, tok, opt, sched, state)
    saved = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    for name, p in saved.named_parameters():
        check(f"saved {name}", p.detach(), dict(ref.named_parameters())[name].detach())
    fresh = shard(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64), layout)
    fresh_opt = acc.prepare(engine.make_optimizer(fresh, cfg))
    fresh_sched = engine.make_scheduler(fresh_opt, cfg, 10)
    assert engine.load_checkpoint(path, acc, fresh, fresh_opt, fresh_sched).step == 2
    model, opt, sched = fresh, fresh_opt, fresh_sched
    step(2)


if __name__ == "__main__":
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, accelerator.num_processes
    for k, spec in enumerate(sys.argv[2:]):
        model_dir, layout = spec.rsplit(":", 1)
        run(accelerator, model_dir, f"{sys.argv[1]}/{k}", layout)
        accelerator.print(f"{layout}: ok")
    engine.end_process_group()  # not `end_training`: the models go first, as in `minillm/cli.py`
