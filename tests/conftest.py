"""Fixtures: a tiny byte-level BPE tokenizer and tiny random models of several families, built offline; and
the helpers the stage tests share (a seconds-long run's config, its metrics, a killed run)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from minillm import config as config_lib
from minillm.data.instructions import load_records

torch.set_num_threads(1)  # the suite shares 2 cores; tiny models gain nothing from more threads

EOS = "<|endoftext|>"


def build_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on 300 Dolly records: real sub-word behaviour, no download."""
    texts = [r["instruction"] + "\n" + r["output"] for r in load_records("dolly_valid", limit=300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def model_config(family: str, vocab_size: int, layers: int = 2, hidden: int = 32):
    common = dict(vocab_size=vocab_size, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    if family in ("llama", "qwen2"):  # the same decoder shape; Qwen2 adds attention biases
        return (LlamaConfig if family == "llama" else Qwen2Config)(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **common,
        )
    if family == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, **common)
    if family == "opt":
        return OPTConfig(
            hidden_size=hidden,
            ffn_dim=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=512,
            word_embed_proj_dim=hidden,
            **common,
        )
    raise ValueError(family)


def save_tiny_model(
    path: Path, family: str, tokenizer, layers: int = 2, hidden: int = 32, seed: int = 0
) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(family, len(tokenizer), layers, hidden))
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama", tokenizer)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, tokenizer) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("gpt2"), "gpt2", tokenizer)


@pytest.fixture(scope="session")
def teacher(tmp_path_factory, tokenizer) -> Path:
    """A teacher unlike the student tiny_llama (wider, deeper, another seed)."""
    return save_tiny_model(
        tmp_path_factory.mktemp("teacher"), "llama", tokenizer, layers=3, hidden=48, seed=1
    )


def stage_config(cls: type, model: Path, out: Path, **kw: Any) -> Any:
    """A `cls` config for a seconds-long CPU run on Dolly: the settings all stage tests share, then kw."""
    base = dict(
        model=str(model),
        output_dir=str(out),
        train_data="dolly_valid",
        valid_data="dolly_test",
        save_every=0,
        max_prompt_length=192,
        max_length=256,
        chunk_size=50,
    )
    return cls(**(base | kw))


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def launch(stage: str, cfg: Any) -> subprocess.Popen:
    """`minillm <stage>` with cfg as flags, in a subprocess on one CPU thread."""
    return subprocess.Popen(
        [sys.executable, "-m", "minillm.cli", stage, *config_lib.to_argv(cfg)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def kill_tree(run: subprocess.Popen) -> None:
    """kill -9 `run` and its descendants: a launcher's workers (torchrun starts each in a session of its
    own, so killing the launcher alone leaves them running)."""
    procs = []
    with contextlib.suppress(psutil.NoSuchProcess):
        launcher = psutil.Process(run.pid)
        procs = [launcher, *launcher.children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    run.wait()


def kill_after_checkpoint(run: subprocess.Popen, out: Path, step: int, timeout_s: float = 120) -> None:
    """kill -9 `run` and its workers once `out` holds a checkpoint of step >= `step` (or after timeout_s)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        latest = out / "latest.json"
        if latest.is_file() and json.loads(latest.read_text())["step"] >= step:
            break
        assert run.poll() is None, run.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    kill_tree(run)
