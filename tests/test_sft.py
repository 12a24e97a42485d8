"""SFT on the engine: learning, the loss's masking, and exact resume after a killed run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import kill_after_checkpoint, launch, read_metrics, stage_config
from tolerances import assert_close_verbose

from minillm import models
from minillm.config import SFTConfig
from minillm.data.tokenize import Example, collate
from minillm.train import engine
from minillm.train.sft import ce_loss_sum, train_sft


def sft_config(model: Path, out: Path, **kw) -> SFTConfig:
    base = dict(
        max_train_examples=64,
        max_valid_examples=16,
        batch_size=4,
        grad_accum=2,
        max_steps=12,
        lr=3e-3,
        warmup_steps=2,
        eval_every=6,
    )
    return stage_config(SFTConfig, model, out, **(base | kw))


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_sft_lowers_validation_loss_and_keeps_best(family, request, tmp_path):
    out = tmp_path / "run"
    best = train_sft(sft_config(request.getfixturevalue(family), out))
    lines = read_metrics(out)
    valid = [m["valid/loss"] for m in lines if "valid/loss" in m]
    assert [m["step"] for m in lines if "valid/loss" in m] == [0, 6, 12]
    assert valid[-1] < valid[0] - 0.5, valid  # random init is ~ln(384) = 5.95 nats per token
    reloaded = models.load_model(str(best))  # best/ is a plain Hugging Face folder
    assert reloaded.config.model_type in ("llama", "gpt2")
    saved = json.loads((best / "trainer_state.json").read_text())
    assert saved["best_value"] == pytest.approx(min(valid[1:]))


def test_ce_loss_counts_response_tokens_only(tiny_llama, tokenizer):
    """The summed loss equals a hand-built CE over exactly the response tokens, EOS (= pad) included."""
    model = models.load_model(str(tiny_llama)).eval()
    eos = tokenizer.eos_token_id
    ex = [Example([5, 6, 7], [8, 9, eos]), Example([5, 6], [10, eos])]
    batch = collate(ex, pad_id=eos)
    with torch.no_grad():
        got = ce_loss_sum(model, batch, chunk_size=3)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logp = logits.log_softmax(-1)
    # targets: row 0 predicts 8, 9, eos from positions 2, 3, 4; row 1 predicts 10, eos from positions 1, 2
    want = -(logp[0, 2, 8] + logp[0, 3, 9] + logp[0, 4, eos] + logp[1, 1, 10] + logp[1, 2, eos])
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_killed_run_resumes_exactly(tiny_llama, tmp_path):
    """Kill -9 a run after a checkpoint, resume it, and get the uninterrupted run's losses bit for bit."""

    def cfg(out: Path, resume: bool) -> SFTConfig:
        return sft_config(tiny_llama, out, save_every=2, eval_every=5, max_steps=10, resume=resume)

    ref = launch("sft", cfg(tmp_path / "ref", False))
    killed_dir = tmp_path / "killed"
    kill_after_checkpoint(launch("sft", cfg(killed_dir, False)), killed_dir, 4)
    resumed = launch("sft", cfg(killed_dir, True))
    for p in (ref, resumed):
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    want, got = read_metrics(tmp_path / "ref"), read_metrics(killed_dir)
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want, strict=True):
        assert a.get("loss") == b.get("loss") and a.get("valid/loss") == b.get("valid/loss"), (a, b)
    # each attempt is on record with the thread count it ran on, which bitwise reproduction depends on
    final = killed_dir / json.loads((killed_dir / "latest.json").read_text())["checkpoint"]
    attempts = json.loads((final / "trainer_state.json").read_text())["attempts"]
    assert len(attempts) == 2 and attempts[0]["from_step"] == 0
    assert attempts[1]["from_step"] >= 4 and attempts[1]["from_step"] % 2 == 0
    assert all(a["threads"] == 1 and a["processes"] == 1 and a["dtype"] == "float32" for a in attempts)


def test_make_optimizer_is_fused_adamw_matching_float64_steps():
    """Every stage's optimizer (`engine.make_optimizer`) is torch's fused AdamW on CPU: one kernel per
    parameter, no foreach copies of every parameter at step time (the step's memory peak). Two steps
    equal AdamW written out in float64 (Loshchilov & Hutter, decoupled weight decay, bias correction)."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(5, 3)
    cfg = SFTConfig(lr=1e-2, adam_beta1=0.8, adam_beta2=0.9, weight_decay=0.1, warmup_steps=0)
    optimizer = engine.make_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True
    params = [p.detach().double().clone() for p in model.parameters()]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    b1, b2, eps = cfg.adam_beta1, cfg.adam_beta2, 1e-8
    for step in (1, 2):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
        for p, grad in zip(model.parameters(), grads, strict=True):
            p.grad = grad.float()
        optimizer.step()
        for i, grad in enumerate(grads):
            m[i] = b1 * m[i] + (1 - b1) * grad
            v[i] = b2 * v[i] + (1 - b2) * grad**2
            update = (m[i] / (1 - b1**step)) / ((v[i] / (1 - b2**step)).sqrt() + eps)
            params[i] = params[i] * (1 - cfg.lr * cfg.weight_decay) - cfg.lr * update
        for p, ref in zip(model.parameters(), params, strict=True):
            assert_close_verbose(p.detach(), ref, torch.float32)
