"""Vocabulary reconciliation: one tokenizer, embeddings padded to different sizes (Qwen2's 151,936 vs
152,064 rows for 151,665 tokens) work on the tokenizer's ids and never sample a padding id; different
tokenizers raise naming the first id whose token differs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_tokenizer, model_config
from test_minillm import minillm_config
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from minillm import models
from minillm.config import KDConfig
from minillm.rollout import sample_rollout
from minillm.train.kd import train_kd
from minillm.train.minillm import train_minillm

PAD_STUDENT, PAD_TEACHER = 16, 40


def save_padded(path: Path, tokenizer, extra: int, layers: int, hidden: int, seed: int) -> Path:
    """A tiny Llama whose embedding has `extra` rows past the tokenizer, their head rows large (norm ~300):
    a sampler that read them would draw a padding id almost every step."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config("llama", len(tokenizer) + extra, layers, hidden))
    with torch.no_grad():
        model.lm_head.weight[len(tokenizer) :].normal_(0.0, 300.0 / hidden**0.5)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def test_first_differing_token_is_named(tokenizer):
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    a, b = (t for t, i in vocab.items() if i in (100, 101))  # swap the tokens of ids 100 and 101
    vocab[a], vocab[b] = vocab[b], vocab[a]
    swapped = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)), eos_token=tokenizer.eos_token
    )
    first = {i: t for t, i in tokenizer.get_vocab().items()}[100]
    with pytest.raises(ValueError, match=f"first difference is id 100: {first!r} in student"):
        models.check_same_tokenizer(tokenizer, swapped, ("student", "teacher"))
    with pytest.raises(ValueError, match="id 384: None in student"):  # a longer vocabulary, same start
        models.check_same_tokenizer(tokenizer, build_tokenizer(vocab_size=400), ("student", "teacher"))


def test_padded_pair_samples_and_scores_the_real_vocabulary(tokenizer, tmp_path):
    """Cut to the tokenizer, the padded pair compares, its heads have len(tokenizer) rows, and the sampler
    (fast and eager, teacher mixed in) draws no padding id although those logits would dominate."""
    V = len(tokenizer)
    s = models.load_model(str(save_padded(tmp_path / "s", tokenizer, PAD_STUDENT, 1, 32, 0)))
    t = models.load_model(str(save_padded(tmp_path / "t", tokenizer, PAD_TEACHER, 2, 48, 1)))
    with pytest.raises(ValueError, match="vocabulary size 400 != teacher vocabulary size 424"):
        models.check_same_vocab(s, t)
    for m in (s, t):
        models.use_vocab(m, V)
    models.check_same_vocab(s, t)
    assert models.output_head(s).weight.shape[0] == models.output_head(t).weight.shape[0] == V
    ids = torch.randint(1, V, (4, 5), generator=torch.Generator().manual_seed(0))
    for fast in (True, False):
        g = torch.Generator().manual_seed(1)
        r = sample_rollout(
            s, t, ids, torch.ones_like(ids), alpha=0.5, max_new_tokens=12, eos_token_id=0, pad_token_id=0,
            generator=g, fast=fast, logits_out=torch.empty(4, 12, V),
        )  # fmt: skip
        assert int(r.response_ids.max()) < V and r.mask.sum() > 0
        assert r.logp[r.mask].isfinite().all() and r.logq_old[r.mask].isfinite().all()
    with pytest.raises(ValueError, match="fewer than the 500 tokens"):
        models.use_vocab(s, 500)


def test_stages_reconcile_padded_embeddings(tokenizer, tmp_path):
    """KD and MiniLLM run on a student and teacher whose embeddings are padded to different sizes (before,
    the loaders refused them: 400 != 424 rows)."""
    student = save_padded(tmp_path / "s", tokenizer, PAD_STUDENT, 1, 32, 0)
    teacher = save_padded(tmp_path / "t", tokenizer, PAD_TEACHER, 2, 48, 1)
    data = tmp_path / "task.jsonl"
    data.write_text(
        "".join(json.dumps({"instruction": f"Count to {i}.", "output": "1 2 3"}) + "\n" for i in range(8))
    )
    train_kd(
        KDConfig(
            model=str(student), teacher=str(teacher), output_dir=str(tmp_path / "kd"), train_data=str(data),
            valid_data=str(data), max_steps=2, batch_size=4, eval_every=0, save_every=0,
            max_prompt_length=192, max_length=256, chunk_size=16,
        )
    )  # fmt: skip
    train_minillm(
        minillm_config(
            student, teacher, data, tmp_path / "distill", num_rollouts=8, max_steps=2, max_valid_examples=4
        )
    )
    lines = [json.loads(x) for x in (tmp_path / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(line["loss"])) for line in lines[1:])
