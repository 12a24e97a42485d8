"""Unbiasedness of the MiniLLM gradient estimator, by enumeration of every response of a tabular model.

Student q_θ and teacher p are autoregressive tables over V = 3 tokens (EOS = 0) with responses of at
most T = 3 tokens: one logits row per non-final prefix (7 prefixes), 15 possible responses. Enumerating
them gives KL(q‖p) and its gradient exactly (autograd, float64). Our estimator is built only from
minillm.objectives.policy (rewards, returns, weights, clipped PG loss) and divergences.reverse_kl (the
single-step term), summed over the tokens of each response and averaged over responses.

Why each combination estimates what it does (G_t inclusive return, R_{t+1} = G_{t+1}, KL_t the exact
KL(q(·|y<t) ‖ p(·|y<t)) with its prefix held fixed, g_single = E_q Σ_t ∇KL_t):
- ∇KL = −E_q Σ_t G_t ∇log q(y_t|y<t)                      REINFORCE, inclusive, no single-step (Eq. 2)
- E[r_t ∇log q(y_t) | y<t] = Σ_v ∇q(v)·(log p − log q)(v) = −∇KL_t, so
  ∇KL = g_single − E_q Σ_t R_{t+1} ∇log q(y_t)             exclusive + single-step (the paper's Eq. 3)
- inclusive + single-step (the official default) estimates ∇KL + g_single: r_t counted twice
- exclusive without single-step estimates ∇KL − g_single
- under p̃ = α·p + (1−α)·q, E_q[f(y)] = E_p̃[W(y) f(y)] with W = Π_t q(y_t)/p̃(y_t) over the whole response.

Each claim is checked twice: (1) the exact expectation of the estimator over the sampling distribution,
by enumeration, equals the claimed gradient to float64 precision (TOL[float64]); (2) the average over
N = 200,000 responses sampled with a seeded torch.Generator lies within 5 standard errors of it in every
one of the 21 gradient coordinates, where the standard error is the *exact* one, sqrt(Var_s[g_s]/N) from
the enumerated per-response gradients. For a correct estimator each coordinate's z-score is ~N(0, 1)
(N is large and g_s takes 15 values), so P(|z| > 5) ≈ 5.7e-7 and the chance that any of 21 fails is
≈ 1.2e-5 for a random seed; the seed is fixed, so the test is deterministic. The wrong estimators sit
more than 20 standard errors away: the test detects them.
"""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import TOL

from minillm.objectives.divergences import reverse_kl
from minillm.objectives.policy import advantages, log_importance_weight, ppo_policy_loss, token_rewards

V, T, EOS = 3, 3, 0
N_SAMPLES = 200_000
Z_OK, Z_DETECT = 5.0, 20.0
F64 = TOL[torch.float64]


def build_tree() -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """Prefix states and the transition table next_state[s, v] (−1 when the response ends there)."""
    prefixes = [()]
    for a in (1, 2):
        prefixes.append((a,))
    for a in (1, 2):
        for b in (1, 2):
            prefixes.append((a, b))
    index = {h: i for i, h in enumerate(prefixes)}
    nxt = torch.full((len(prefixes), V), -1, dtype=torch.long)
    for h, i in index.items():
        for v in range(V):
            if v != EOS and len(h) + 1 < T:
                nxt[i, v] = index[h + (v,)]
    return nxt, prefixes


NEXT, PREFIXES = build_tree()
S_STATES = len(PREFIXES)  # 7


