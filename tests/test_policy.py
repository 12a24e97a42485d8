"""minillm.objectives.policy against the float64 loop references, hand-sized cases and closed forms."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from reference import kl_slow, softmax_slow
from reference_pg import mixture_slow, ppo_loss_slow, returns_slow, rewards_slow, whiten_slow
from tolerances import TOL

from minillm.objectives.chunked import Head, chunked_head_loss
from minillm.objectives.policy import (
    advantages,
    log_importance_weight,
    masked_mean_var,
    mixture_log_prob,
    policy_logit_grad,
    ppo_policy_loss,
    token_rewards,
    whiten,
)

EOS = 2
# float64 in, float64 maths: only summation order differs from the loop reference (tests/tolerances.py).
F64 = TOL[torch.float64]
# The official flag values (scripts/gpt2/minillm/train_base_xl.sh): γ 0.95, reward scaling 1/0.5, clip 100.
OFFICIAL = dict(gamma=0.95, inclusive=True, length_norm=True, reward_scale=2.0, reward_clip=100.0)


def ragged_batch(B: int, T: int, seed: int, V: int = 5) -> dict[str, torch.Tensor]:
    """Sampled-looking responses: ragged generation lengths, EOS (= pad) in the middle of some rows.

    The mask is True up to and including the first EOS, and never past the row's generated length;
    it is built from lengths, never from token ids equal to pad."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, T), generator=g)
    gen_len = torch.randint(1, T + 1, (B,), generator=g)
    is_eos = tokens == EOS
    first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full((B,), T))
    length = torch.minimum(first_eos + 1, gen_len)  # [B], EOS is a target
    mask = torch.arange(T)[None, :] < length[:, None]  # [B, T]
    garbage = torch.full((B, T), 37.0, dtype=torch.float64)  # padded positions hold junk, never read
    logp = torch.where(mask, -torch.rand(B, T, generator=g, dtype=torch.float64) * 4, garbage)
    logq = torch.where(mask, -torch.rand(B, T, generator=g, dtype=torch.float64) * 4, garbage)
    logq_new = torch.where(mask, logq + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64), garbage)
    adv = torch.where(mask, torch.randn(B, T, generator=g, dtype=torch.float64), garbage)
    return dict(tokens=tokens, length=length, mask=mask, logp=logp, logq=logq, logq_new=logq_new, adv=adv)


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    b = ragged_batch(6, 9, seed=0)
    m = b["mask"]
    assert (~m).any() and m.any(1).all() and (m.sum(1) < 9).any()  # padding and ragged lengths present
    return b


def test_token_rewards_matches_reference(batch):
    r = token_rewards(batch["logp"], batch["logq"], batch["mask"])
    torch.testing.assert_close(r, rewards_slow(batch["logp"], batch["logq"], batch["mask"]), **F64)
    assert not r.requires_grad


@pytest.mark.parametrize("gamma", [1.0, 0.95, 0.5])
@pytest.mark.parametrize("inclusive", [True, False])
@pytest.mark.parametrize("length_norm", [True, False])
@pytest.mark.parametrize("scale_clip", [(1.0, None), (2.0, 100.0), (2.0, 1.5)])
def test_advantages_unwhitened_match_reference(batch, gamma, inclusive, length_norm, scale_clip):
    scale, clip = scale_clip
    r = token_rewards(batch["logp"], batch["logq"], batch["mask"])
    kw = dict(gamma=gamma, inclusive=inclusive, length_norm=length_norm, reward_scale=scale, reward_clip=clip)
    got = advantages(r, batch["mask"], whiten="off", **kw)
    torch.testing.assert_close(got, returns_slow(r, batch["mask"], **kw), **F64)


@pytest.mark.parametrize("mode", ["masked", "official"])
@pytest.mark.parametrize("inclusive", [True, False])
def test_advantages_whitened_match_reference(batch, mode, inclusive):
    r = token_rewards(batch["logp"], batch["logq"], batch["mask"])
    kw = dict(gamma=0.95, inclusive=inclusive, length_norm=True, reward_scale=2.0, reward_clip=100.0)
    got = advantages(r, batch["mask"], whiten=mode, **kw)
    ret = returns_slow(r, batch["mask"], **kw)  # 0 on padded positions, as in the official tensor
    want = whiten_slow(ret, batch["mask"], all_positions=(mode == "official"))
    torch.testing.assert_close(got, want, **F64)


