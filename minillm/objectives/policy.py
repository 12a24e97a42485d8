"""MiniLLM's long-horizon part: rewards, advantages, whitening, the clipped policy-gradient loss, mixing.

Method (Gu et al., ICLR 2024, arXiv 2306.08543, section 2.2; equation numbers of the ICLR version). The
student q_θ minimises KL(q_θ ‖ p) over its own responses (Eq. 1). Its gradient is a policy gradient
with per-token reward r_t = log p(y_t|y<t) − log q(y_t|y<t) (Eq. 2), split into a single-step part, the
exact full-vocabulary KL at each position (`divergences.reverse_kl`, not here), and a long-horizon part
−Σ_t R_{t+1} ∇log q(y_t) (Eq. 3). Responses come from p̃ = α·p + (1−α)·q_old (Eq. 4) with the importance
weight w_t = q_old(y_t)/p̃(y_t) (Eq. 5); R_{t+1} is divided by the number of its terms (Eq. 6); the update
is PPO-style with a clipped ratio. Everything here is a pure function of [B, T] tensors; reductions and
the cross-rank all-reduce are the caller's.

Official code read: microsoft/LMOps, folder minillm/ —
  losses.py   @ 7b14befcfabd699129d5223500c47742f31b4d88 (`Loss._get_advantages_and_returns` ~L27-56,
              `_pg_loss` ~L58-96, `_reg_loss` ~L98-108, `ppo_loss`, `pt_loss`)
  sampler.py  @ 19f288d4dbabd30955fb314183d13de2f3e7d6a9 (`PPOSampler.run_sample`: rewards, w)
  utils.py    @ 2553a9df8757f58728c670d2adf2a9979eb61bb0 (`whiten`, `get_global_statistics`)
  scripts/gpt2/minillm/train_base_xl.sh @ 46f17dec81ac71595ec2d5d05c38da9c142376ac (the flag values)

Official behaviour and departures (defaults here are neutral; the config picks the official values):
- Return: official is inclusive, Σ_{t'≥t} γ^{t'−t} r_t' with γ = 0.95, *and* adds the single-step term,
  which counts E[r_t ∇log q_t] twice (see tests/test_unbiased.py). The paper's Eq. 3 pairs the
  single-step term with the exclusive R_{t+1}, no γ. `inclusive=`, `gamma=`.
- Length normalisation: official divides by the number of valid tokens from t to the end (the number of
  terms of the inclusive sum) and does so unconditionally (`--length-norm` only changes logged stats at
  that commit). The paper's Eq. 6 writes 1/(T−t−1), one less than the T−t terms of R_{t+1}; we divide
  by the number of summed terms in both conventions. `length_norm=`.
- Whitening: official whitens each PPO mini-batch (inside the loss) as one padded [B, T] tensor, padded
  zeros included, across ranks, with the population variance (`torch.var_mean`'s N−1 on a single
  process). `whiten="official"` reproduces the padded statistic; `"masked"` uses valid positions only;
  `"off"` none. Whitening is scale-free, so `reward_scale` only matters through `reward_clip` or "off".
- The PPO clip acts on ρ = exp(logq_new − logq_old)·w, i.e. *including* the mixing weight, as in the
  official `_pg_loss` (no switch): with α > 0 tokens are clipped from the first inner step on (w ≠ 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from minillm.objectives.divergences import log_softmax_inplace

WHITEN_MODES = ("masked", "official", "off")
AllReduce = Callable[[Tensor], Tensor]


def _compute_dtype(x: Tensor) -> torch.dtype:
    # fp32 at least, keep fp64 for the float64 references and the enumeration tests
    return torch.promote_types(x.dtype, torch.float32)


def token_rewards(logp_teacher: Tensor, logq_old: Tensor, mask: Tensor) -> Tensor:
    """Per-token reward r_t = log p(y_t|y<t) − log q_old(y_t|y<t) (Eq. 2), a constant of the update.

    logp_teacher: [B, T] teacher log-prob of each sampled token
    logq_old:     [B, T] rollout-time student log-prob of each sampled token
    mask:         [B, T] bool, True on response tokens up to and including the first EOS
    returns:      [B, T] detached, fp32 (fp64 stays fp64), 0.0 where mask is False
    """
    B, T = logp_teacher.shape
    assert logq_old.shape == (B, T) and mask.shape == (B, T) and mask.dtype == torch.bool
    dt = _compute_dtype(logp_teacher)
    # Official sampler.py: rewards = t_rewards + ent_rewards = log p − log q_old, under no_grad.
    r = logp_teacher.detach().to(dt) - logq_old.detach().to(dt)
    return torch.where(mask, r, torch.zeros((), dtype=dt))


def masked_mean_var(
    values: Tensor, mask: Tensor, *, unbiased: bool = False, all_reduce: AllReduce | None = None
) -> tuple[Tensor, Tensor]:
    """Mean and variance of `values` over the True positions of `mask`, optionally over all ranks.

    values:     [B, T] float
    mask:       [B, T] bool; positions entering the statistic
    unbiased:   divide the squared deviations by n − 1 instead of n
    all_reduce: sums a tensor over ranks and returns the sum (e.g. wraps `dist.all_reduce`); None = local.
                Two passes, like the official `get_global_statistics`: (sum, count) first, then the squared
                deviations from the global mean.
    returns:    (mean, var), 0-d tensors; both 0 when no position is valid
    """
    B, T = values.shape
    assert mask.shape == (B, T) and mask.dtype == torch.bool
    v = values.to(_compute_dtype(values))
    zero = torch.zeros((), dtype=v.dtype)
    sum_count = torch.stack([torch.where(mask, v, zero).sum(), mask.sum().to(v.dtype)])  # [2]
    if all_reduce is not None:
        sum_count = all_reduce(sum_count)
    count = sum_count[1]
    mean = sum_count[0] / count.clamp(min=1.0)
    sq = torch.where(mask, (v - mean) ** 2, zero).sum()
    if all_reduce is not None:
        sq = all_reduce(sq)
    var = sq / (count - 1.0 if unbiased else count).clamp(min=1.0)
    return mean, var


def whiten(
    values: Tensor,
    mask: Tensor,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    unbiased: bool = False,
    all_reduce: AllReduce | None = None,
) -> Tensor:
    """(values − mean) / sqrt(var + eps) with statistics over the True positions of `mask`.

    values:     [B, T] float
    mask:       [B, T] bool; positions entering the statistic and kept in the output
    shift_mean: False adds the mean back after scaling, (x − μ)/σ + μ, as the official `whiten` does
    returns:    [B, T], 0.0 where mask is False
    """
    B, T = values.shape
    assert mask.shape == (B, T) and mask.dtype == torch.bool
    v = values.to(_compute_dtype(values))
    mean, var = masked_mean_var(v, mask, unbiased=unbiased, all_reduce=all_reduce)
    # Official utils.py `whiten`: (xs − mean) * rsqrt(var + 1e-8), then `+= mean` when not shift_mean.
    out = (v - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, torch.zeros((), dtype=v.dtype))


_whiten_fn = whiten  # `advantages` takes a `whiten` mode argument that shadows this function


def advantages(
    rewards: Tensor,
    mask: Tensor,
    *,
    gamma: float,
    inclusive: bool,
    length_norm: bool,
    reward_scale: float,
    reward_clip: float | None,
    whiten: str,
    all_reduce: AllReduce | None = None,
) -> Tensor:
    """Long-horizon advantage A_t of each sampled token (Eq. 3, 6; official `_get_advantages_and_returns`).

    rewards:      [B, T] per-token rewards r_t (`token_rewards`), 0.0 where mask is False
    mask:         [B, T] bool, True on response tokens up to and including the first EOS
    gamma:        discount; official 0.95, paper 1.0
    inclusive:    True: G_t = Σ_{t'≥t} γ^{t'−t} r_t' (official). False: R_{t+1} = G_{t+1} (paper, Eq. 3),
                  to pair with the single-step term
    length_norm:  divide by the number of valid tokens the sum runs over (from t, or from t+1), at least 1
    reward_scale: multiplies r before clipping; official 2.0 (`--reward-scaling 0.5` divides by 0.5)
    reward_clip:  clamp scaled r to [−c, c]; official 100; None = no clip
    whiten:       "masked" (valid positions), "official" (all B·T positions, padded ones included), "off"
    all_reduce:   cross-rank sum for the whitening statistic (see `masked_mean_var`)
    returns:      [B, T] detached, 0.0 where mask is False
    """
    B, T = rewards.shape
    assert mask.shape == (B, T) and mask.dtype == torch.bool
    assert whiten in WHITEN_MODES, f"whiten must be one of {WHITEN_MODES}, got {whiten!r}"
    dt = _compute_dtype(rewards)
    zero = torch.zeros((), dtype=dt)
    # Official sampler.py: rewards / reward_scaling, then torch.clip(±cliprange_reward), at rollout time.
    r = torch.where(mask, rewards.detach().to(dt) * reward_scale, zero)
    if reward_clip is not None:
        r = r.clamp(-reward_clip, reward_clip)
    # Discounted reverse cumulative sum, G_t = r_t + γ·G_{t+1} (official loop over reversed(range(T))).
    g = torch.zeros_like(r)  # [B, T]
    acc = torch.zeros(B, dtype=dt, device=r.device)  # [B] running G_{t+1}
    for t in reversed(range(T)):
        acc = r[:, t] + gamma * acc
        g[:, t] = acc
    # Valid tokens from t to the end: official `lens = mask − cumsum(mask) + total`, 0 → 1.
    m = mask.to(dt)
    n_from_t = m.flip(1).cumsum(1).flip(1)  # [B, T]
    if inclusive:
        ret, n_terms = g, n_from_t
    else:
        # R_{t+1} = G_{t+1}, and 0 after the last position; it sums the tokens after t.
        ret = torch.cat([g[:, 1:], torch.zeros(B, 1, dtype=dt, device=r.device)], dim=1)  # [B, T]
        n_terms = n_from_t - m
    if length_norm:
        ret = ret / n_terms.clamp(min=1.0)
    if whiten == "masked":
        ret = _whiten_fn(ret, mask, all_reduce=all_reduce)
    elif whiten == "official":
        # Official `whiten(advantages)` on the padded tensor: the statistic counts every B·T position,
        # whose padded entries are 0 here as in the official code (their rewards are 0).
        ret = _whiten_fn(ret, torch.ones_like(mask), all_reduce=all_reduce)
    return torch.where(mask, ret, zero).detach()


def ppo_policy_loss(
    logq_new: Tensor,
    logq_old: Tensor,
    log_w: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps: float,
) -> tuple[Tensor, Tensor]:
    """Per-token clipped policy-gradient loss max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)) (official `_pg_loss`).

    ρ_t = exp(logq_new − logq_old + log_w) = q_new(y_t)/p̃(y_t): the PPO ratio times the rollout-time mixing
    weight w_t = q_old/p̃. As in the official code the clip acts on ρ *including* w, and w (like logq_old
    and A) is a constant: only logq_new carries a gradient. At θ = θ_old, ∇ loss_t = −A_t·w_t·∇log q(y_t).

    logq_new:   [B, T] current student log-prob of each sampled token (differentiable)
    logq_old:   [B, T] rollout-time student log-prob
    log_w:      [B, T] log importance weight log q_old − log p̃ (`log_importance_weight`); 0 when α = 0
    advantages: [B, T] A_t (`advantages`)
    mask:       [B, T] bool, True on trained tokens
    clip_eps:   ε; official 0.2 (`--cliprange`); math.inf disables the clip
    returns:    (loss [B, T], 0.0 where mask is False; clipped [B, T] bool, True where the clipped branch
                is strictly larger, i.e. the token gets no gradient — the official `pg_clipfrac` event)
    """
    B, T = logq_new.shape
    assert logq_old.shape == (B, T) and log_w.shape == (B, T) and advantages.shape == (B, T)
    assert mask.shape == (B, T) and mask.dtype == torch.bool
    dt = _compute_dtype(logq_new)
    zero = torch.zeros((), dtype=dt)
    # Mask the log-ratio before exp, so padded garbage (even −inf) yields neither inf nor NaN gradients.
    log_rho = logq_new.to(dt) - logq_old.detach().to(dt) + log_w.detach().to(dt)
    rho = torch.where(mask, log_rho, zero).exp()  # [B, T]
    adv = torch.where(mask, advantages.detach().to(dt), zero)
    loss_unclipped = -adv * rho
    loss_clipped = -adv * rho.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = torch.where(mask, torch.maximum(loss_unclipped, loss_clipped), zero)
    clipped = mask & (loss_clipped > loss_unclipped)
    return loss, clipped


def mixture_log_prob(logq: Tensor, logp: Tensor, alpha: float) -> Tensor:
    """log p̃(y_t) = log(α·p(y_t) + (1−α)·q(y_t)) of the sampled tokens (Eq. 4), elementwise.

    logq:    [B, T] student log-prob of each sampled token
    logp:    [B, T] teacher log-prob of the same tokens
    alpha:   teacher weight α in [0, 1]; official 0.2 (`--teacher-mixed-alpha`)
    returns: [B, T], in the promoted dtype of the inputs (at least fp32)
    """
    B, T = logq.shape
    assert logp.shape == (B, T)
    assert 0.0 <= alpha <= 1.0, f"alpha must be in [0, 1], got {alpha}"
    dt = torch.promote_types(_compute_dtype(logq), logp.dtype)
    log_a = math.log(alpha) if alpha > 0.0 else -math.inf
    log_1ma = math.log1p(-alpha) if alpha < 1.0 else -math.inf
    # logaddexp instead of the official log((1−α)·exp(logq) + α·exp(logp)): same value, no underflow.
    return torch.logaddexp(logp.to(dt) + log_a, logq.to(dt) + log_1ma)


def log_importance_weight(logq_old: Tensor, logp: Tensor, alpha: float) -> Tensor:
    """log w_t = log q_old(y_t) − log p̃(y_t), the per-token mixing weight (Eq. 5), detached.

    The paper approximates the prefix weight Π_{t'≤t} q/p̃ by this single-token ratio; so does the
    official sampler.py (`log_w = logprobs − mix_logprobs`, under no_grad). 0 when α = 0.

    logq_old: [B, T] rollout-time student log-prob of each sampled token
    logp:     [B, T] teacher log-prob of the same tokens
    returns:  [B, T]
    """
    return (logq_old.detach() - mixture_log_prob(logq_old.detach(), logp.detach(), alpha)).detach()


@torch.no_grad()
def policy_logit_grad(
    logits: Tensor,
    teacher_logp: Tensor | None,
    work: Tensor,
    targets: Tensor,
    logq_old: Tensor,
    log_w: Tensor,
    advantages: Tensor,
    *,
    clip_eps: float,
    single_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The PPO loss and the single-step KL(q ‖ p) of C sampled positions, with their gradient w.r.t. the
    student logits in closed form (for `chunked_head_loss(closed_form=True)`).

    With s the student logits, q = softmax(s), c_n = ∂pg_n/∂log q(y_n) (autograd on [C] vectors through
    `ppo_policy_loss`, so the clip semantics are that function's) and u_n the single-step weight:
        ∂pg_n/∂s_v     = c_n · (1[v = y_n] − q_v)
        ∂(u_n·KL_n)/∂s_v = u_n · q_v · (log q_v − log p_v − KL_n)
    Written by hand because autograd through log_softmax / KL keeps several [C, V] temporaries and twice
    the passes over them; here everything happens in the logits and work buffers.

    logits:         [C, V] student logits; overwritten in place when already in the compute dtype (fp32,
                    or fp64 for references), else upcast into a new tensor
    teacher_logp:   [C, V] the teacher's log-probabilities log p (normalised), read only; None leaves out
                    the single-step term
    work:           [C, V] scratch in the compute dtype
    targets:        [C] long sampled tokens y_n; logq_old, log_w, advantages: [C] as in `ppo_policy_loss`
    single_weight:  [C] constant weights u_n of the single-step term, or None for 1 (official code); the
                    paper's Eq. 7 weighs it by the rollout-time importance weight w_n = exp(log_w_n)
    returns:        pg [C], single [C] u_n·KL_n (zeros when teacher_logp is None), clipped [C] bool, and the
                    gradient of Σ_n (pg_n + single_n) w.r.t. the logits, [C, V] (one of the buffers)
    """
    C, V = logits.shape
    dt = _compute_dtype(logits)
    assert work.shape == (C, V) and work.dtype == dt, f"work {tuple(work.shape)} {work.dtype}, want {dt}"
    assert targets.shape == logq_old.shape == log_w.shape == advantages.shape == (C,)
    logq = logits.to(dt)  # [C, V], log q after the next line
    q = log_softmax_inplace(logq, work)  # [C, V]
    pick = targets[:, None]
    logq_new = logq.gather(-1, pick)[:, 0].requires_grad_()  # [C]
    ones = torch.ones(1, C, dtype=torch.bool, device=logits.device)
    with torch.enable_grad():
        pg, clipped = ppo_policy_loss(
            logq_new[None], logq_old[None], log_w[None], advantages[None], ones, clip_eps=clip_eps
        )
        (coef,) = torch.autograd.grad(pg.sum(), logq_new)  # [C]
    coef = coef.to(dt)[:, None]  # [C, 1]
    if teacher_logp is None:
        single = logq.new_zeros(C)
        grad = q.mul_(-coef)
    else:
        grad = logq.sub_(teacher_logp)  # [C, V] log q − log p (log q is not needed any more)
        single = torch.bmm(q[:, None, :], grad[:, :, None])[:, 0, 0]  # [C] Σ_v q_v (log q_v − log p_v)
        if single_weight is None:
            grad.sub_(single[:, None] + coef).mul_(q)
        else:
            u = single_weight.detach().to(dt)  # [C]
            assert u.shape == (C,)
            grad.sub_(single[:, None]).mul_(u[:, None]).sub_(coef).mul_(q)
            single = single * u
    grad.scatter_add_(-1, pick, coef)
    return pg[0].detach(), single, clipped[0], grad
