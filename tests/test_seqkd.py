"""SeqKD: the teacher-response cache is reused, regenerated when a setting changes, and resumed after a cut."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import read_metrics, stage_config

from minillm import models
from minillm.config import SeqKDConfig
from minillm.data.instructions import load_records
from minillm.train import seqkd
from minillm.train.seqkd import cache_settings, read_cache, teacher_data, train_seqkd


def seqkd_config(model: Path, teacher: Path, tmp: Path, out: str, **kw) -> SeqKDConfig:
    base = dict(
        teacher=str(teacher),
        teacher_data_cache=str(tmp / "cache"),
        max_train_examples=24,
        max_valid_examples=4,
        batch_size=4,
        grad_accum=1,
        max_steps=2,
        lr=1e-3,
        eval_every=0,
        max_new_tokens=8,
        sample_batch_size=5,
        valid_forward_kl=False,
    )
    return stage_config(SeqKDConfig, model, tmp / out, **(base | kw))


def no_generation(*args, **kwargs):
    raise AssertionError("the teacher generated although its responses are cached")


def test_cache_reused_then_regenerated_when_a_setting_changes(tiny_llama, teacher, tmp_path, monkeypatch):
    train_seqkd(seqkd_config(tiny_llama, teacher, tmp_path, "first"))
    first = read_metrics(tmp_path / "first")
    n = first[0]["teacher_data/generated"]
    assert n == 21 and first[0]["teacher_data/cached"] == 0  # 24 records, 3 prompts over 192 tokens
    (folder,) = (tmp_path / "cache").iterdir()
    lines = read_cache(folder / "responses.jsonl")
    assert len(lines) == n and all(1 <= len(x["response_ids"]) <= 8 for x in lines.values())
    records = load_records("dolly_valid", limit=24)
    assert all(x["instruction"] == records[i]["instruction"] for i, x in lines.items())

    # Same generation key, other training settings (the official KD-loss form): nothing is generated.
    with monkeypatch.context() as m:
        m.setattr(seqkd, "sample_responses", no_generation)
        train_seqkd(seqkd_config(tiny_llama, teacher, tmp_path, "second", seqkd_loss="kd", seed=3))
    second = read_metrics(tmp_path / "second")
    assert second[0]["teacher_data/generated"] == 0 and second[0]["teacher_data/cached"] == n
    assert "loss/kd" in second[1] and "loss/ce" in second[1]

    # A sampling setting changes: a new cache folder is generated; the old one stays.
    with monkeypatch.context() as m:
        m.setattr(seqkd, "sample_responses", no_generation)
        with pytest.raises(AssertionError, match="generated although"):
            train_seqkd(seqkd_config(tiny_llama, teacher, tmp_path, "third", sample_temperature=0.7))
    train_seqkd(seqkd_config(tiny_llama, teacher, tmp_path, "third", sample_temperature=0.7))
    assert read_metrics(tmp_path / "third")[0]["teacher_data/generated"] == n
    folders = sorted((tmp_path / "cache").iterdir())
    assert len(folders) == 2 and folder in folders
    temps = sorted(
        json.loads((f / "settings.json").read_text())["sampling"]["sample_temperature"] for f in folders
    )
    assert temps == [0.7, 1.0]


def test_cache_key_follows_the_teacher_weights(teacher, tmp_path):
    cfg = seqkd_config(teacher, teacher, tmp_path, "unused")
    model = models.load_model(str(teacher))
    before = cache_settings(cfg, model)
    assert cache_settings(cfg, model) == before
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1e-3
    assert cache_settings(cfg, model)["teacher_sha1"] != before["teacher_sha1"]


def test_cut_generation_resumes_to_the_same_cache(tiny_llama, teacher, tokenizer, tmp_path):
    """A generation killed after its first batch (mid-line) continues where it stopped, and the cache ends as
    the uninterrupted one: batch k always samples from generator(sample_seed, k)."""
    cfg = seqkd_config(tiny_llama, teacher, tmp_path, "unused")
    t = models.load_model(str(teacher))
    acc = Accelerator(cpu=True)
    full, stats = teacher_data(cfg, t, tokenizer, acc)
    assert stats["teacher_data/generated"] == 21
    (folder,) = (tmp_path / "cache").iterdir()
    path = folder / "responses.jsonl"
    whole = path.read_text().splitlines()
    path.write_text("\n".join(whole[:5]) + "\n" + whole[5][:20])  # first batch of 5, then a cut line
    again, stats = teacher_data(cfg, t, tokenizer, acc)
    assert stats["teacher_data/generated"] == 16 and stats["teacher_data/cached"] == 5
    assert [(e.prompt_ids, e.response_ids) for e in again] == [(e.prompt_ids, e.response_ids) for e in full]
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        json.loads(line) for line in whole
    ]


def test_changing_the_data_size_gives_the_cache_of_a_fresh_run(tiny_llama, teacher, tokenizer, tmp_path):
    """max_train_examples 24 → 22 → 24 on one cache: each run ends with a fresh run's responses. The last
    batch changes size with the limit and is regenerated, never reused from the other layout."""
    t = models.load_model(str(teacher))
    acc = Accelerator(cpu=True)

    def run(root: Path, limit: int) -> tuple[list[list[int]], float]:
        cfg = seqkd_config(tiny_llama, teacher, root, "unused", max_train_examples=limit)
        examples, stats = teacher_data(cfg, t, tokenizer, acc)
        return [e.response_ids for e in examples], stats["teacher_data/generated"]

    fresh = {limit: run(tmp_path / f"fresh{limit}", limit)[0] for limit in (22, 24)}
    # 24 records: 21 prompts in batches (5, 5, 5, 5, 1); 22 records: 19 prompts in (5, 5, 5, 4)
    assert run(tmp_path / "b", 24) == (fresh[24], 21)
    assert run(tmp_path / "b", 22) == (fresh[22], 4)
    assert run(tmp_path / "b", 24) == (fresh[24], 5)
