"""Pre-training text packed into fixed blocks, for MiniLLM's PT loss (official: 512-token blocks of
OpenWebText, documents joined with EOS)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from minillm.data.instructions import read_jsonl, resolve
from minillm.errors import InputError


def load_pt_blocks(spec: str, tokenizer: Any, block_length: int, *, max_blocks: int | None = None) -> Tensor:
    """All complete blocks of the EOS-joined token stream: [N, block_length] long (the tail is dropped)."""
    path = resolve(spec)
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for lineno, doc in enumerate(read_jsonl(path), 1):
        if not isinstance(doc.get("text"), str):
            raise InputError(f"{path}: record {lineno} has no string field 'text'")
        stream += tokenizer(doc["text"], add_special_tokens=False)["input_ids"] + [eos]
        if max_blocks is not None and len(stream) >= max_blocks * block_length:
            break
    n = len(stream) // block_length
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise InputError(f"{path}: {len(stream)} tokens cannot fill one block of {block_length}")
    return torch.tensor(stream[: n * block_length]).view(n, block_length)  # [N, block_length]
