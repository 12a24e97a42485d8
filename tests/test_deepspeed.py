"""DeepSpeed ZeRO-2 and ZeRO-3 (minillm/zero.py) in 2 gloo CPU processes, launched as a user launches them:
`accelerate launch --config_file configs/accelerate/deepspeed-zero{2,3}.yaml --num_processes 2 -m minillm.cli`.

Each run is compared with one plain process with the same global batch, as tests/test_distributed.py compares
DDP (per-step loss and gradient norm, then every weight, tolerances.DISTRIBUTED): SFT with a tied head (ZeRO-3
gathers the embedding the chunked loss reads as the head), 2 micro-batches, a cosine schedule and a clipping
norm below the gradient norms (DeepSpeed clips, at max_grad_norm); MiniLLM with teacher mixing, ragged
responses, 2 inner epochs and the PT loss (two backwards per micro-batch). The checkpoints hold the files a
one-process run writes (the full model and AdamW state, gathered), and a run resumed from the mid-collection
checkpoint at step 3 ends where the uninterrupted one does. `make test` installs deepspeed (an optional extra:
DS_BUILD_OPS=0 pip install --no-build-isolation -e '.[deepspeed]'); without it the 2-process tests skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import kill_tree, read_metrics
from test_distributed import (
    assert_same_run,
    eos_pair,  # noqa: F401 (a fixture)
    final_weights,
    finish,
    free_port,
    minillm_config,
    ragged_prompts,
    supervised_configs,
)
from test_sharding import save
from tolerances import DISTRIBUTED

from minillm import config as config_lib
from minillm import zero
from minillm.config import SFTConfig
from minillm.errors import InputError
from minillm.train.minillm import train_minillm
from minillm.train.sft import train_sft

ROOT = Path(__file__).resolve().parents[1]
STAGES = (2, 3)
MAX_GRAD_NORM = 0.05  # below every step's gradient norm in these runs: each step is clipped


# a mark, not importorskip in the test: skipped before the fixtures build their models
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (the optional extra `deepspeed`, which `make test` installs)",
)


def launch_zero(stage: int, command: str, cfg: Any) -> subprocess.Popen:
    """`accelerate launch` with the shipped ZeRO-`stage` config on 2 CPU processes."""
    accelerate = Path(sys.executable).with_name("accelerate")
    config = ROOT / "configs" / "accelerate" / f"deepspeed-zero{stage}.yaml"
    cmd = [str(accelerate), "launch", "--config_file", str(config), "--num_processes", "2"]
    cmd += ["--main_process_port", str(free_port()), "-m", "minillm.cli", command, *config_lib.to_argv(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONFAULTHANDLER": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def assert_same_optimizer(two: Path, one: Path, step: int) -> None:
    """The AdamW state gathered from the partitions equals the one-process run's, in torch's layout."""
    a, b = (torch.load(p / f"ckpt-{step}" / "optimizer.pt", weights_only=True) for p in (two, one))
    assert a["state"].keys() == b["state"].keys() and len(a["state"]) > 0
    for i, state in b["state"].items():
        assert float(a["state"][i]["step"]) == float(state["step"]) == step
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                a["state"][i][key], state[key], rtol=DISTRIBUTED["weight_rtol"], atol=1e-6, msg=f"{i} {key}"
            )
    assert a["param_groups"][0]["lr"] == pytest.approx(b["param_groups"][0]["lr"])


@pytest.fixture(scope="module")
def tied_llama(tokenizer, tmp_path_factory) -> Path:
    return save(tmp_path_factory.mktemp("tied"), tokenizer, tied=True)


@needs_deepspeed
def test_sft_under_zero_equals_one_process(tied_llama, tmp_path):
    kw = dict(lr_schedule="cosine", max_grad_norm=MAX_GRAD_NORM)
    configs = {s: supervised_configs(SFTConfig, tied_llama, tmp_path / f"zero{s}", **kw) for s in STAGES}
    runs = {s: launch_zero(s, "sft", two) for s, (two, _) in configs.items()}
    try:
        one = configs[2][1]
        train_sft(one)
    except BaseException:
        for run in runs.values():
            kill_tree(run)
        raise
    norms = [m["grad_norm"] for m in read_metrics(Path(one.output_dir))[1:]]
    assert min(norms) > MAX_GRAD_NORM, norms  # every step clipped: DeepSpeed must clip at max_grad_norm
    for s, (two, _) in configs.items():
        finish(runs[s])
        assert_same_run(Path(two.output_dir), Path(one.output_dir), 3)
        assert_same_optimizer(Path(two.output_dir), Path(one.output_dir), 3)


@needs_deepspeed
@pytest.mark.parametrize("stage", STAGES)
def test_minillm_under_zero_equals_one_process_and_resumes(stage, eos_pair, tmp_path):  # noqa: F811
    student, teacher = eos_pair
    data = ragged_prompts(tmp_path / "prompts.jsonl")
    two = replace(minillm_config(student, teacher, data, tmp_path / "two"), lr_schedule="cosine", keep_last=2)
    run = launch_zero(stage, "distill", two)
    try:
        train_minillm(replace(two, output_dir=str(tmp_path / "one"), batch_size=4))
    except BaseException:
        kill_tree(run)
        raise
    finish(run)
    assert_same_run(tmp_path / "two", tmp_path / "one", 4)
    assert_same_optimizer(tmp_path / "two", tmp_path / "one", 4)
    # resume from step 3 (mid-collection: the checkpoint holds each rank's rollouts) of a copy of the run
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed, ignore=shutil.ignore_patterns("ckpt-4", "best", "runs"))
    (resumed / "latest.json").write_text(json.dumps({"checkpoint": "ckpt-3", "step": 3}))
    finish(launch_zero(stage, "distill", replace(two, output_dir=str(resumed), resume=True)))
    a, b = final_weights(resumed, 4), final_weights(tmp_path / "two", 4)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0.0, atol=1e-7, msg=name)


def plugin(**config: Any) -> SimpleNamespace:
    """accelerate's DeepSpeed plugin as `zero.configure` reads it."""
    base = {"zero_optimization": {"stage": 2}, "gradient_clipping": "auto"}
    return SimpleNamespace(deepspeed_config=base | config, zero3_init_flag=False)


