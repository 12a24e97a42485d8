"""Token-level divergences between the student's and the teacher's next-token distributions.

Notation: p = teacher (frozen), q = student (trained). Every divergence maps
``student_logits [B, T, V]``, ``teacher_logits [B, T, V]`` and ``mask [B, T] bool`` to a ``[B, T]``
tensor that is 0.0 where ``mask`` is False. Reduction is the caller's job (masked sum divided by the
global valid-token count of the optimizer step).

Conventions, the same for every function here:

- Temperature: both logits are divided by ``temperature`` before the log-softmax, and no T² factor is
  applied. The official MiniLLM (microsoft/LMOps ``minillm/``) and DistiLLM (jongwooko/distillm
  ``distillm/losses.py``) code train at temperature 1, where the factor is moot; elsewhere it would be
  a hidden term. A caller who wants Hinton's T² scaling multiplies the result.
- Precision: maths in fp32 at least (bf16/fp16 inputs are upcast), fp64 if either input is fp64.
  The result has that compute dtype.
- Support: a term whose weighting probability is 0 (a -inf logit) contributes exactly 0 to the value
  and to the gradient, never NaN. A divergence that is truly infinite (teacher mass where the student
  has none, for forward KL) comes back as +inf rather than being hidden.
- Masked positions are never read: their logits may hold NaN or be all -inf without reaching the
  values or the gradients.
- Unlike DistiLLM's losses, which drop the target-entropy term (a constant of the student), these are
  true divergences: KL(p ‖ p) = 0. Gradients are the same.
"""

import functools
import inspect
import math
from collections.abc import Callable