def enumerate_responses() -> dict[str, torch.Tensor]:
    """All 15 responses, as a right-padded batch (pad = EOS) with lengths and the prefix state per token."""
    rows: list[tuple[list[int], list[int]]] = []

    def walk(state: int, toks: list[int], states: list[int]) -> None:
        for v in range(V):
            t2, s2 = toks + [v], states + [state]
            if NEXT[state, v] < 0:
                rows.append((t2, s2))
            else:
                walk(int(NEXT[state, v]), t2, s2)

    walk(0, [], [])
    S = len(rows)
    tokens = torch.full((S, T), EOS, dtype=torch.long)
    states = torch.zeros(S, T, dtype=torch.long)
    length = torch.tensor([len(t) for t, _ in rows])
    for i, (t, s) in enumerate(rows):
        tokens[i, : len(t)] = torch.tensor(t)
        states[i, : len(s)] = torch.tensor(s)
    mask = torch.arange(T)[None, :] < length[:, None]  # [S, T], True up to and including EOS
    return dict(tokens=tokens, states=states, mask=mask)


ALL = enumerate_responses()
assert ALL["tokens"].shape[0] == 15


def token_logprobs(
    table: torch.Tensor, tokens: torch.Tensor, states: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """[B, T] log-prob of each token under the tabular model, 0.0 on padding."""
    logits = table[states]  # [B, T, V]: the row of each token's prefix
    lp = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    return lp.masked_fill(~mask, 0.0)


@pytest.fixture(scope="module")
def tables() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    theta = torch.randn(S_STATES, V, generator=g, dtype=torch.float64)
    teacher = 1.5 * torch.randn(S_STATES, V, generator=g, dtype=torch.float64)
    return theta, teacher


def exact_kl_grad(theta: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """∇_θ KL(q_θ ‖ p) over whole responses, by enumeration."""
    th = theta.clone().requires_grad_(True)
    lq = token_logprobs(th, **ALL).sum(1)  # [15] log q(y)
    lp = token_logprobs(teacher, **ALL).sum(1)
    assert torch.allclose(lq.exp().sum(), torch.tensor(1.0, dtype=torch.float64))  # the 15 responses are all
    kl = (lq.exp() * (lq - lp)).sum()
    (grad,) = torch.autograd.grad(kl, th)
    return grad


def exact_single_step_grad(theta: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """∇_θ Σ_h P_q(h) KL(q(·|h) ‖ p(·|h)) with the prefix probabilities P_q(h) held fixed.

    Written independently of divergences.reverse_kl: probabilities by exp/sum, P_q(h) by walking the tree."""
    q = theta.exp() / theta.exp().sum(-1, keepdim=True)
    reach = [0.0] * S_STATES
    reach[0] = 1.0
    for i, _ in enumerate(PREFIXES):  # parents come before children in PREFIXES
        for v in range(V):
            if NEXT[i, v] >= 0:
                reach[int(NEXT[i, v])] = reach[i] * q[i, v].item()
    th = theta.clone().requires_grad_(True)
    qh = th.exp() / th.exp().sum(-1, keepdim=True)
    ph = teacher.exp() / teacher.exp().sum(-1, keepdim=True)
    total = sum(reach[i] * (qh[i] * (qh[i].log() - ph[i].log())).sum() for i in range(S_STATES))
    (grad,) = torch.autograd.grad(total, th)
    return grad


def sample_responses(theta: torch.Tensor, teacher: torch.Tensor, alpha: float, n: int, seed: int) -> dict:
    """n responses from p̃ = α·p + (1−α)·q, token by token, all rows at once."""
    g = torch.Generator().manual_seed(seed)
    mix = alpha * teacher.softmax(-1) + (1.0 - alpha) * theta.softmax(-1)  # [S_STATES, V]
    tokens = torch.full((n, T), EOS, dtype=torch.long)
    states = torch.zeros(n, T, dtype=torch.long)
    length = torch.full((n,), T, dtype=torch.long)
    state = torch.zeros(n, dtype=torch.long)
    alive = torch.ones(n, dtype=torch.bool)
    for t in range(T):
        tok = torch.multinomial(mix[state], 1, generator=g).squeeze(1)  # [n]
        tokens[:, t] = torch.where(alive, tok, EOS)
        states[:, t] = torch.where(alive, state, 0)
        nxt = NEXT[state, tok]
        ended = alive & (nxt < 0)
        length = torch.where(ended, t + 1, length)
        alive = alive & ~ended
        state = torch.where(alive, nxt, 0)
    mask = torch.arange(T)[None, :] < length[:, None]  # [n, T] from lengths
    return dict(tokens=tokens, states=states, mask=mask)


def per_response_loss(
    theta: torch.Tensor,
    teacher: torch.Tensor,
    batch: dict,
    *,
    alpha: float,
    inclusive: bool,
    single_step: bool,
    weight: str,
) -> torch.Tensor:
    """[B] Σ_t of our per-token losses for each response; its gradient at θ = θ_old is the estimator.

    weight: "sequence" W = Π_t q/p̃ (exact), "token" w_t = q(y_t)/p̃(y_t) in the PG ratio only (the paper's
    approximation as the official code applies it), "none" (drop the importance weight)."""
    tokens, states, mask = batch["tokens"], batch["states"], batch["mask"]
    logq = token_logprobs(theta, tokens, states, mask)  # [B, T], differentiable
    logq_old = logq.detach()
    logp = token_logprobs(teacher, tokens, states, mask)
    r = token_rewards(logp, logq_old, mask)
    adv = advantages(
        r,
        mask,
        gamma=1.0,
        inclusive=inclusive,
        length_norm=False,
        reward_scale=1.0,
        reward_clip=None,
        whiten="off",
    )
    log_w_tok = log_importance_weight(logq_old, logp, alpha).masked_fill(~mask, 0.0)  # [B, T]
    log_W = log_w_tok.sum(1, keepdim=True)  # [B, 1] log Π_t q/p̃ over the response
    if weight == "sequence":
        log_w_pg, w_single = log_W.expand(-1, T), log_W.exp()
    elif weight == "token":
        log_w_pg, w_single = log_w_tok, torch.ones_like(log_W)
    else:
        log_w_pg, w_single = torch.zeros_like(log_w_tok), torch.ones_like(log_W)
    pg, _ = ppo_policy_loss(logq, logq_old, log_w_pg, adv, mask, clip_eps=math.inf)
    loss = pg.sum(1)  # [B]
    if single_step:
        single = reverse_kl(theta[states], teacher[states], mask)  # [B, T] exact KL at each position
        loss = loss + (w_single * single).sum(1)
    return loss


def expectation_and_se(theta, teacher, n: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact E_p̃[g] of the estimator and the standard error of an n-sample mean, by enumeration."""
    mix = kw["alpha"] * teacher.softmax(-1) + (1.0 - kw["alpha"]) * theta.softmax(-1)
    prob = token_logprobs(mix.log(), **ALL).sum(1).exp()  # [15] p̃(y)
    assert torch.allclose(prob.sum(), torch.tensor(1.0, dtype=torch.float64))
    th = theta.clone().requires_grad_(True)
    losses = per_response_loss(th, teacher, ALL, **kw)  # [15]
    grads = torch.stack([torch.autograd.grad(losses[s], th, retain_graph=True)[0] for s in range(15)])
    mean = (prob[:, None, None] * grads).sum(0)
    var = (prob[:, None, None] * (grads - mean) ** 2).sum(0)
    return mean, (var / n).sqrt()


def monte_carlo(theta, teacher, batch, **kw) -> torch.Tensor:
    th = theta.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(per_response_loss(th, teacher, batch, **kw).mean(), th)
    return grad


def max_z(est: torch.Tensor, target: torch.Tensor, se: torch.Tensor) -> float:
    # A coordinate whose per-response gradient is constant (e.g. the last position's row under the
    # exclusive return, always 0) has SE 0: it must then match to the float64 atol.
    return ((est - target).abs() / se.clamp(min=F64["atol"])).max().item()


@pytest.fixture(scope="module")
def exact(tables):
    theta, teacher = tables
    return dict(kl=exact_kl_grad(theta, teacher), single=exact_single_step_grad(theta, teacher))


@pytest.fixture(scope="module")
def samples(tables):
    theta, teacher = tables
    return {a: sample_responses(theta, teacher, a, N_SAMPLES, seed=7) for a in (0.0, 0.3)}


# (alpha, inclusive, single_step, weight) → what the estimator's expectation equals: ∇KL + c·g_single
CASES = {
    "reinforce_inclusive": (0.0, True, False, "none", 0.0),
    "paper_exclusive_plus_single": (0.0, False, True, "none", 0.0),
    "official_inclusive_plus_single": (0.0, True, True, "none", 1.0),
    "exclusive_without_single": (0.0, False, False, "none", -1.0),
    "mixed_inclusive_seq_weight": (0.3, True, False, "sequence", 0.0),
    "mixed_paper_seq_weight": (0.3, False, True, "sequence", 0.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_expectation_by_enumeration(tables, exact, samples, name):
    alpha, inclusive, single_step, weight, c = CASES[name]
    theta, teacher = tables
    kw = dict(alpha=alpha, inclusive=inclusive, single_step=single_step, weight=weight)
    mean, se = expectation_and_se(theta, teacher, N_SAMPLES, **kw)
    target = exact["kl"] + c * exact["single"]
    torch.testing.assert_close(mean, target, **F64)  # exact, no sampling noise
    mc = monte_carlo(theta, teacher, samples[alpha], **kw)
    assert max_z(mc, target, se) < Z_OK, f"{name}: sampled mean off its expectation"
    if c != 0.0:  # a biased estimator: the sampled mean must be told apart from the true gradient
        assert max_z(mc, exact["kl"], se) > Z_DETECT
        # the bias, as a number: the single-step gradient is about as large as the gradient itself here
        ratio = exact["single"].norm() / exact["kl"].norm()
        assert 0.3 < ratio.item() < 3.0


@pytest.mark.parametrize("inclusive,single_step", [(True, False), (False, True)])
def test_dropping_the_importance_weight_is_detected(tables, exact, samples, inclusive, single_step):
    theta, teacher = tables
    kw = dict(alpha=0.3, inclusive=inclusive, single_step=single_step, weight="none")
    mean, se = expectation_and_se(theta, teacher, N_SAMPLES, **kw)
    assert max_z(mean, exact["kl"], se) > Z_DETECT  # biased in expectation …
    mc = monte_carlo(theta, teacher, samples[0.3], **kw)
    assert max_z(mc, mean, se) < Z_OK  # … the sample agrees with that biased expectation …
    assert max_z(mc, exact["kl"], se) > Z_DETECT  # … and is detected against the true gradient


def test_official_per_token_weight_is_biased(tables, exact):
    """The official combination under mixing (inclusive return, per-token w in the PG ratio, single-step
    unweighted; γ = 1, no length norm, no whitening, no clip) is not ∇KL, and not ∇KL + g_single either:
    the single-token w only corrects the sampled token, not the mixed prefix."""
    theta, teacher = tables
    kw = dict(alpha=0.3, inclusive=True, single_step=True, weight="token")
    mean, se = expectation_and_se(theta, teacher, N_SAMPLES, **kw)
    assert max_z(mean, exact["kl"], se) > Z_DETECT
    assert max_z(mean, exact["kl"] + exact["single"], se) > Z_DETECT


def test_single_step_term_alone_is_the_exact_per_position_kl_gradient(tables, exact):
    """(c): E_q Σ_t reverse_kl_t over the enumerated responses, prefix probabilities held fixed, has the
    gradient Σ_h P_q(h) ∇KL(q(·|h) ‖ p(·|h)): exact, no sampling."""
    theta, teacher = tables
    q_resp = token_logprobs(theta, **ALL).sum(1).exp()  # [15] q(y), detached weights
    th = theta.clone().requires_grad_(True)
    single = reverse_kl(th[ALL["states"]], teacher[ALL["states"]], ALL["mask"])  # [15, T]
    (grad,) = torch.autograd.grad((q_resp * single.sum(1)).sum(), th)
    torch.testing.assert_close(grad, exact["single"], **F64)
    assert exact["single"].abs().max() > 1e-2  # not a vacuous zero
