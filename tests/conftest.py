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
    FalconConfig,
    Gemma2Config,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
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


# Every family the suite builds (tests/test_families.py runs each stage on each): dense decoders with and
# without attention biases, GPT-2's and OPT's learned positions, Mistral's sliding window, Qwen3's q/k norms,
# Gemma 2's soft-capped head and sliding layers, Phi-3's fused projections, Qwen2-MoE's routed experts,
# Falcon's decoder layers that return tuples.
FAMILIES = ("gpt2", "opt", "llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "qwen2_moe", "falcon")


def model_config(
    family: str, vocab_size: int, layers: int = 2, hidden: int = 32, eos: int = 0, pad: int | None = 0
) -> PretrainedConfig:
    """A tiny random config of `family` (ids: `eos` is also BOS; `pad` None for a model without one)."""
    common = dict(vocab_size=vocab_size, eos_token_id=eos, bos_token_id=eos, pad_token_id=pad)
    decoder = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **common,
    )
    head_dim = hidden // 4
    if family == "llama":
        return LlamaConfig(**decoder)
    if family == "qwen2":  # Llama's shape with attention biases
        return Qwen2Config(**decoder)
    if family == "mistral":  # a window shorter than a test prompt, so it cuts
        return MistralConfig(sliding_window=8, **decoder)
    if family == "qwen3":
        return Qwen3Config(head_dim=head_dim, **decoder)
    if family == "gemma2":  # alternating sliding / full layers, soft-capped attention and head
        return Gemma2Config(
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            sliding_window=8,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
            **decoder,
        )
    if family == "phi3":
        return Phi3Config(**decoder)
    if family == "qwen2_moe":  # every layer routed: 4 experts, 2 per token, plus the shared expert
        return Qwen2MoeConfig(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=hidden,
            shared_expert_intermediate_size=hidden,
            decoder_sparse_step=1,
            **decoder,
        )
    if family == "falcon":  # the new decoder architecture; dropout in the layer's own forward, as GPT-2 has
        return FalconConfig(
            hidden_dropout=0.1,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_kv_heads=2,
            new_decoder_architecture=True,
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
    """A random `family` model with `tokenizer`'s vocabulary and special ids, saved with it to `path`."""
    torch.manual_seed(seed)
    config = model_config(
        family, len(tokenizer), layers, hidden, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id
    )
    model = AutoModelForCausalLM.from_config(config)
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
