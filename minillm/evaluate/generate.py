"""Batched sampling for evaluation (the project's one sampler, `minillm.rollout`) and the LM loss on gold responses.

`sample` draws from one model alone (α = 0) with `rollout.sample_responses`, as SeqKD and GKD do: static
KV cache, prompts prefilled in groups of similar length, one inverse-CDF draw per row and step. Decoding is
exactly what the caller passes (temperature, 0 = greedy; top_k; top_p; no_repeat_ngram_size, HF's n-gram
ban); the model's
own `generation_config` (which may carry top_k=50, repetition penalties, ...) is never read, as the official
code builds its GenerationConfig from scratch (LMOps `minillm/evaluate_main.py`).

Seeding: every call draws its uniforms from its own `torch.Generator`(s) seeded with the caller's seed(s), so
its output depends only on (model, prompts, seeds, decoding settings, device), never on what ran before, and
the global RNG is not touched. One seed covers a batch as a whole (row b takes the b-th uniform of each step:
the same prompt in another batch composition gets another sample); one seed per row gives each row its own
generator, so a row's tokens do not depend on the rows beside it (up to fp32 rounding of another batch
shape). The protocol seeds each (prompt, seed) row (`stable_seed`), and rows holding the same prompt share
its prefill. HF `generate` under the same seed gives other tokens (it draws with `torch.multinomial` from
the global generator), from the same distribution.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationConfig

from minillm import models
from minillm.data.tokenize import Example, collate, collate_prompts
from minillm.decode.draw import Generators
from minillm.rollout import sample_responses


def stable_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any printable parts (e.g. seed, set name, prompt id); never Python's hash()."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def sample(
    model: Any,
    prompts: list[list[int]],
    *,
    seed: int | list[int],
    eos_id: int,
    pad_id: int,
    temperature: float,
    top_p: float,
    top_k: int,
    max_new_tokens: int,
    no_repeat_ngram_size: int = 0,
    num_return_sequences: int = 1,
) -> Tensor:
    """Sampled continuations of `prompts` (left-padded together; dropout off, the model's mode restored).

    prompts: B lists of token ids (no padding)
    seed:    one seed for the batch, or one per returned row (B * num_return_sequences, rows as below)
    returns: [B * num_return_sequences, T] long response ids on the CPU, T <= max_new_tokens (the batch stops
             once every row has ended), rows in prompt order (the samples of prompt b are rows b*S ..
             b*S+S-1); after a row's first EOS every id is `pad_id`.
    """
    device = next(model.parameters()).device
    rows = [p for p in prompts for _ in range(num_return_sequences)]
    if isinstance(seed, int):
        generator: Generators = torch.Generator(device=device).manual_seed(seed)
    elif len(seed) == len(rows):
        generator = [torch.Generator(device=device).manual_seed(s) for s in seed]
    else:
        raise ValueError(f"{len(seed)} seeds for {len(rows)} rows")
    responses, _ = sample_responses(
        model,
        rows,
        eos_id=eos_id,
        pad_id=pad_id,
        generator=generator,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        no_repeat_ngram_size=no_repeat_ngram_size,
    )
    T = max(map(len, responses))  # the steps taken: the batch stops once every row has ended
    return torch.tensor([r + [pad_id] * (T - len(r)) for r in responses], dtype=torch.long)  # [B*S, T]


@contextmanager
def _plain_generation_config(model: Any) -> Iterator[None]:
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


@torch.no_grad()
def decode(model: Any, prompts: list[list[int]], gen: GenerationConfig, *, seed: int) -> Tensor:
    """Continuations of left-padded `prompts` decoded by Hugging Face `generate` with exactly `gen` (the
    model's own generation config is set aside during the call), under `torch.manual_seed(seed)`. For
    `minillm generate`, which honours whatever a model's generation config asks (repetition penalties, ...);
    evaluation and training sample with `sample`.

    returns: [B * gen.num_return_sequences, T] long response ids, T <= gen.max_new_tokens
    """
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate_prompts(prompts, gen.pad_token_id).items()}  # [B, P] each
    P = batch["input_ids"].shape[1]
    model.eval()
    devices = [device.index if device.index is not None else 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _plain_generation_config(model):
        torch.manual_seed(seed)
        out = model.generate(**batch, generation_config=gen)  # [B*S, P + T]
    return out[:, P:].cpu()


def trim_at_eos(ids: list[int], eos_id: int) -> tuple[list[int], bool]:
    """The response up to (not including) its first EOS, and whether an EOS was produced."""
    if eos_id in ids:
        return ids[: ids.index(eos_id)], True
    return ids, False


def alive_mask(responses: Tensor, eos_id: int) -> Tensor:
    """[N, T] bool: True at step t while no EOS occurs among the tokens before t (the EOS step itself is True).

    responses: [N, T] long sampled ids (as returned by `sample`)
    """
    N, T = responses.shape
    is_eos = (responses == eos_id).long()  # [N, T]
    eos_before = is_eos.cumsum(-1) - is_eos  # [N, T]: number of EOS strictly before t
    return eos_before == 0


@torch.no_grad()
def gold_nll(
    model: Any, examples: list[Example], pad_id: int, *, batch_size: int, chunk_size: int = 1024
) -> list[tuple[float, int]]:
    """Per example: (sum of cross-entropy over its response tokens, number of those tokens).

    The response tokens are the gold answer and its EOS (as in SFT, `tokenize.encode_records`); the prompt is
    not scored. The token-averaged LM loss of a set is sum(nll) / sum(count); the official code instead
    averages each example's mean (LMOps `evaluate_main.py`), `sum(nll_i / count_i) / N`. Logits are formed
    `chunk_size` tokens at a time, never as a [B, L, V] tensor.
    """
    model.eval()
    device = next(model.parameters()).device
    head = models.output_head(model)  # [V, H] weight
    out: list[tuple[float, int]] = []
    for start in range(0, len(examples), batch_size):
        part = examples[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(part, pad_id).items()}  # right-padded [B, L]
        hidden = models.final_hidden(model, batch["input_ids"], batch["attention_mask"])  # [B, L, H]
        keep = batch["target_mask"][:, 1:]  # [B, L-1]: hidden at i predicts token i+1
        rows = hidden[:, :-1][keep]  # [N, H]
        targets = batch["input_ids"][:, 1:][keep]  # [N]
        owner = keep.nonzero()[:, 0]  # [N]: example of each target token
        nll = torch.empty(rows.shape[0], dtype=torch.float32, device=device)  # [N]
        for c in range(0, rows.shape[0], chunk_size):
            logits = head.logits(rows[c : c + chunk_size]).float()  # [C, V]
            nll[c : c + chunk_size] = F.cross_entropy(logits, targets[c : c + chunk_size], reduction="none")
        sums = torch.zeros(len(part), dtype=torch.float64, device=device).index_add_(0, owner, nll.double())
        counts = keep.sum(-1)
        out += [(float(s), int(n)) for s, n in zip(sums.tolist(), counts.tolist(), strict=True)]
    return out
