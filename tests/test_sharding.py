"""Sharded students (`minillm.sharding`) under FSDP2, in 2 gloo CPU processes: minillm's code under torch's own
`fully_shard`, then SFT and MiniLLM under accelerate's FSDP2 code forced on the CPU (tests/fsdp_cpu.py).

accelerate 1.15 runs FSDP only on GPUs (on a CPU an FSDP config gives plain DDP, docs/distributed.md), so
tests/sharded_worker.py shards a float64 tiny Llama itself, in the layout accelerate's FSDP2 engine applies
(tied embedding and head in one unit kept whole after forward) and in a root-only one whose head is resharded
after every forward, and checks against an unsharded copy on the whole batch: the chunked closed-form head
loss and every gradient (1e-12), three AdamW steps with clipping, sampling of a different length on each rank
inside `sharding.gathered`, a checkpoint that is the full model, and a resume from it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import kill_tree, model_config
from test_distributed import (
    ACCELERATE_CONFIG,
    assert_same_run,
    eos_pair,  # noqa: F401 (a fixture)
    final_weights,
    finish,
    free_port,
    launch_two,
    minillm_config,
    ragged_prompts,
    supervised_configs,
)
from transformers import AutoModelForCausalLM

from minillm.config import SFTConfig
from minillm.errors import InputError
from minillm.train import engine
from minillm.train.minillm import train_minillm
from minillm.train.sft import train_sft

ROOT = Path(__file__).resolve().parents[1]
HANG_S = 150  # the run takes ~30 s on 2 busy cores; a rank waiting in a collective never ends


def save(path: Path, tokenizer, tied: bool) -> Path:
    torch.manual_seed(0)
    config = model_config("llama", len(tokenizer), eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)
    config.tie_word_embeddings = tied
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_sharded_student_equals_one_process(tmp_path, tokenizer):
    tied = save(tmp_path / "tied", tokenizer, tied=True)
    untied = save(tmp_path / "untied", tokenizer, tied=False)
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(ACCELERATE_CONFIG), "--main_process_port"]
    cmd += [str(free_port()), str(ROOT / "tests" / "sharded_worker.py"), str(tmp_path / "out")]
    cmd += [f"{tied}:accelerate", f"{untied}:root"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    run = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = run.communicate(timeout=HANG_S)
    except subprocess.TimeoutExpired:  # a collective on one rank only: the others wait forever
        kill_tree(run)
        raise
    assert run.returncode == 0, out[-1000:] + err[-4000:]
    assert "accelerate: ok" in out and "root: ok" in out, out


@pytest.mark.parametrize(
    "env, message",
    [
        ({"ACCELERATE_USE_FSDP": "true"}, "FSDP1 is not supported"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "FSDP needs GPUs"),
    ],
)
def test_unsupported_engines_are_refused(env, message):
    with pytest.raises(InputError, match=message):
        engine.check_engine(env, accelerator=False)
    engine.check_engine({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, accelerator=True)


def test_accelerate_fsdp_engine_equals_one_process(tiny_llama, eos_pair, tmp_path):  # noqa: F811
    """SFT and MiniLLM (teacher mixing, ragged responses, 2 inner epochs, the PT loss, a mid-run checkpoint)
    in 2 processes under accelerate's own FSDP2 code, forced on the CPU (tests/fsdp_cpu.py), equal one
    process with the same global batch, as DDP does (tests/test_distributed.py, its tolerances)."""
    student, teacher = eos_pair
    sft_two, sft_one = supervised_configs(SFTConfig, tiny_llama, tmp_path / "sft")
    data = ragged_prompts(tmp_path / "prompts.jsonl")
    distill_two = minillm_config(student, teacher, data, tmp_path / "distill" / "two")
    entry = [str(ROOT / "tests" / "fsdp_cpu.py")]
    runs = [launch_two("sft", sft_two, entry), launch_two("distill", distill_two, entry)]
    try:
        train_sft(sft_one)
        train_minillm(replace(distill_two, output_dir=str(tmp_path / "distill" / "one"), batch_size=4))
    except BaseException:
        for run in runs:
            kill_tree(run)
        raise
    finish(runs[0])
    finish(runs[1])
    assert_same_run(Path(sft_two.output_dir), Path(sft_one.output_dir), 3)
    assert_same_run(tmp_path / "distill" / "two", tmp_path / "distill" / "one", 4)


def test_lora_under_accelerate_fsdp_resumes_and_equals_one_process(tiny_llama, tmp_path):
    """A LoRA student under accelerate's FSDP2 code (tests/fsdp_cpu.py) in 2 processes, stopped after its
    step-2 checkpoint and resumed for step 3, equals one uninterrupted process with the same global batch:
    the adapters written (full, by every rank gathering), reloaded into the sharded model with their
    optimizer state, and trained on, within test_distributed.py's tolerances."""
    lora = dict(lora_r=4, lora_alpha=16, lora_target_modules=["q_proj", "v_proj", "down_proj"])
    two, one = supervised_configs(SFTConfig, tiny_llama, tmp_path, **lora)
    entry = [str(ROOT / "tests" / "fsdp_cpu.py")]
    first = launch_two("sft", replace(two, max_steps=2), entry)
    try:
        train_sft(one)
    except BaseException:
        kill_tree(first)
        raise
    finish(first)
    finish(launch_two("sft", replace(two, resume=True), entry))
    assert_same_run(Path(two.output_dir), Path(one.output_dir), 3)  # the resumed log keeps steps 1-2
    assert any("lora_B" in k for k in final_weights(Path(two.output_dir), 3))
    assert not (Path(two.output_dir) / "ckpt-3" / "model.safetensors").exists()  # adapters only
