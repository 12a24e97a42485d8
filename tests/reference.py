"""Slow float64 references, written independently of minillm: explicit probabilities, Python loops.

Nothing here may call the implementation's log_softmax, logsumexp or F.kl_div: a slip shared by the
implementation and its reference would pass both. Conventions: p is the teacher, q the student;
0·log(0/b) = 0; positive mass against zero mass gives +inf.
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor

Dist = list[float]


def softmax_slow(logits: list[float], temperature: float = 1.0) -> Dist:
    """Probabilities of one row of logits divided by temperature; a -inf logit gets probability 0."""
    xs = [x / temperature for x in logits]
    top = max(xs)  # shift by the max only to keep exp() in range
    e = [math.exp(x - top) for x in xs]
    z = sum(e)
    return [v / z for v in e]


def kl_slow(a: Dist, b: Dist) -> float:
    """KL(a ‖ b) = Σ a·log(a/b), one term at a time."""
    total = 0.0
    for ai, bi in zip(a, b, strict=True):
        if ai == 0.0:
            continue
        if bi == 0.0:
            return math.inf
        total += ai * math.log(ai / bi)
    return total


def mixture_slow(a: Dist, b: Dist, w: float) -> Dist:
    """w·a + (1 − w)·b, element by element."""
    return [w * ai + (1.0 - w) * bi for ai, bi in zip(a, b, strict=True)]


def forward_kl_slow(p: Dist, q: Dist) -> float:
    return kl_slow(p, q)


def reverse_kl_slow(p: Dist, q: Dist) -> float:
    return kl_slow(q, p)


def jsd_slow(p: Dist, q: Dist, beta: float) -> float:
    """GKD Eq. (1): β·KL(p ‖ m) + (1 − β)·KL(q ‖ m), m = β·p + (1 − β)·q; β = 0 / 1 give forward / reverse KL."""
    if beta == 0.0:
        return kl_slow(p, q)
    if beta == 1.0:
        return kl_slow(q, p)
    m = mixture_slow(p, q, beta)
    return beta * kl_slow(p, m) + (1.0 - beta) * kl_slow(q, m)


def tvd_slow(p: Dist, q: Dist) -> float:
    return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q, strict=True))


def skew_forward_kl_slow(p: Dist, q: Dist, alpha: float) -> float:
    """DistiLLM: KL(p ‖ α·p + (1 − α)·q)."""
    return kl_slow(p, mixture_slow(p, q, alpha))


def skew_reverse_kl_slow(p: Dist, q: Dist, alpha: float) -> float:
    """DistiLLM: KL(q ‖ α·q + (1 − α)·p)."""
    return kl_slow(q, mixture_slow(q, p, alpha))


# Same names as minillm.objectives.divergences.DIVERGENCES; each takes (p, q, **params).
DIVERGENCES_SLOW: dict[str, Callable[..., float]] = {
    "forward_kl": forward_kl_slow,
    "reverse_kl": reverse_kl_slow,
    "jsd": jsd_slow,
    "tvd": tvd_slow,
    "skew_forward_kl": skew_forward_kl_slow,
    "skew_reverse_kl": skew_reverse_kl_slow,
}


def divergence_slow(
    name: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    **params: float,
) -> Tensor:
    """Per-position divergence ``name`` from [B, T, V] logits and a [B, T] bool mask -> [B, T] float64.

    One position at a time: both rows to probabilities with softmax_slow, then the pairwise formula.
    """
    fn = DIVERGENCES_SLOW[name]
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for b, t in mask.nonzero().tolist():
        q = softmax_slow(student_logits[b, t].double().tolist(), temperature)
        p = softmax_slow(teacher_logits[b, t].double().tolist(), temperature)
        out[b, t] = fn(p, q, **params)
    return out
