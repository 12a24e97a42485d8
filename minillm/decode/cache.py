"""Model calls with a KV cache, for any family: which keywords its forward takes for the cache, and the
prefill that returns the last prompt position's logits."""

from __future__ import annotations

import functools
import inspect

from torch import Tensor, nn
from transformers import DynamicCache, StaticCache

from minillm.data.tokenize import position_ids
from minillm.models import vocab_size


@functools.cache
def forward_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def accepts(model: nn.Module, name: str) -> bool:
    return name in forward_params(type(model))


def with_cache(model: nn.Module, cache: DynamicCache | StaticCache) -> dict[str, object]:
    """The KV-cache keyword: `cache` since transformers renamed `past_key_values` (5.x; the old name is
    accepted until 5.40). Passing the wrong one would be swallowed by **kwargs and decode without context."""
    if accepts(model, "cache"):
        return {"cache": cache}
    if accepts(model, "past_key_values"):
        return {"past_key_values": cache}
    raise TypeError(f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values`")


def prefill(model: nn.Module, ids: Tensor, attn: Tensor, cache: DynamicCache | StaticCache) -> Tensor:
    """Run the prompt through `model`, filling `cache`; next-token logits [B, V] fp32.

    ids [B, P] long; attn [B, K] 0/1 with K ≥ P (K = cache length for a static cache, tail zeros).
    """
    P = ids.shape[1]
    kwargs = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
    out = model(
        input_ids=ids,
        attention_mask=attn,
        position_ids=position_ids(attn[:, :P]),
        use_cache=True,
        **with_cache(model, cache),
        **kwargs,
    )
    return out.logits[:, -1, : vocab_size(model)].float()  # never a padding id past the tokenizer's
