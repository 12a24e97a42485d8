"""Devices and precision: every sampling generator lives on its model's device; a teacher placed apart from
the student (`teacher_device`) gives the same numbers as one beside it, and a bf16 one (`teacher_dtype`)
numbers within bf16 rounding; small-lr updates land under bf16 autocast (fp32 master weights).

A CPU cannot show the CUDA failure itself (torch refuses `torch.rand(..., generator=cpu_generator,
device="cuda")`), so the first test records the device each generator was made for and checks it against
the device of the model the sampler draws for; a generator made without saying its device fails it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import read_metrics, save_tiny_model, stage_config
from safetensors.torch import load_file
from test_gkd import gkd_config
from test_kd import kd_config
from test_minillm import minillm_config
from test_seqkd import seqkd_config
from tolerances import assert_close_verbose

from minillm import models, rollout
from minillm.config import ConfigError, MiniLLMConfig, SFTConfig
from minillm.data.instructions import load_records
from minillm.rollout import sample_rollout
from minillm.train import engine, kd, setup
from minillm.train import minillm as minillm_train
from minillm.train.gkd import train_gkd
from minillm.train.kd import train_kd
from minillm.train.minillm import train_minillm
from minillm.train.seqkd import train_seqkd
from minillm.train.sft import train_sft


def distill_config(student: Path, teacher: Path, out: Path, **kw: Any) -> MiniLLMConfig:
    """Two optimizer steps, one per collection, on Dolly prompts."""
    base = dict(max_train_examples=16, max_valid_examples=4, num_rollouts=4, batch_size=2, ppo_epochs=1)
    return minillm_config(
        student, teacher, "dolly_valid", out, **(base | dict(max_steps=2, eval_every=2) | kw)
    )


STAGES = {
    "distill": (train_minillm, lambda s, t, tmp: distill_config(s, t, tmp / "run")),
    "seqkd": (train_seqkd, lambda s, t, tmp: seqkd_config(s, t, tmp, "run", max_steps=1)),
    "gkd": (train_gkd, lambda s, t, tmp: gkd_config(s, t, tmp / "run", lmbda=1.0, max_steps=1)),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_sampling_generator_is_made_on_the_model_device(
    stage, tiny_llama, teacher, tmp_path, monkeypatch
):
    """Pins the crash of `minillm distill` at step 0 on CUDA: validation and collection built their
    generators with engine.generator's old default device "cpu" while the student sat on the GPU."""
    made: dict[int, tuple[torch.Generator, str | torch.device | None]] = {}
    real_generator = engine.generator

    def generator(seed: int, *keys: int, **kw: Any) -> torch.Generator:
        g = real_generator(seed, *keys, device=kw.get("device", "cpu"))
        made[id(g)] = (g, kw.get("device"))  # the generator is kept alive, so its id stays its own
        return g

    calls: list[tuple[str | torch.device | None, torch.device]] = []

    def sampler(student: torch.nn.Module, *args: Any, generator: Any, **kw: Any) -> Any:
        for g in [generator] if isinstance(generator, torch.Generator) else generator:  # one, or one per row
            # engine.generator's device as asked; evaluation's (generate.sample) is made on the model's device
            asked = made[id(g)][1] if id(g) in made else g.device
            calls.append((asked, student.get_output_embeddings().weight.device))
        return sample_rollout(student, *args, generator=generator, **kw)

    monkeypatch.setattr(engine, "generator", generator)
    monkeypatch.setattr(minillm_train, "sample_rollout", sampler)
    monkeypatch.setattr(rollout, "sample_rollout", sampler)  # SeqKD's and GKD's, via sample_responses
    train, make_config = STAGES[stage]
    train(make_config(tiny_llama, teacher, tmp_path))
    assert calls, "the stage never sampled"
    for asked, model_device in calls:
        assert asked is not None and torch.device(asked) == model_device, (asked, model_device)


# ------------------------------------------------------------------------------------------------------
# teacher placement


def placed_apart(monkeypatch: pytest.MonkeyPatch, module: Any) -> None:
    """Make `module`'s load_teacher place the teacher's decoder and head apart (both on the CPU here: the
    hooks, the untied head and every caller's device handling run, only no bytes move)."""
    real = setup.load_teacher

    def load_teacher(*args: Any) -> torch.nn.Module:
        teacher = real(*args)
        return models.place_apart(teacher, torch.device("cpu"), torch.device("cpu"))

    monkeypatch.setattr(module, "load_teacher", load_teacher)


