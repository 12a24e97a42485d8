"""Training-time validation decodes exactly as `minillm eval` does: MiniLLM's and SFT's validation Rouge-L go
through `protocol.answer` with EvalConfig's decoding; MiniLLM's reverse-KL estimate stays on pure samples."""

from __future__ import annotations

import json

import pytest
from accelerate import Accelerator
from conftest import read_metrics, stage_config

from minillm import models
from minillm.config import ConfigError, EvalConfig, MiniLLMConfig, SFTConfig
from minillm.data.tokenize import encode_prompt
from minillm.evaluate import generate, protocol
from minillm.evaluate.metrics import rouge_l
from minillm.train import minillm as minillm_stage
from minillm.train.sft import train_sft

RECORDS = [
    {"id": str(i), "instruction": f"Name thing number {i}.", "input": "", "output": f"thing {i} is a cat"}
    for i in range(5)
]


def record_calls(monkeypatch, module, name: str) -> list[dict]:
    """Wrap module.name so that every call's keyword arguments are kept (the call still runs)."""
    calls, real = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


DECODING = ("temperature", "top_p", "top_k", "no_repeat_ngram_size", "max_new_tokens")


def test_validation_rouge_l_decodes_as_eval(tiny_llama, tmp_path, monkeypatch):
    """Same function, same settings: the decoding keywords `validation_rouge_l` hands the sampler are those
    `minillm eval` hands it at its defaults; the scores are the protocol's Rouge-L of those answers."""
    model, tok = models.load_model(str(tiny_llama)), models.load_tokenizer(str(tiny_llama))
    calls = record_calls(monkeypatch, generate, "sample")
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    cfg = EvalConfig(model="m", sets=[str(data)], seeds=[1], max_new_tokens=7, batch_size=2, lm_loss=False)
    protocol.evaluate_model(model, tok, cfg, tmp_path / "out", progress=False)
    eval_calls, calls[:] = list(calls), []
    prompts = [encode_prompt(r, tok, "alpaca") for r in RECORDS]
    refs = [r["output"] for r in RECORDS]
    kw = dict(seed=3, rank=0, batch_size=2, max_new_tokens=7)
    scores = protocol.validation_rouge_l(model, tok, prompts, refs, **kw)
    assert len(calls) == 3 and len(scores) == 5
    assert all(c["no_repeat_ngram_size"] == 6 for c in calls)  # the official evaluation's ban
    assert {tuple(c[k] for k in DECODING) for c in calls} == {
        tuple(c[k] for k in DECODING) for c in eval_calls
    }
    seeds = [generate.stable_seed(3, "valid", 0, i) for i in range(2)]
    answers = protocol.answer(model, tok, prompts[:2], seeds, EvalConfig(max_new_tokens=7))
    assert scores[:2] == [rouge_l(text, [ref]) for (text, _, _), ref in zip(answers, refs[:2], strict=True)]
    assert protocol.validation_rouge_l(model, tok, prompts, refs, **kw) == scores  # same answers every time


def test_minillm_validate_rouge_l_as_eval_reverse_kl_on_pure_samples(tiny_llama, teacher, monkeypatch):
    student = models.load_model(str(tiny_llama))
    teacher_model = models.load_model(str(teacher))
    tok = models.load_tokenizer(str(tiny_llama))
    cfg = MiniLLMConfig(model=str(tiny_llama), teacher=str(teacher), batch_size=2, valid_max_new_tokens=6)
    sampled = record_calls(monkeypatch, generate, "sample")
    rollouts = record_calls(monkeypatch, minillm_stage, "sample_rollout")
    prompts = [encode_prompt(r, tok, "alpaca") for r in RECORDS[:3]]
    out = minillm_stage.validate(
        student, teacher_model, prompts, RECORDS[:3], tok, cfg, Accelerator(cpu=True)
    )
    assert set(out) >= {"valid/rougeL", "valid/reverse_kl"}
    assert len(sampled) == 2 and all(c["no_repeat_ngram_size"] == 6 for c in sampled)
    assert [c["max_new_tokens"] for c in sampled] == [6, 6]
    assert len(rollouts) == 2 and all(c.get("no_repeat_ngram_size", 0) == 0 for c in rollouts)
    assert all(c["alpha"] == 0.0 for c in rollouts)


def test_sft_picks_its_checkpoint_by_validation_rouge_l(tiny_llama, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="valid_rouge_l"):
        SFTConfig(best_metric="valid/rougeL", best_mode="max")
    calls = record_calls(monkeypatch, generate, "sample")
    out = tmp_path / "run"
    cfg = stage_config(
        SFTConfig, tiny_llama, out, max_train_examples=8, max_valid_examples=3, batch_size=2, max_steps=2,
        eval_every=1, lr=1e-3, warmup_steps=0, valid_rouge_l=True, valid_max_new_tokens=5,
        best_metric="valid/rougeL", best_mode="max",
    )  # fmt: skip
    best = train_sft(cfg)
    scores = [m["valid/rougeL"] for m in read_metrics(out) if "valid/rougeL" in m]
    assert len(scores) == 3 and all(0.0 <= s <= 100.0 for s in scores)  # steps 0, 1, 2
    assert all(c["no_repeat_ngram_size"] == 6 and c["max_new_tokens"] == 5 for c in calls)
    saved = json.loads((best / "trainer_state.json").read_text())
    assert saved["best_value"] == pytest.approx(max(scores[1:]))
