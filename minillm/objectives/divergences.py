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

Closed-form logit gradients (`get_logit_grad`), for the chunked head path
(`chunked.chunked_head_loss(closed_form=True)`), which gives only valid rows and no autograd. With
x = student logits / temperature, q = softmax(x) and g_v = ∂D/∂q_v, every D here has
    ∂D/∂x_v = q_v · (g_v − Σ_u q_u g_u)
and g is, per divergence (m the mixture each one defines):
    forward KL(p ‖ q):             g = −p/q                 → ∂D/∂x = q − p
    reverse KL(q ‖ p):             g = log(q/p) + 1         → ∂D/∂x = q·(log(q/p) − KL)
    JSD(β), m = βp + (1 − β)q:     g = (1 − β)·log(q/m)     (the p/m terms cancel against m's derivative)
    TVD ½Σ|p − q|:                 g = ½·sign(q − p), with sign(0) = 0: at p_v = q_v the subgradient taken
                                   is 0 for that entry, the one autograd gives through |·|
    skew forward KL(p ‖ m), m = αp + (1 − α)q:  g = −(1 − α)·p/m
    skew reverse KL(q ‖ m), m = αq + (1 − α)p:  g = log(q/m) + 1 − α·q/m
(constants in g cancel). Entries with q_v = 0 (a −inf logit) get a zero gradient and, where the weighting
probability is 0, a zero term, as in the autograd path.
"""

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

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


def _bind(name: str, params: dict[str, float]) -> Callable[..., Tensor]:
    """The divergence registered as ``name`` after checking ``params`` against its keyword parameters."""
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
    return fn


def get_divergence(name: str, **params: float) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The divergence registered as ``name`` with its keyword parameters bound and checked now.

    e.g. ``get_divergence("jsd", beta=0.5)(student_logits, teacher_logits, mask) -> [B, T]``.
    Raises ValueError for an unknown name, an unknown parameter or an out-of-range value.
    """
    return functools.partial(_bind(name, params), **params)


# ------------------------------------------------------------------------------------------------
# closed-form logit gradients (module docstring), on [C, V] rows that are all trained on


def log_softmax_inplace(x: Tensor, work: Tensor) -> Tensor:
    """x [C, V] becomes log softmax(x) in place; returns softmax(x), written into `work` [C, V]."""
    top = x.amax(-1, keepdim=True)  # [C, 1]
    torch.sub(x, top, out=work).exp_()
    z = work.sum(-1, keepdim=True)  # [C, 1]
    x.sub_(top + z.log())
    return work.div_(z)


def _log_ratio_(d: Tensor) -> Tensor:
    """d [C, V] = log a − log b becomes the KL summand's log-ratio with a = 0 entries set to 0, in place.
    log b ≤ 0, so d is −inf only where log a = −inf, and NaN only where both are −inf; +inf (a > 0 = b)
    stays, so a truly infinite KL comes out +inf."""
    return d.nan_to_num_(nan=0.0, posinf=math.inf, neginf=0.0)


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Σ_v a_v·b_v per row of [C, V] tensors, [C], without a [C, V] product."""
    return torch.bmm(a[:, None, :], b[:, :, None])[:, 0, 0]


def _centre_(g: Tensor, q: Tensor) -> Tensor:
    """g [C, V] := q·(g − Σ_u q_u g_u), the softmax chain rule ∂D/∂x from g = ∂D/∂q, in place."""
    return g.sub_(_rowdot(q, g)[:, None]).mul_(q)


# Each takes log q, q [C, V] (read only), log p [C, V] and scratch w1, w2 [C, V] (may be overwritten) and
# returns (D [C], ∂D/∂x [C, V] in one of the writable buffers), x the tempered student logits.
Terms = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def _forward_kl_terms(logq: Tensor, q: Tensor, logp: Tensor, w1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor]:
    p = torch.exp(logp, out=w1)
    value = _rowdot(p, _log_ratio_(logp.sub_(logq)))  # Σ p·log(p/q)
    return value, torch.sub(q, p, out=w1)


def _reverse_kl_terms(logq: Tensor, q: Tensor, logp: Tensor, w1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor]:
    d = _log_ratio_(logp.sub_(logq).neg_())  # [C, V] log(q/p)
    value = _rowdot(q, d)
    return value, d.sub_(value[:, None]).mul_(q)


def _jsd_terms(
    logq: Tensor, q: Tensor, logp: Tensor, w1: Tensor, w2: Tensor, *, beta: float
) -> tuple[Tensor, Tensor]:
    if beta == 0.0:
        return _forward_kl_terms(logq, q, logp, w1, w2)
    if beta == 1.0:
        return _reverse_kl_terms(logq, q, logp, w1, w2)
    p = torch.exp(logp, out=w1)
    logm = torch.mul(p, beta, out=w2).add_(q, alpha=1.0 - beta).log_()  # [C, V]
    kl_pm = _rowdot(p, _log_ratio_(logp.sub_(logm)))
    d = _log_ratio_(torch.sub(logq, logm, out=w1))  # [C, V] log(q/m)
    kl_qm = _rowdot(q, d)
    return beta * kl_pm + (1.0 - beta) * kl_qm, d.sub_(kl_qm[:, None]).mul_(q).mul_(1.0 - beta)


def _tvd_terms(logq: Tensor, q: Tensor, logp: Tensor, w1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor]:
    # p − q with both sides exp(log-softmax), as `total_variation`: equal logits give exactly 0 here
    d = torch.exp(logp, out=w1).sub_(torch.exp(logq, out=w2))  # [C, V]
    value = 0.5 * torch.linalg.vector_norm(d, ord=1, dim=-1)
    return value, _centre_(d.sign_().mul_(-0.5), q)  # g = ½·sign(q − p), sign(0) = 0


def _skew_forward_kl_terms(
    logq: Tensor, q: Tensor, logp: Tensor, w1: Tensor, w2: Tensor, *, alpha: float
) -> tuple[Tensor, Tensor]:
    if alpha == 0.0:
        return _forward_kl_terms(logq, q, logp, w1, w2)
    p = torch.exp(logp, out=w1)
    m = torch.mul(p, alpha, out=w2).add_(q, alpha=1.0 - alpha)  # [C, V]
    ratio = torch.div(p, m, out=logp).nan_to_num_(nan=0.0)  # [C, V] p/m ≤ 1/α, 0 where m = 0
    value = _rowdot(p, _log_ratio_(torch.log(ratio, out=w2)))  # Σ p·log(p/m)
    return value, _centre_(ratio.mul_(alpha - 1.0), q)  # g = −(1 − α)·p/m


def _skew_reverse_kl_terms(
    logq: Tensor, q: Tensor, logp: Tensor, w1: Tensor, w2: Tensor, *, alpha: float
) -> tuple[Tensor, Tensor]:
    if alpha == 0.0:
        return _reverse_kl_terms(logq, q, logp, w1, w2)
    # m/q = α + (1 − α)·exp(log p − log q): from the log-ratio, not from m, which in fp32 would carry
    # exp(log p)'s rounding of ~|log p|·ε into a KL that is small where p ≈ q
    m_over_q = torch.sub(logp, logq, out=w1).exp_().mul_(1.0 - alpha).add_(alpha)  # [C, V]
    d = _log_ratio_(torch.log(m_over_q, out=logp).neg_())  # [C, V] log(q/m), 0 where q = 0
    value = _rowdot(q, d)
    ratio = m_over_q.reciprocal_().nan_to_num_(nan=0.0)  # [C, V] q/m, 0 where q = 0
    return value, _centre_(d.sub_(ratio, alpha=alpha), q)


TERMS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "forward_kl": _forward_kl_terms,
    "reverse_kl": _reverse_kl_terms,
    "jsd": _jsd_terms,
    "tvd": _tvd_terms,
    "skew_forward_kl": _skew_forward_kl_terms,
    "skew_reverse_kl": _skew_reverse_kl_terms,
}


@dataclass(frozen=True)
class LogitGrad:
    """A divergence's per-row value and its gradient w.r.t. the student logits, in closed form.

    terms:       the divergence's `Terms` with its parameters bound (`get_logit_grad`)
    temperature: both logits are divided by it, as in the [B, T, V] functions
    """

    terms: Terms
    temperature: float = 1.0

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor, work: Tensor) -> tuple[Tensor, Tensor]:
        """D and ∂D/∂(student logits) of C rows, every row trained on; no allocation of [C, V] tensors.

        student_logits: [C, V] raw logits of q, fp32 or fp64; left holding log q (at the temperature)
        teacher_logits: [C, V] raw logits of p, same dtype; overwritten
        work:           [3, C, V] scratch in that dtype; work[0] is left holding q (at the temperature)
        returns:        D [C] and its gradient [C, V], in teacher_logits' or work[1:]'s storage
        """
        C, V = student_logits.shape
        assert teacher_logits.shape == (C, V), f"teacher {tuple(teacher_logits.shape)} != student {(C, V)}"
        assert work.shape == (3, C, V), f"work {tuple(work.shape)} != {(3, C, V)}"
        if self.temperature != 1.0:
            student_logits.div_(self.temperature)
            teacher_logits.div_(self.temperature)
        logp = teacher_logits
        log_softmax_inplace(logp, work[0])  # p is not kept: the terms that need it take exp(log p)
        q = log_softmax_inplace(student_logits, work[0])
        value, grad = self.terms(student_logits, q, logp, work[1], work[2])
        return value, grad.div_(self.temperature) if self.temperature != 1.0 else grad


def get_logit_grad(name: str, **params: float) -> LogitGrad:
    """The closed-form twin of ``get_divergence(name, **params)`` (same names, parameters and checks):
    ``get_logit_grad("jsd", beta=0.5)(student_logits [C, V], teacher_logits [C, V], work [3, C, V])
    -> (D [C], ∂D/∂student_logits [C, V])``."""
    _bind(name, params)
    temperature = params.pop("temperature", 1.0)
    return LogitGrad(functools.partial(TERMS[name], **params), temperature)
