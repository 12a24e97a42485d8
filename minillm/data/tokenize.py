"""Token ids with loss masks, following the official length rule.

Prompt and response are tokenised separately and concatenated (as the official preprocessing does), with no
BOS (the paper's template) and the EOS appended to the response as a training target. Masks are built from
lengths, never from pad ids: our tokenizers use pad == EOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from minillm.data.template import build_prompt


@dataclass
class Example:
    prompt_ids: list[int]
    response_ids: list[int]  # ends with EOS unless the max_length cap cut it


def encode_prompt(record: dict[str, Any], tokenizer: Any, template: str) -> list[int]:
    text = build_prompt(record["instruction"], record.get("input", ""), template, tokenizer)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_records(
    records: list[dict[str, Any]], tokenizer: Any, *, template: str, max_prompt_length: int, max_length: int
) -> tuple[list[Example], int]:
    """Examples for supervised stages and the number of records dropped for a prompt over max_prompt_length."""
    out, dropped = [], 0
    for rec in records:
        prompt = encode_prompt(rec, tokenizer, template)
        if len(prompt) > max_prompt_length:
            dropped += 1
            continue
        response = tokenizer(rec["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append(Example(prompt, response[: max_length - len(prompt)]))
    return out, dropped


def collate(examples: list[Example], pad_id: int) -> dict[str, Tensor]:
    """Right-padded prompt+response batch.

    returns input_ids [B, L] long, attention_mask [B, L] long, target_mask [B, L] bool (True where the token
    is a response token, i.e. a loss target predicted from the position before it).
    """
    L = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    target_mask = torch.zeros(B, L, dtype=torch.bool)
    for b, e in enumerate(examples):
        p, n = len(e.prompt_ids), len(e.prompt_ids) + len(e.response_ids)
        input_ids[b, :n] = torch.tensor(e.prompt_ids + e.response_ids)
        attention_mask[b, :n] = 1
        target_mask[b, p:n] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "target_mask": target_mask}


def collate_prompts(prompts: list[list[int]], pad_id: int) -> dict[str, Tensor]:
    """Left-padded prompts for generation: input_ids [B, P] long, attention_mask [B, P] long."""
    P = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for b, p in enumerate(prompts):
        input_ids[b, P - len(p) :] = torch.tensor(p)
        attention_mask[b, P - len(p) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that follow the attention mask, so left padding does not shift them: [B, L] long."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# Rows are forwarded in groups of similar length whose padding stays under this fraction of their tokens:
# left-padding a whole batch to its longest prompt wasted a third of the teacher's forward on Dolly,
# and two thirds of a sampler's prefill.
_MAX_PADDING = 0.1


def length_groups(lengths: list[int], max_padding: float = _MAX_PADDING) -> list[list[int]]:
    """Indices grouped by similar length, shortest first; each group's padding to its longest member is
    at most `max_padding` of its padded tokens (a single long row forms its own group)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        group = [*groups[-1], i] if groups else [i]
        padded = len(group) * lengths[i]  # i is the group's longest
        if groups and padded - sum(lengths[j] for j in group) <= max_padding * padded:
            groups[-1] = group
        else:
            groups.append([i])
    return groups


def target_sequences(batch: dict[str, Tensor]) -> tuple[list[Tensor], list[int], list[int]]:
    """Each example's tokens up to its last target, where its targets start, and how many there are: the
    rows `models.grouped_rows` forwards unpadded, row-major as `x[target_mask]`.

    batch:   input_ids [B, L] long, target_mask [B, L] bool with each row's targets contiguous (`collate`)
    returns: sequences [L_b] long, first target index (the prompt length; 0 when none), target count
    """
    ids, tm = batch["input_ids"], batch["target_mask"]
    count = tm.sum(-1).tolist()  # [B]
    first = tm.int().argmax(-1).tolist()  # [B]
    for b, (f, n) in enumerate(zip(first, count, strict=True)):
        assert bool(tm[b, f : f + n].all()), f"targets of row {b} are not contiguous"
    return (
        [ids[b, : max(f + n - 1, 1)] for b, (f, n) in enumerate(zip(first, count, strict=True))],
        first,
        count,
    )