import torch
from torch import Tensor


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _log_probs(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Temperature-scaled log-softmax of both sides in the compute dtype.

    student_logits: [B, T, V] logits of q, any float dtype
    teacher_logits: [B, T, V] logits of p, same vocabulary
    mask:           [B, T] bool, True where the position is trained on
    returns:        (log q, log p), each [B, T, V] in fp32, or fp64 if either input is fp64
    """
    B, T, V = student_logits.shape
    assert teacher_logits.shape == (B, T, V), f"teacher {tuple(teacher_logits.shape)} != student {(B, T, V)}"
    assert mask.shape == (B, T), f"mask {tuple(mask.shape)} != {(B, T)}"
    assert mask.dtype == torch.bool, f"mask must be bool, got {mask.dtype}"
    _check_temperature(temperature)
    dtype = torch.promote_types(
        torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32
    )
    keep = mask.unsqueeze(-1)  # [B, T, 1]

    def scaled(logits: Tensor) -> Tensor:
        # Masked rows become uniform, so garbage there (NaN, all -inf) reaches neither value nor grad.
        x = torch.where(keep, logits, 0.0).to(dtype)  # [B, T, V]
        return x / temperature if temperature != 1.0 else x

    return scaled(student_logits).log_softmax(-1), scaled(teacher_logits).log_softmax(-1)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a ‖ b) = Σ_v a·(log a − log b) from log-probabilities [B, T, V] -> [B, T]; a = 0 terms are 0."""
    # Select before multiplying: 0·(−inf − −inf) is NaN in the value, and where() after the product
    # would still route NaN into the gradient.
    diff = torch.where(log_a > -math.inf, log_a - log_b, 0.0)  # [B, T, V]
    return (log_a.exp() * diff).sum(-1)


def _log_mixture(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w·a + (1 − w)·b), built in probability space from log-probabilities [B, T, V]."""
    if w == 0.0:
        return log_b
    if w == 1.0:
        return log_a
    # logaddexp(−inf, −inf) = −inf but its gradient is NaN; give it finite stand-ins there.
    dead = (log_a == -math.inf) & (log_b == -math.inf)  # [B, T, V]
    la = torch.where(dead, 0.0, log_a + math.log(w))
    lb = torch.where(dead, 0.0, log_b + math.log1p(-w))
    return torch.where(dead, -math.inf, torch.logaddexp(la, lb))


def forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, *, temperature: float = 1.0
) -> Tensor:
    """Forward KL(p ‖ q) at each position (mass-covering; the KD objective).

    student_logits: [B, T, V] logits of q, any float dtype (maths in fp32 at least)
    teacher_logits: [B, T, V] logits of p, same vocabulary
    mask:           [B, T] bool, True where the position is trained on
    returns:        [B, T] fp32 (fp64 for fp64 inputs), 0.0 where mask is False
    """
    logq, logp = _log_probs(student_logits, teacher_logits, mask, temperature)
    return _kl(logp, logq).masked_fill(~mask, 0.0)


def reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, *, temperature: float = 1.0
) -> Tensor:
    """Reverse KL(q ‖ p) at each position (mode-seeking; MiniLLM's single-step term).

    student_logits: [B, T, V] logits of q, any float dtype (maths in fp32 at least)
    teacher_logits: [B, T, V] logits of p, same vocabulary
    mask:           [B, T] bool, True where the position is trained on
    returns:        [B, T] fp32 (fp64 for fp64 inputs), 0.0 where mask is False
    """
    logq, logp = _log_probs(student_logits, teacher_logits, mask, temperature)
    return _kl(logq, logp).masked_fill(~mask, 0.0)


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """Generalised Jensen-Shannon divergence JSD(β) at each position.

    For 0 < β < 1, with m = β·p + (1 − β)·q:
        JSD(β) = β·KL(p ‖ m) + (1 − β)·KL(q ‖ m)
    which is Eq. (1) of GKD (Agarwal et al. 2024, arXiv 2306.13649) and TRL's
    ``GKDTrainer.generalized_jsd_loss``, so values agree with TRL; β = 0.5 is the usual JSD.
    β = 0 returns forward KL(p ‖ q) and β = 1 reverse KL(q ‖ p), as TRL does. Those are the limits of
    JSD(β)/β as β → 0 and of JSD(β)/(1 − β) as β → 1 (the gradient directions), not of JSD(β) itself,
    which tends to 0 at both ends: the value jumps at the endpoints.

    student_logits: [B, T, V] logits of q, any float dtype (maths in fp32 at least)
    teacher_logits: [B, T, V] logits of p, same vocabulary
    mask:           [B, T] bool, True where the position is trained on
    beta:           in [0, 1], the teacher's weight in the mixture m
    returns:        [B, T] fp32 (fp64 for fp64 inputs), 0.0 where mask is False
    """
    _check_unit_interval("beta", beta)
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, mask, temperature=temperature)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, mask, temperature=temperature)
    logq, logp = _log_probs(student_logits, teacher_logits, mask, temperature)
    logm = _log_mixture(logp, logq, beta)  # [B, T, V]
    return (beta * _kl(logp, logm) + (1.0 - beta) * _kl(logq, logm)).masked_fill(~mask, 0.0)


def total_variation(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, *, temperature: float = 1.0
) -> Tensor:
    """Total variation distance ½·Σ_v |p − q| at each position, in [0, 1].

    student_logits: [B, T, V] logits of q, any float dtype (maths in fp32 at least)
    teacher_logits: [B, T, V] logits of p, same vocabulary
    mask:           [B, T] bool, True where the position is trained on
    returns:        [B, T] fp32 (fp64 for fp64 inputs), 0.0 where mask is False
    """
    logq, logp = _log_probs(student_logits, teacher_logits, mask, temperature)
    return (0.5 * (logp.exp() - logq.exp()).abs().sum(-1)).masked_fill(~mask, 0.0)


def skew_forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> Tensor:
    """α-skew forward KL(p ‖ α·p + (1 − α)·q) at each position (DistiLLM, Ko et al. 2024, arXiv 2402.03898).

    Same convention as DistiLLM's ``skewed_forward_kl(lam)`` with α = lam (default 0.1 there too):
    α = 0 is plain forward KL(p ‖ q), α = 1 gives 0. Mixing p into the student side bounds the log-ratio
    by log(1/α) where q is near 0.

    student_logits: [B, T, V] logits of q, any float dtype (maths in fp32 at least)
    teacher_logits: [B, T, V] logits of p, same vocabulary
    mask:           [B, T] bool, True where the position is trained on
    alpha:          in [0, 1], the teacher's weight in the skewed student distribution
    returns:        [B, T] fp32 (fp64 for fp64 inputs), 0.0 where mask is False
    """
    _check_unit_interval("alpha", alpha)
    logq, logp = _log_probs(student_logits, teacher_logits, mask, temperature)
    return _kl(logp, _log_mixture(logp, logq, alpha)).masked_fill(~mask, 0.0)


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> Tensor:
    """α-skew reverse KL(q ‖ α·q + (1 − α)·p) at each position (DistiLLM, Ko et al. 2024, arXiv 2402.03898).

    Same convention as DistiLLM's ``skewed_reverse_kl(lam)`` with α = lam (default 0.1 there too):
    α = 0 is plain reverse KL(q ‖ p), α = 1 gives 0.

    student_logits: [B, T, V] logits of q, any float dtype (maths in fp32 at least)
    teacher_logits: [B, T, V] logits of p, same vocabulary
    mask:           [B, T] bool, True where the position is trained on
    alpha:          in [0, 1], the student's weight in the skewed teacher distribution
    returns:        [B, T] fp32 (fp64 for fp64 inputs), 0.0 where mask is False
    """
    _check_unit_interval("alpha", alpha)
    logq, logp = _log_probs(student_logits, teacher_logits, mask, temperature)
    return _kl(logq, _log_mixture(logq, logp, alpha)).masked_fill(~mask, 0.0)


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "tvd": total_variation,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
}


def get_divergence(name: str, **params: float) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The divergence registered as ``name`` with its keyword parameters bound and checked now.

    e.g. ``get_divergence("jsd", beta=0.5)(student_logits, teacher_logits, mask) -> [B, T]``.
    Raises ValueError for an unknown name, an unknown parameter or an out-of-range value.
    """
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; valid names: {sorted(DIVERGENCES)}")
    fn = DIVERGENCES[name]
    valid = [
        p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"divergence {name!r} got invalid parameter(s) {unknown}; valid parameters: {valid}")
    for key, value in params.items():
        if key == "temperature":
            _check_temperature(value)
        else:
            _check_unit_interval(key, value)
    return functools.partial(fn, **params)
