"""oneDNN weight packing for CPU fp32 decoding (`minillm/rollout.py` docstring, bench/RESULTS.md)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import Tensor, nn

# Reordering costs about one decode step's weight reads; shorter generations keep the plain kernels.
PACK_MIN_TOKENS = 8


@contextlib.contextmanager
def packed_linears(model: nn.Module, rows: int, enabled: bool) -> Iterator[None]:
    """While inside, every `nn.Linear` of an fp32 CPU model runs oneDNN's linear on a copy of its weight
    reordered for `rows`-row inputs (the packed copies live only this long). A no-op elsewhere, or where
    this torch build lacks the ops."""
    ops = torch.ops.mkldnn
    param = next(model.parameters())
    if not (
        enabled
        and param.device.type == "cpu"
        and param.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    ):
        yield
        return
    # Plain CPU Linears only (a teacher's head may sit on the student's GPU); one whose forward is already
    # patched (accelerate's offload hooks) keeps it.
    linears = [
        m
        for m in model.modules()
        if type(m) is nn.Linear and "forward" not in m.__dict__ and m.weight.device.type == "cpu"
    ]

    def packed_forward(weight: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
        return ops._linear_pointwise(x, weight, bias, "none", [], "")

    for m in linears:
        packed = ops._reorder_linear_weight(m.weight.detach(), rows)
        bias = None if m.bias is None else m.bias.detach()
        m.forward = functools.partial(packed_forward, packed, bias)  # instance attribute over the class's
    try:
        yield
    finally:
        for m in linears:
            del m.forward