def test_advantages_hand_sized():
    # r = [1, 2, 3], γ = 0.5, one row, no padding.
    #   inclusive G: G3 = 3, G2 = 2 + 0.5·3 = 3.5, G1 = 1 + 0.5·3.5 = 2.75; tokens from t: 3, 2, 1
    #     → normalised [2.75/3, 3.5/2, 3/1] = [0.916667, 1.75, 3]
    #   exclusive R_{t+1}: [G2, G3, 0] = [3.5, 3, 0]; tokens after t: 2, 1, 0→1 → [1.75, 3, 0]
    #   scale 2, clip 5: r' = [2, 4, 5]; inclusive G: 5, 4 + 2.5 = 6.5, 2 + 3.25 = 5.25
    r = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    m = torch.ones(1, 3, dtype=torch.bool)
    kw = dict(gamma=0.5, reward_scale=1.0, reward_clip=None, whiten="off")
    inc = advantages(r, m, inclusive=True, length_norm=True, **kw)
    exc = advantages(r, m, inclusive=False, length_norm=True, **kw)
    torch.testing.assert_close(inc, torch.tensor([[2.75 / 3, 1.75, 3.0]], dtype=torch.float64))
    torch.testing.assert_close(exc, torch.tensor([[1.75, 3.0, 0.0]], dtype=torch.float64))
    kw2 = dict(gamma=0.5, reward_scale=2.0, reward_clip=5.0, whiten="off", inclusive=True, length_norm=False)
    torch.testing.assert_close(advantages(r, m, **kw2), torch.tensor([[5.25, 6.5, 5.0]], dtype=torch.float64))


def test_whitening_modes_hand_sized():
    # Values [[1, 3], [2, pad]]; the official padded tensor holds 0 at the pad.
    #   masked:   {1, 3, 2}: μ = 2, σ² = 2/3       → 3 ↦ 1/√(2/3) = 1.224745
    #   official: {1, 3, 2, 0}: μ = 1.5, σ² = 1.25 → 3 ↦ 1.5/√1.25 = 1.341641, pad stays 0 in the output
    v = torch.tensor([[1.0, 3.0], [2.0, 0.0]], dtype=torch.float64)
    m = torch.tensor([[True, True], [True, False]])
    masked = whiten(v, m)
    official = whiten(v, torch.ones_like(m)).masked_fill(~m, 0.0)
    assert masked[0, 1].item() == pytest.approx(1.0 / math.sqrt(2.0 / 3.0 + 1e-8), rel=1e-12)
    assert official[0, 1].item() == pytest.approx(1.5 / math.sqrt(1.25 + 1e-8), rel=1e-12)
    assert masked[1, 1].item() == 0.0 and official[1, 1].item() == 0.0


def test_whitening_modes_differ_exactly_as_expected(batch):
    """With n valid of N = B·T positions and zeros elsewhere, the official statistic is μ_all = S/N,
    σ²_all = Q/N − μ_all² (S, Q: sum and sum of squares of the valid values), against μ = S/n,
    σ² = Q/n − μ² for the masked one. Without padding the two modes agree exactly."""
    m = batch["mask"]
    r = token_rewards(batch["logp"], batch["logq"], m)
    kw = OFFICIAL
    raw = advantages(r, m, whiten="off", **kw)
    masked = advantages(r, m, whiten="masked", **kw)
    official = advantages(r, m, whiten="official", **kw)
    n, N = m.sum().item(), m.numel()
    S, Q = raw[m].sum(), (raw[m] ** 2).sum()
    mu_v, mu_all = S / n, S / N
    var_v, var_all = Q / n - mu_v**2, Q / N - mu_all**2
    torch.testing.assert_close(masked[m], (raw[m] - mu_v) / torch.sqrt(var_v + 1e-8), **F64)
    torch.testing.assert_close(official[m], (raw[m] - mu_all) / torch.sqrt(var_all + 1e-8), **F64)
    # the padded statistic shrinks the mean towards 0: every valid advantage moves by a known affine map
    a, b = torch.sqrt(var_v + 1e-8) / torch.sqrt(var_all + 1e-8), (mu_v - mu_all) / torch.sqrt(var_all + 1e-8)
    torch.testing.assert_close(official[m], a * masked[m] + b, **F64)
    assert abs(b.item()) > 1e-3  # the padded batch really differs
    full = torch.ones_like(m)
    r_full = token_rewards(batch["logp"].clamp(max=0), batch["logq"].clamp(max=0), full)
    torch.testing.assert_close(
        advantages(r_full, full, whiten="masked", **kw), advantages(r_full, full, whiten="official", **kw)
    )


