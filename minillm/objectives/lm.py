"""Language-modelling cross-entropy on chosen target tokens, computed in token chunks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from minillm.objectives.chunked import chunked_head_loss


def target_rows(hidden: Tensor, input_ids: Tensor, target_mask: Tensor) -> tuple[Tensor, Tensor]:
    """The hidden states that predict target tokens, and those tokens.

    hidden:      [B, L, H] final hidden states (position i predicts token i + 1)
    input_ids:   [B, L] long
    target_mask: [B, L] bool, True where the token is a loss target (never position 0)
    returns:     rows [N, H], targets [N] long, N = target_mask.sum()
    """
    B, L, H = hidden.shape
    assert input_ids.shape == (B, L) and target_mask.shape == (B, L) and target_mask.dtype == torch.bool
    keep = target_mask[:, 1:]  # [B, L-1]: row i of hidden predicts token i + 1
    return hidden[:, :-1][keep], input_ids[:, 1:][keep]


def ce_sum(rows: Tensor, targets: Tensor, weight: Tensor, bias: Tensor | None, *, chunk_size: int,
           token_weights: Tensor | None = None) -> Tensor:
    """Σ_n w_n · CE(rows[n] @ weight.T + bias, targets[n]) as a scalar (fp32), chunked over tokens.

    rows: [N, H]; targets: [N] long; weight: [V, H]; bias: [V] or None; token_weights: [N] or None (= 1).
    """
    N, H = rows.shape
    assert targets.shape == (N,) and weight.shape[1] == H

    def token_fn(logits: Tensor, start: int, end: int) -> Tensor:
        ce = F.cross_entropy(logits.float(), targets[start:end], reduction="none")  # [C]
        return (ce * token_weights[start:end]).sum() if token_weights is not None else ce.sum()

    return chunked_head_loss(rows, weight, token_fn, chunk_size=chunk_size, bias=bias)