def test_zero_config_is_filled_from_minillm_and_refused_where_untested():
    p = plugin(gradient_accumulation_steps="auto")
    zero.configure(p, batch_size=2, grad_accum=4, max_grad_norm=0.5, lora=False)
    c = p.deepspeed_config
    assert (
        c["train_micro_batch_size_per_gpu"],
        c["gradient_accumulation_steps"],
        c["gradient_clipping"],
    ) == (
        2,
        4,
        0.5,
    )
    refused = [
        (plugin(gradient_clipping=1.0), {}, "gradient_clipping: 1.0, but minillm's max_grad_norm is 0.5"),
        (
            plugin(gradient_accumulation_steps=2),
            {},
            "gradient_accumulation_steps: 2, but minillm's grad_accum",
        ),
        (plugin(zero_optimization={"stage": 1}), {}, "ZeRO stage 1 is not supported"),
        (plugin(zero_optimization={"stage": 3, "offload_param": {"device": "cpu"}}), {}, "offload_param"),
        (plugin(bf16={"enabled": True}), {}, "bf16 mode is not supported"),
        (plugin(), {"lora": True}, "LoRA students under DeepSpeed"),
    ]
    for p, kw, message in refused:
        with pytest.raises(InputError, match=message):
            zero.configure(
                p, **({"batch_size": 2, "grad_accum": 4, "max_grad_norm": 0.5, "lora": False} | kw)
            )
    p = plugin()
    p.zero3_init_flag = True
    with pytest.raises(InputError, match="zero3_init_flag"):
        zero.configure(p, batch_size=2, grad_accum=4, max_grad_norm=0.5, lora=False)