def test_whiten_shift_mean_false_and_unbiased(batch):
    v, m = batch["adv"], batch["mask"]
    torch.testing.assert_close(
        whiten(v, m, shift_mean=False), whiten_slow(v, m, all_positions=False, shift_mean=False), **F64
    )
    # unbiased=True is the single-process official path (torch.var_mean, N − 1)
    full = torch.ones_like(m)
    var_ref, mean_ref = torch.var_mean(v)
    mean, var = masked_mean_var(v, full, unbiased=True)
    torch.testing.assert_close((mean, var), (mean_ref, var_ref), **F64)


def test_whiten_all_reduce_hook_equals_whole_batch(batch):
    """Two ranks (threads) with a summing all-reduce hook reproduce the statistic of the whole batch."""
    v, m = batch["adv"], batch["mask"]
    halves = [(v[:3], m[:3]), (v[3:], m[3:])]
    slots: list[torch.Tensor | None] = [None, None]
    barrier = threading.Barrier(2)
    out: list[torch.Tensor | None] = [None, None]

    def run(rank: int) -> None:
        def all_reduce(x: torch.Tensor) -> torch.Tensor:
            slots[rank] = x
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total

        out[rank] = whiten(*halves[rank], all_reduce=all_reduce)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    torch.testing.assert_close(torch.cat(out), whiten(v, m), **F64)


def test_all_masked_batch_is_zero_and_finite():
    B, T = 3, 4
    m = torch.zeros(B, T, dtype=torch.bool)
    junk = torch.full((B, T), -math.inf, dtype=torch.float64)
    r = token_rewards(torch.zeros(B, T), torch.zeros(B, T), m)
    for mode in ("masked", "official", "off"):
        a = advantages(r, m, whiten=mode, **OFFICIAL)
        assert torch.equal(a, torch.zeros(B, T))
    lq = junk.clone().requires_grad_(True)
    loss, clipped = ppo_policy_loss(lq, junk, junk, junk, m, clip_eps=0.2)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros(B, T, dtype=torch.float64)) and not clipped.any()
    assert torch.equal(lq.grad, torch.zeros(B, T, dtype=torch.float64))


@pytest.mark.parametrize("clip_eps", [0.2, 0.05, math.inf])
def test_ppo_loss_matches_reference_and_gradient_closed_form(batch, clip_eps):
    m = batch["mask"]
    g = torch.Generator().manual_seed(1)
    log_w = torch.where(m, 0.3 * torch.randn(m.shape, generator=g, dtype=torch.float64), torch.tensor(-1e9))
    lq_new = batch["logq_new"].clone().requires_grad_(True)
    loss, clipped = ppo_policy_loss(lq_new, batch["logq"], log_w, batch["adv"], m, clip_eps=clip_eps)
    want, want_clipped = ppo_loss_slow(
        batch["logq_new"], batch["logq"], log_w, batch["adv"], m, clip_eps=clip_eps
    )
    torch.testing.assert_close(loss, want, **F64)
    assert torch.equal(clipped, want_clipped)
    if clip_eps == 0.2:
        assert 0 < clipped.sum() < m.sum()  # both branches exercised
    loss.sum().backward()
    # d/d logq_new of −A·ρ is −A·ρ where the unclipped branch wins, 0 where the clip holds, 0 on padding
    rho = torch.exp(batch["logq_new"] - batch["logq"] + log_w)
    grad = torch.where(m & ~clipped, -batch["adv"] * rho, torch.zeros(()))
    torch.testing.assert_close(lq_new.grad, grad, **F64)


def test_ppo_loss_hand_sized():
    # A = [1, −1, 2, 1], q_new/q_old = [1.5, 0.5, 1, 1], w = [1, 1, 1, 1.25], ε = 0.2:
    #   t1: ρ = 1.5,  max(−1.5, −1.2) = −1.2  clipped
    #   t2: ρ = 0.5,  max(0.5, 0.8)   =  0.8  clipped
    #   t3: ρ = 1,    max(−2, −2)     = −2    not clipped (tie)
    #   t4: ρ = 1.25 (the mixing weight alone), max(−1.25, −1.2) = −1.2 clipped: the clip sees w
    adv = torch.tensor([[1.0, -1.0, 2.0, 1.0]], dtype=torch.float64)
    lq_old = torch.zeros(1, 4, dtype=torch.float64)
    lq_new = torch.log(torch.tensor([[1.5, 0.5, 1.0, 1.0]], dtype=torch.float64))
    log_w = torch.log(torch.tensor([[1.0, 1.0, 1.0, 1.25]], dtype=torch.float64))
    m = torch.ones(1, 4, dtype=torch.bool)
    loss, clipped = ppo_policy_loss(lq_new, lq_old, log_w, adv, m, clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 0.8, -2.0, -1.2]], dtype=torch.float64))
    assert clipped.tolist() == [[True, True, False, True]]


