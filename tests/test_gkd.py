"""GKD: the seeded on-policy coin, training on the student's samples, and exact resume after kill -9."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import kill_after_checkpoint, launch, read_metrics, stage_config

from minillm.config import GKDConfig
from minillm.train import engine, gkd
from minillm.train.gkd import on_policy_coin, train_gkd


def gkd_config(model: Path, teacher: Path, out: Path, **kw) -> GKDConfig:
    base = dict(
        teacher=str(teacher),
        max_train_examples=32,
        max_valid_examples=4,
        batch_size=2,
        grad_accum=2,
        max_steps=4,
        lr=1e-3,
        eval_every=0,
        max_new_tokens=6,
        valid_forward_kl=False,
    )
    return stage_config(GKDConfig, model, out, **(base | kw))


def test_coin_is_seeded_with_probability_lmbda():
    cfg = GKDConfig(lmbda=0.3, seed=7)
    flips = [on_policy_coin(cfg, step) for step in range(400)]
    assert flips == [on_policy_coin(GKDConfig(lmbda=0.3, seed=7), step) for step in range(400)]
    assert flips != [on_policy_coin(GKDConfig(lmbda=0.3, seed=8), step) for step in range(400)]
    assert sum(flips) / 400 == pytest.approx(0.3, abs=0.07)  # 3 standard deviations of a 400-draw mean
    # the coin is a float64 uniform from the step's own generator, below lmbda
    u = torch.rand(
        (), generator=engine.generator(7, 5, 0, gkd.COIN_STREAM, device="cpu"), dtype=torch.float64
    )
    assert flips[5] == bool(u < 0.3)
    assert not any(on_policy_coin(GKDConfig(lmbda=0.0), s) for s in range(400))
    assert all(on_policy_coin(GKDConfig(lmbda=1.0), s) for s in range(400))


def test_lmbda_zero_never_samples_and_one_always_does(tiny_llama, teacher, tmp_path, monkeypatch):
    """lmbda 0 trains on the gold responses and never calls the sampler; lmbda 1 samples every step, and its
    steps then hold only the student's short responses (≤ max_new_tokens each)."""
    with monkeypatch.context() as m:
        m.setattr(gkd, "sample_responses", lambda *a, **k: pytest.fail("sampled with lmbda 0"))
        train_gkd(gkd_config(tiny_llama, teacher, tmp_path / "off", lmbda=0.0))
    off = read_metrics(tmp_path / "off")[1:]
    train_gkd(gkd_config(tiny_llama, teacher, tmp_path / "on", lmbda=1.0))
    on = read_metrics(tmp_path / "on")[1:]
    assert [m["on_policy"] for m in off] == [0.0] * 4 and [m["on_policy"] for m in on] == [1.0] * 4
    per_step = 2 * 2
    assert all(m["tokens"] <= per_step * 6 for m in on), [m["tokens"] for m in on]
    assert all(m["tokens"] > per_step * 6 for m in off), [m["tokens"] for m in off]  # gold answers are longer
    assert all(m["time/sample"] > 0 for m in on)


def test_killed_run_resumes_exactly(tiny_llama, teacher, tmp_path):
    """Kill -9 a GKD run after a checkpoint, resume it, and get the uninterrupted run's coins, losses and
    validation values bit for bit (the coin and the samples follow from the step alone)."""

    def cfg(out: Path, resume: bool) -> GKDConfig:
        return gkd_config(
            tiny_llama,
            teacher,
            out,
            lmbda=0.5,
            max_steps=10,
            save_every=2,
            eval_every=5,
            valid_forward_kl=True,
            resume=resume,
        )

    killed_dir = tmp_path / "killed"
    kill_after_checkpoint(launch("gkd", cfg(killed_dir, False)), killed_dir, 4)
    resumed = launch("gkd", cfg(killed_dir, True))
    train_gkd(cfg(tmp_path / "ref", False))  # the uninterrupted run, here (1 thread, as the subprocesses)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
    want, got = read_metrics(tmp_path / "ref"), read_metrics(killed_dir)
    assert [m["step"] for m in got] == list(range(11))
    assert {m.get("on_policy") for m in want[1:]} == {0.0, 1.0}  # both kinds of step are exercised
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "loss/kd", "on_policy", "tokens", "valid/loss", "valid/forward_kl"):
            assert a.get(key) == b.get(key), (key, a, b)


def test_on_policy_update_reuses_what_sampling_computed(tiny_llama, teacher, tmp_path, monkeypatch):
    """With lmbda 1 and a student without dropout, each on-policy micro-batch's update reads the student's
    logits and decoder-layer outputs the sampler computed (`SamplingCache`) instead of recomputing them: the
    run's losses and gradient norms equal those of the same run with the cache off (sampling_cache_mib 0)
    to fp32 rounding (the sampler decodes with a KV cache, the update forwards once)."""
    made = []
    real = gkd.step_cache
    monkeypatch.setattr(gkd, "step_cache", lambda *a: made.append(real(*a)) or made[-1])
    train_gkd(gkd_config(tiny_llama, teacher, tmp_path / "cached", lmbda=1.0, divergence="reverse_kl"))
    assert len(made) == 4 * 2 and all(c.layers is not None for c in made)  # steps x micro-batches
    train_gkd(
        gkd_config(
            tiny_llama, teacher, tmp_path / "plain", lmbda=1.0, divergence="reverse_kl", sampling_cache_mib=0
        )
    )
    assert len(made) == 8  # nothing kept with the cache off
    cached, plain = read_metrics(tmp_path / "cached")[1:], read_metrics(tmp_path / "plain")[1:]
    for key in ("loss", "grad_norm", "tokens"):
        assert [m[key] for m in cached] == pytest.approx([m[key] for m in plain], rel=1e-4), key


def test_on_policy_update_of_a_student_with_dropout_recomputes(tiny_gpt2, teacher, tmp_path, monkeypatch):
    """The sampler runs without dropout and the update with it: nothing sampling computed is reused."""
    monkeypatch.setattr(gkd, "step_cache", lambda *a: pytest.fail("reused sampling with dropout on"))
    train_gkd(gkd_config(tiny_gpt2, teacher, tmp_path / "gpt2", lmbda=1.0, max_steps=1))