def test_place_apart_keeps_logits_and_unties_the_head(tokenizer, tmp_path):
    path = save_tiny_model(tmp_path / "t", "llama", tokenizer, layers=2, hidden=32, seed=4)
    plain = models.load_model(str(path)).eval()
    apart = models.place_apart(models.load_model(str(path)).eval(), torch.device("cpu"), torch.device("cpu"))
    ids = torch.randint(1, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(apart(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(
            models.final_hidden(apart, ids, attn), models.final_hidden(plain, ids, attn), rtol=0, atol=0
        )
    assert not any(p.requires_grad for p in apart.parameters())


def teacher_stage(stage: str, student: Path, teacher: Path, out: Path, **kw: Any) -> tuple[Any, Any, Any]:
    """(train function, its module, config) of a short KD run or a MiniLLM run whose PT loss has the
    teacher's half, on a small PT file (the shipped corpus takes seconds to tokenise)."""
    if stage == "kd":
        return (
            train_kd,
            kd,
            kd_config(student, teacher, out, max_train_examples=16, max_steps=2, eval_every=0, **kw),
        )
    pt = out.parent / "pt.jsonl"
    pt.write_text(
        "".join(json.dumps({"text": r["output"]}) + "\n" for r in load_records("dolly_valid", limit=20))
    )
    cfg = distill_config(student, teacher, out, pt_loss="ce+kd", pt_data=str(pt), pt_block_length=32, **kw)
    return train_minillm, minillm_train, cfg


@pytest.mark.parametrize("stage", ["kd", "distill"])
def test_teacher_placed_apart_gives_the_same_run(stage, tiny_llama, teacher, tmp_path, monkeypatch):
    """A KD run and a MiniLLM run (teacher-mixed sampling on the fast path, teacher pass, PT loss with the
    teacher's half) give the same metrics with the teacher's decoder behind the device hooks."""
    train, module, cfg = teacher_stage(stage, tiny_llama, teacher, tmp_path / "a")
    train(cfg)
    with monkeypatch.context() as m:
        placed_apart(m, module)
        train(dataclasses.replace(cfg, output_dir=str(tmp_path / "b")))
    want, got = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    keys = [k for k in want[-1] if k.startswith(("loss", "valid/", "reward"))]
    assert keys
    for a, b in zip(got, want, strict=True):
        shared = [k for k in keys if k in b]
        assert [k for k in keys if k in a] == shared
        assert {k: a[k] for k in shared} == pytest.approx({k: b[k] for k in shared}, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("stage", ["kd", "distill"])
def test_bf16_teacher_beside_fp32_student_tracks_fp32_teacher(stage, tiny_llama, teacher, tmp_path):
    """teacher_dtype bfloat16 with an fp32 student: the first step's losses, rewards and the step-0
    validation divergences equal the fp32 teacher's within bf16 input rounding (tolerances.py; log-probs
    are taken in fp32 from the bf16 logits). MiniLLM at α = 0, so both runs sample the same responses."""
    kw = {} if stage == "kd" else {"teacher_mix_alpha": 0.0}
    results = {}
    for dtype in ("float32", "bfloat16"):
        train, _, cfg = teacher_stage(stage, tiny_llama, teacher, tmp_path / dtype, teacher_dtype=dtype, **kw)
        train(cfg)
        results[dtype] = read_metrics(tmp_path / dtype)
    # step 0: validation (same student weights); step 1: the losses before the first update
    keys = [(0, k) for k in results["float32"][0] if k.startswith("valid/") and k != "valid/rougeL"]
    keys += [(1, k) for k in ("loss/kd", "loss/single", "loss/pt", "reward") if k in results["float32"][1]]
    assert len(keys) >= 2, keys
    want = torch.tensor([results["float32"][i][k] for i, k in keys], dtype=torch.float64)
    got = torch.tensor([results["bfloat16"][i][k] for i, k in keys], dtype=torch.float64)
    assert not torch.equal(got, want), "the teacher did not run in bf16"
    assert_close_verbose(got, want, torch.bfloat16)


# ------------------------------------------------------------------------------------------------------
# precision: fp32 master weights under bf16 autocast


@pytest.fixture
def fresh_accelerator():
    """accelerate keeps one process-wide state whose mixed precision cannot change: start and leave clean."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("stage", ["sft", "distill"])
def test_small_lr_update_survives_bf16_autocast(
    stage, tiny_llama, teacher, tmp_path, monkeypatch, fresh_accelerator
):
    """One AdamW step at lr 5e-6 under bf16 autocast (accelerate mixed_precision bf16, as on a GPU) moves
    each weight of the decoder's matrices by lr: Adam's first step is lr·g/(|g| + eps). With `auto` dtypes
    resolved as on a GPU (bf16), the student still trains fp32 weights; bf16 weights would keep most of
    these updates from landing (the last assertion shows it on the same update)."""
    real = models.torch_dtype
    monkeypatch.setattr(
        models,
        "torch_dtype",
        lambda name, device="cpu": torch.bfloat16 if name == "auto" else real(name, device),
    )
    lr = 5e-6
    common = dict(mixed_precision="bf16", lr=lr, warmup_steps=0, weight_decay=0.0, max_steps=1, eval_every=1)
    if stage == "sft":
        train_sft(
            stage_config(
                SFTConfig,
                tiny_llama,
                tmp_path / "run",
                max_train_examples=8,
                max_valid_examples=4,
                batch_size=4,
                **common,
            )
        )
    else:
        train_minillm(distill_config(tiny_llama, teacher, tmp_path / "run", **common))
    before, after = (
        load_file(tiny_llama / "model.safetensors"),
        load_file(tmp_path / "run" / "best" / "model.safetensors"),
    )
    names = [n for n in before if ".layers." in n and before[n].ndim == 2]
    assert names
    delta = torch.cat([(after[n].float() - before[n]).flatten() for n in names])
    moved = delta != 0
    assert float(moved.float().mean()) > 0.9
    assert float(delta[moved].abs().median()) == pytest.approx(lr, rel=0.05)
    assert all(after[n].dtype == torch.float32 for n in names)
    w = torch.cat([before[n].flatten() for n in names]).bfloat16()
    kept = (w.float() + delta).bfloat16() == w  # the same update rounded into bf16 weights
    assert float(kept.float().mean()) > 0.9


def test_bf16_student_weights_are_refused():
    with pytest.raises(ConfigError, match="dtype bfloat16"):
        SFTConfig(dtype="bfloat16")
