"""Every stage on every model family the suite builds, each model saved and reloaded through
`models.load_model`: SFT and KD steps, and SeqKD, GKD and MiniLLM steps with the fast paths on (static-cache
sampling, the sampling cache's logits and layer replay, the teacher's log-prob cache) giving the losses of
the same steps with them off; the fast sampler's tokens equal the eager loop's per family; and the logged
fallbacks where a family or a transformers release lacks what a fast path reads. Plus a model whose pad
differs from EOS and one with no pad token. Tested with transformers 5.24: every family takes every fast
path except Falcon, whose decoder layers return tuples and so run in full in the replay."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, read_metrics, save_tiny_model, stage_config
from tolerances import assert_close_verbose
from transformers import PreTrainedTokenizerFast

from minillm import models
from minillm.config import GKDConfig, KDConfig, MiniLLMConfig, SeqKDConfig, SFTConfig
from minillm.data.tokenize import collate_prompts
from minillm.decode import fast as fast_path
from minillm.rollout import sample_rollout
from minillm.train import sampling_cache
from minillm.train.gkd import train_gkd
from minillm.train.kd import train_kd
from minillm.train.minillm import train_minillm
from minillm.train.seqkd import train_seqkd
from minillm.train.sft import train_sft

# (family, pad): "eos" is the suite's tokenizer (pad = EOS); "own" adds a pad token of its own (as OPT's
# tokenizers have), "none" has none (as Llama's), which `models.load_tokenizer` replaces by EOS
CASES = [(f, "eos") for f in FAMILIES] + [("opt", "own"), ("llama", "none")]
IDS = [f if pad == "eos" else f"{f}-pad-{pad}" for f, pad in CASES]
REPLAY = "the sampling cache's layer replay"


def with_pad(tokenizer: PreTrainedTokenizerFast, pad: str) -> PreTrainedTokenizerFast:
    tok = copy.deepcopy(tokenizer)
    if pad == "own":
        tok.add_special_tokens({"pad_token": "<pad>"})
    elif pad == "none":
        tok.pad_token = None
    return tok


@pytest.fixture(scope="session")
def family_data(tmp_path_factory) -> Path:
    """16 short records whose prompts differ in length (ragged batches, every prompt past Mistral's and
    Gemma 2's 8-token window)."""
    path = tmp_path_factory.mktemp("family-data") / "task.jsonl"
    with open(path, "w") as fh:
        for i in range(16):
            instruction = "Name a colour" + " and a fruit" * (i % 4) + f", number {i}."
            fh.write(
                json.dumps({"instruction": instruction, "input": "", "output": "Blue, like the sky."}) + "\n"
            )
    return path


@pytest.fixture(scope="session")
def family_pairs(tmp_path_factory, tokenizer) -> dict[tuple[str, str], tuple[Path, Path]]:
    """(student, teacher) folders per case, saved once per session: the same family, other seeds."""
    root = tmp_path_factory.mktemp("families")
    pairs = {}
    for family, pad in CASES:
        tok = with_pad(tokenizer, pad)
        folder = root / f"{family}-{pad}"
        pairs[family, pad] = (
            save_tiny_model(folder / "student", family, tok, seed=1),
            save_tiny_model(folder / "teacher", family, tok, seed=2),
        )
    return pairs


@pytest.fixture
def paths_log(caplog) -> pytest.LogCaptureFixture:
    """Which paths run, as `models.note_path` logs them (its once-per-process memory cleared first)."""
    models._note.cache_clear()
    sampling_cache._RETURNS_HIDDEN.clear()
    caplog.set_level(logging.INFO, logger="minillm")
    return caplog


def notes(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "minillm" and r.levelno == level]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_loaded_pair_ids_and_fast_sampler_tokens_equal_eager(case, family_pairs, family_data, paths_log):
    """The reloaded pair keeps its special ids; under one seed the fast sampler (its layer and teacher-row
    outputs on) draws the eager loop's tokens, with log-probs equal to fp32 rounding."""
    family, pad = case
    student_dir, teacher_dir = family_pairs[case]
    tok = models.load_tokenizer(str(student_dir))
    student, teacher = models.load_model(str(student_dir)), models.load_model(str(teacher_dir))
    assert (tok.pad_token_id == tok.eos_token_id) == (pad != "own")
    assert student.config.model_type == family and student.config.pad_token_id == (
        None if pad == "none" else tok.pad_token_id
    )
    records = [json.loads(line) for line in family_data.read_text().splitlines()[:4]]
    enc = collate_prompts([tok(r["instruction"])["input_ids"] for r in records], tok.pad_token_id)
    B, P = enc["input_ids"].shape
    N, H, H_t = 12, student.config.hidden_size, teacher.config.hidden_size
    kw = dict(alpha=0.2, max_new_tokens=N, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    got = {}
    for fast in (False, True):
        out = dict(
            layers_out=[torch.zeros(B, P + N, H) for _ in models.decoder_layers(student)],
            teacher_rows_out=torch.zeros(B, N, H_t),
        )
        got[fast] = sample_rollout(
            student,
            teacher,
            enc["input_ids"],
            enc["attention_mask"],
            generator=torch.Generator().manual_seed(3),
            fast=fast,
            **kw,
            **(out if fast else {}),
        )
    assert torch.equal(got[True].response_ids, got[False].response_ids)
    assert torch.equal(got[True].mask, got[False].mask)
    for name in ("logq_old", "logp", "log_w"):
        assert_close_verbose(getattr(got[True], name), getattr(got[False], name), torch.float32)
    assert not notes(paths_log, logging.WARNING)
    assert len([m for m in notes(paths_log, logging.INFO) if "a static KV cache" in m]) == 1  # logged once


def seconds_run(data: Path) -> dict:
    """Two steps of two-sequence batches on `data`, validation on 2 examples at step 0 only."""
    return dict(
        train_data=str(data),
        valid_data=str(data),
        max_train_examples=8,
        max_valid_examples=2,
        batch_size=2,
        max_steps=2,
        eval_every=0,
        max_prompt_length=128,
        max_length=160,
    )


# MiniLLM with teacher mixing: one collection of 4 rollouts, two mini-batch steps on it
MINILLM = dict(
    num_rollouts=4,
    ppo_epochs=1,
    pt_loss="none",
    max_new_tokens=6,
    valid_max_new_tokens=4,
    warmup_steps=0,
    lr=1e-3,
)


def losses(out: Path) -> torch.Tensor:
    return torch.tensor([m["loss"] for m in read_metrics(out) if "loss" in m], dtype=torch.float64)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_stage_runs_and_fast_paths_give_the_eager_losses(
    case, family_pairs, family_data, tmp_path, paths_log
):
    """Two steps of each stage. SeqKD and GKD (always on-policy) run with `fast_rollout` on and off;
    MiniLLM (teacher mixing on) with every fast path on, then `sampling_cache_mib 0` and
    `teacher_cache_mib 0`, then also `fast_rollout false`. The same seed gives the same samples, so each
    pair's losses agree to fp32 rounding."""
    family, _ = case
    student, teacher = family_pairs[case]
    common = seconds_run(family_data)
    sampled = dict(teacher=str(teacher), max_new_tokens=6)

    def run(train, cls, name: str, **kw) -> Path:
        out = tmp_path / name
        result = train(stage_config(cls, student, out, **(common | kw)))
        assert len(losses(out)) == 2, name
        return result

    best = run(train_sft, SFTConfig, "sft")
    assert models.load_model(str(best)).config.model_type == family  # the checkpoint reloads as its family
    run(train_kd, KDConfig, "kd", teacher=str(teacher), valid_forward_kl=False)
    eager = dict(fast_rollout=False)
    for tag, kw in (("fast", {}), ("eager", eager)):
        run(
            train_seqkd,
            SeqKDConfig,
            f"seqkd-{tag}",
            teacher_data_cache=str(tmp_path / f"cache-{tag}"),  # the cache key leaves fast_rollout out
            max_train_examples=4,
            sample_batch_size=4,
            valid_forward_kl=False,
            **sampled,
            **kw,
        )
        run(train_gkd, GKDConfig, f"gkd-{tag}", lmbda=1.0, valid_forward_kl=False, **sampled, **kw)
    uncached = dict(sampling_cache_mib=0, teacher_cache_mib=0)
    for tag, kw in (("fast", {}), ("uncached", uncached), ("eager", uncached | eager)):
        run(train_minillm, MiniLLMConfig, f"minillm-{tag}", teacher=str(teacher), **MINILLM, **kw)
    for fast, slow in (
        ("seqkd-fast", "seqkd-eager"),
        ("gkd-fast", "gkd-eager"),
        ("minillm-fast", "minillm-uncached"),
        ("minillm-uncached", "minillm-eager"),
    ):
        assert_close_verbose(losses(tmp_path / fast), losses(tmp_path / slow), torch.float32)
    replay = [m for m in notes(paths_log, logging.INFO) + notes(paths_log, logging.WARNING) if REPLAY in m]
    if family == "falcon":  # its layers return (hidden, attention weights): they run in full, said once
        assert notes(paths_log, logging.WARNING) == replay and len(replay) == 1, replay
        assert "returns tuple" in replay[0]
    else:
        assert not notes(paths_log, logging.WARNING)
        assert len(replay) == 1 and "replayed layer outputs" in replay[0], replay


class _NoStaticCache:
    """A StaticCache whose constructor takes other arguments (a transformers release that renamed them)."""

    def __init__(self, **kw: object) -> None:
        raise TypeError("unexpected keyword argument 'max_cache_len'")


class _BareLayer:
    """A cache layer with `update` only."""

    def update(self, *a: object) -> None: ...


class _FieldlessStaticCache(fast_path.StaticCache):
    """A StaticCache whose layers lack the fields `Decoder` writes (a release that renamed them)."""

    def __init__(self, **kw: object) -> None:
        self.layers = [_BareLayer()]


@pytest.mark.parametrize("broken", ["no-fullgraph", "constructor", "fields"])
def test_static_cache_falls_back_logs_once_and_keeps_the_tokens(broken, family_pairs, monkeypatch, paths_log):
    """Where the static cache cannot apply the fast path decodes with a DynamicCache, warns once with the
    reason, and draws the eager loop's tokens."""
    student_dir, teacher_dir = family_pairs["llama", "eos"]
    student, teacher = models.load_model(str(student_dir)), models.load_model(str(teacher_dir))
    if broken == "no-fullgraph":
        student._can_compile_fullgraph = teacher._can_compile_fullgraph = False
    else:
        monkeypatch.setattr(
            fast_path, "StaticCache", _NoStaticCache if broken == "constructor" else _FieldlessStaticCache
        )
    ids = torch.randint(1, 300, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :4] = mask[2, :7] = False
    kw = dict(alpha=0.2, max_new_tokens=10, eos_token_id=0, pad_token_id=0)
    eager = sample_rollout(
        student, teacher, ids, mask, generator=torch.Generator().manual_seed(1), fast=False, **kw
    )
    for _ in range(2):
        fast = sample_rollout(student, teacher, ids, mask, generator=torch.Generator().manual_seed(1), **kw)
        assert torch.equal(fast.response_ids, eager.response_ids)
        assert_close_verbose(fast.logq_old, eager.logq_old, torch.float32)
    warned = notes(paths_log, logging.WARNING)
    assert len(warned) == 1 and "falls back to a DynamicCache" in warned[0], warned  # once, for both calls
    reason = {"no-fullgraph": "_can_compile_fullgraph", "constructor": "max_cache_len", "fields": "lack"}
    assert reason[broken] in warned[0]


def test_layer_replay_not_routed_falls_back_and_logs_once(
    family_pairs, family_data, tmp_path, monkeypatch, paths_log
):
    """Decoder layers that transformers no longer routes through `_gradient_checkpointing_func` (simulated:
    the layers' own flag ignored) run in full under the replay: the losses of the replayed run, one warning."""
    student, teacher = family_pairs["llama", "eos"]
    cfg = seconds_run(family_data) | MINILLM | dict(teacher=str(teacher))
    train_minillm(stage_config(MiniLLMConfig, student, tmp_path / "replayed", **cfg))
    models._note.cache_clear()
    real = sampling_cache.SamplingCache.replay

    def unrouted(self, model, *args):
        for layer in models.decoder_layers(model):  # the layer's own forward, without HF's routing wrapper
            layer.forward = type(layer).forward.__wrapped__.__get__(layer)
        return real(self, model, *args)

    monkeypatch.setattr(sampling_cache.SamplingCache, "replay", unrouted)
    train_minillm(stage_config(MiniLLMConfig, student, tmp_path / "unrouted", **cfg))
    warned = [m for m in notes(paths_log, logging.WARNING) if REPLAY in m]
    assert len(warned) == 1 and "did not route" in warned[0], warned
    assert_close_verbose(losses(tmp_path / "unrouted"), losses(tmp_path / "replayed"), torch.float32)