def test_clip_fraction_constructed_case():
    # 2 rows × 4, 6 valid tokens; ratios chosen so exactly 3 valid tokens sit on the clipped side:
    #   row 0: (A>0, ρ=1.3) clipped, (A<0, ρ=0.7) clipped, (A>0, ρ=0.7) free, pad
    #   row 1: (A<0, ρ=1.3) free, (A>0, ρ=1.21) clipped, (A=0, ρ=2) free (0 = 0, no strict win), pad
    # A padded slot with ρ far out of range must not count.
    rho = torch.tensor([[1.3, 0.7, 0.7, 9.0], [1.3, 1.21, 2.0, 9.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0], [-1.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    m = torch.tensor([[True, True, True, False], [True, True, True, False]])
    zeros = torch.zeros_like(rho)
    _, clipped = ppo_policy_loss(torch.log(rho), zeros, zeros, adv, m, clip_eps=0.2)
    assert clipped.tolist() == [[True, True, False, False], [False, True, False, False]]
    assert (clipped.sum() / m.sum()).item() == pytest.approx(0.5)


def test_padding_garbage_gives_finite_loss_and_grads(batch):
    m = batch["mask"]
    junk = torch.full(m.shape, -math.inf, dtype=torch.float64)
    lq_new = torch.where(m, batch["logq_new"], junk).requires_grad_(True)
    lq_old = torch.where(m, batch["logq"], junk)
    adv = torch.where(m, batch["adv"], torch.full(m.shape, math.nan, dtype=torch.float64))
    loss, _ = ppo_policy_loss(lq_new, lq_old, torch.zeros_like(junk), adv, m, clip_eps=0.2)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(lq_new.grad).all()
    assert (lq_new.grad[~m] == 0).all()


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.7, 1.0])
def test_mixture_log_prob_matches_reference(batch, alpha):
    lq, lp = batch["logq"].clamp(max=0), batch["logp"].clamp(max=0)
    torch.testing.assert_close(mixture_log_prob(lq, lp, alpha), mixture_slow(lq, lp, alpha), **F64)
    torch.testing.assert_close(log_importance_weight(lq, lp, alpha), lq - mixture_slow(lq, lp, alpha), **F64)


def test_mixture_endpoints_and_hand_case():
    lq = torch.log(torch.tensor([[0.5, 1e-30]], dtype=torch.float64))
    lp = torch.log(torch.tensor([[0.1, 0.3]], dtype=torch.float64))
    torch.testing.assert_close(mixture_log_prob(lq, lp, 0.0), lq)
    torch.testing.assert_close(mixture_log_prob(lq, lp, 1.0), lp)
    assert torch.equal(log_importance_weight(lq, lp, 0.0), torch.zeros(1, 2, dtype=torch.float64))
    # q = 0.5, p = 0.1, α = 0.2: p̃ = 0.2·0.1 + 0.8·0.5 = 0.42, w = 0.5/0.42 = 1.190476
    w = log_importance_weight(lq, lp, 0.2).exp()
    assert w[0, 0].item() == pytest.approx(0.5 / 0.42, rel=1e-12)
    # q ≈ 0, p = 0.3: p̃ = 0.06, log w = log(1e-30/0.06), finite (no underflow to log 0)
    assert w.log()[0, 1].item() == pytest.approx(math.log(1e-30 / 0.06), rel=1e-12)
    with pytest.raises(AssertionError):
        mixture_log_prob(lq, lp, 1.5)


def test_float32_inputs_stay_float32(batch):
    m = batch["mask"]
    lp, lq = batch["logp"].float(), batch["logq"].float()
    r = token_rewards(lp, lq, m)
    a = advantages(r, m, whiten="masked", **OFFICIAL)
    loss, _ = ppo_policy_loss(lq, lq, torch.zeros_like(lq), a, m, clip_eps=0.2)
    assert r.dtype == a.dtype == loss.dtype == torch.float32
    r64 = token_rewards(batch["logp"], batch["logq"], m)
    a64 = advantages(r64, m, whiten="masked", **OFFICIAL)
    # fp32 tolerance: values O(1) after whitening, fp32 eps 1.2e-7 times a 9-term recursion and a reduction
    torch.testing.assert_close(a.double(), a64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("single_step", [True, "token", False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_policy_logit_grad_matches_autograd_reference(single_step, dtype):
    """Closed-form loss and logit gradient vs float64 autograd through log_softmax, the loop PPO
    reference and an explicit KL sum, unweighted (official) or weighted per token by w = exp(log_w)
    (paper Eq. 7, `single_step_weight token`); inputs rounded to `dtype` on both sides."""
    C, V = 13, 37
    g = torch.Generator().manual_seed(3)
    s = (3 * torch.randn(C, V, generator=g, dtype=torch.float64)).to(dtype)
    t = (3 * torch.randn(C, V, generator=g, dtype=torch.float64)).to(dtype)
    y = torch.randint(0, V, (C,), generator=g)
    logq_old = s.double().log_softmax(-1).gather(-1, y[:, None])[:, 0] + 0.2 * torch.randn(
        C, generator=g, dtype=torch.float64
    )
    log_w = 0.3 * torch.randn(C, generator=g, dtype=torch.float64)
    adv = torch.randn(C, generator=g, dtype=torch.float64)

    leaf = s.double().clone().requires_grad_()
    logq = leaf.log_softmax(-1)
    ones = torch.ones(1, C, dtype=torch.bool)
    pg_want, clipped_want = ppo_loss_slow(
        logq.gather(-1, y[:, None]).T, logq_old[None], log_w[None], adv[None], ones, clip_eps=0.2
    )
    rho = torch.exp(logq.gather(-1, y[:, None])[:, 0] - logq_old + log_w)
    pg_graph = torch.maximum(-adv * rho, -adv * rho.clamp(0.8, 1.2))  # the same values, with a graph
    kl_want = (
        (logq.exp() * (logq - t.double().log_softmax(-1))).sum(-1)
        if single_step
        else torch.zeros(C, dtype=torch.float64)
    )
    if single_step == "token":
        kl_want = kl_want * torch.tensor([math.exp(x) for x in log_w.tolist()], dtype=torch.float64)
    (grad_want,) = torch.autograd.grad(pg_graph.sum() + kl_want.sum(), leaf)

    dt = torch.promote_types(dtype, torch.float32)
    pg, single, clipped, grad = policy_logit_grad(
        s.clone(),
        t.to(dt).log_softmax(-1) if single_step else None,
        torch.empty(C, V, dtype=dt),
        y,
        logq_old.to(dt),
        log_w.to(dt),
        adv.to(dt),
        clip_eps=0.2,
        single_weight=log_w.to(dt).exp() if single_step == "token" else None,
    )
    assert 0 < clipped_want.sum() < C  # both PPO branches exercised
    assert torch.equal(clipped, clipped_want[0])
    tol = TOL[dt]
    torch.testing.assert_close(pg.double(), pg_want[0], **tol)
    torch.testing.assert_close(single.double(), kl_want.detach(), **tol)
    torch.testing.assert_close(grad.double(), grad_want, **tol)


def test_single_step_kl_stays_fp32_under_bf16_autocast():
    """Under bf16 autocast (mixed precision on a GPU) only the student's head matmul runs in bf16: the
    teacher's logits (an fp32 head here) and the KL's bmm inside the chunk pass stay fp32. The single-step
    KL of the bf16-rounded student logits then equals a float64 loop to fp32 accuracy; with autocast
    reaching into the chunk pass both ran in bf16 (errors ~1e-2 relative)."""
    C, H, V, N = 4, 16, 37, 10
    g = torch.Generator().manual_seed(5)
    s = 3 * torch.randn(N, V, generator=g)  # the student's logits, handed over as a sampling cache would
    t_rows, t_w = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)  # the teacher's side, fp32
    y = torch.randint(0, V, (N,), generator=g)
    zeros = torch.zeros(N)
    singles = []

    def token_fn(logits: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = end - start
        t_logp = torch.nn.functional.linear(t_rows[start:end], t_w).log_softmax(-1)  # as TeacherStore does
        _, single, _, grad = policy_logit_grad(
            logits, t_logp, torch.empty(n, V), y[start:end], zeros[:n], zeros[:n], zeros[:n], clip_eps=0.2
        )
        singles.append(single)
        return single.sum(), grad

    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked_head_loss(
            torch.zeros(N, H),  # unused: the logits come from logits_into
            Head(torch.zeros(V, H)),
            token_fn,
            chunk_size=C,
            closed_form=True,
            logits_into=lambda out, start, end: out.copy_(s[start:end]),  # into the bf16 chunk buffer
        )
    s16 = s.bfloat16().double()
    t = t_rows.double() @ t_w.double().T
    want = [kl_slow(softmax_slow(s16[n].tolist()), softmax_slow(t[n].tolist())) for n in range(N)]
    got = torch.cat(singles)  # [N] per-position KL
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), **TOL[torch.float32])
    assert got.dtype == torch.float32
