"""Slow float64 references for minillm.objectives.policy, written independently with Python loops.

Each works one row and one position at a time on Python floats: returns are explicit double sums with
γ powers (not the implementation's recursion), counts are explicit, whitening statistics are plain sums,
mixtures are formed in probability space. Nothing here imports the implementation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _rows(x: Tensor) -> list[list[float]]:
    return x.double().tolist()


def _mask_rows(mask: Tensor) -> list[list[bool]]:
    return mask.bool().tolist()


def rewards_slow(logp: Tensor, logq: Tensor, mask: Tensor) -> Tensor:
    out = torch.zeros(mask.shape, dtype=torch.float64)
    lp, lq, mk = _rows(logp), _rows(logq), _mask_rows(mask)
    for b in range(len(mk)):
        for t in range(len(mk[b])):
            if mk[b][t]:
                out[b, t] = lp[b][t] - lq[b][t]
    return out


def returns_slow(
    rewards: Tensor,
    mask: Tensor,
    *,
    gamma: float,
    inclusive: bool,
    length_norm: bool,
    reward_scale: float,
    reward_clip: float | None,
) -> Tensor:
    """Σ_{t'≥s} γ^{t'−s} r'_{t'} with s = t (inclusive) or t+1 (exclusive), r' = clip(scale·r) on valid
    tokens, divided by the number of valid tokens in the sum (at least 1); 0 on invalid positions."""
    rw, mk = _rows(rewards), _mask_rows(mask)
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for b in range(len(mk)):
        T = len(mk[b])
        r = []
        for t in range(T):
            v = rw[b][t] * reward_scale if mk[b][t] else 0.0
            if reward_clip is not None:
                v = min(max(v, -reward_clip), reward_clip)
            r.append(v)
        for t in range(T):
            if not mk[b][t]:
                continue
            start = t if inclusive else t + 1
            total, count = 0.0, 0
            for u in range(start, T):
                total += gamma ** (u - start) * r[u]
                count += 1 if mk[b][u] else 0
            out[b, t] = total / max(count, 1) if length_norm else total
    return out


def whiten_slow(values: Tensor, mask: Tensor, *, all_positions: bool, shift_mean: bool = True) -> Tensor:
    """Population mean/variance over valid positions (all_positions=False) or over every position of the
    tensor (the official padded statistic); output on valid positions only."""
    vals, mk = _rows(values), _mask_rows(mask)
    pool = [vals[b][t] for b in range(len(mk)) for t in range(len(mk[b])) if all_positions or mk[b][t]]
    n = len(pool)
    mean = sum(pool) / n if n else 0.0
    var = sum((x - mean) ** 2 for x in pool) / n if n else 0.0
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for b in range(len(mk)):
        for t in range(len(mk[b])):
            if mk[b][t]:
                w = (vals[b][t] - mean) / math.sqrt(var + 1e-8)
                out[b, t] = w if shift_mean else w + mean
    return out


def ppo_loss_slow(
    logq_new: Tensor, logq_old: Tensor, log_w: Tensor, adv: Tensor, mask: Tensor, *, clip_eps: float
) -> tuple[Tensor, Tensor]:
    ln, lo, lw, a, mk = _rows(logq_new), _rows(logq_old), _rows(log_w), _rows(adv), _mask_rows(mask)
    loss = torch.zeros(mask.shape, dtype=torch.float64)
    clipped = torch.zeros(mask.shape, dtype=torch.bool)
    for b in range(len(mk)):
        for t in range(len(mk[b])):
            if not mk[b][t]:
                continue
            rho = math.exp(ln[b][t] - lo[b][t]) * math.exp(lw[b][t])
            rho_c = min(max(rho, 1.0 - clip_eps), 1.0 + clip_eps)
            l1, l2 = -a[b][t] * rho, -a[b][t] * rho_c
            loss[b, t] = max(l1, l2)
            clipped[b, t] = l2 > l1
    return loss, clipped


def mixture_slow(logq: Tensor, logp: Tensor, alpha: float) -> Tensor:
    lq, lp = _rows(logq), _rows(logp)
    out = torch.zeros(logq.shape, dtype=torch.float64)
    for b in range(len(lq)):
        for t in range(len(lq[b])):
            out[b, t] = math.log(alpha * math.exp(lp[b][t]) + (1.0 - alpha) * math.exp(lq[b][t]))
    return out
