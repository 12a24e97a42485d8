"""Token-level divergences against the slow float64 references, closed forms and hand-worked numbers."""

import math

import pytest
import torch
from reference import divergence_slow
from tolerances import assert_close_verbose

from minillm.objectives.divergences import (
    DIVERGENCES,
    forward_kl,
    generalized_jsd,
    get_divergence,
    get_logit_grad,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)

# (registry name, parameters): every divergence, interior and skewed parameter values.
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.1}),
    ("tvd", {}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.3}),
]
CASE_IDS = [name + "".join(f"-{k}{v}" for k, v in params.items()) for name, params in CASES]


def _inputs(B: int, T: int, V: int, seed: int = 0, scale: float = 2.0, dtype: torch.dtype = torch.float64):
    """Seeded student logits, teacher logits [B, T, V] and a random [B, T] bool mask with (0, 0) kept."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    return s, t, mask


@pytest.mark.parametrize("B,T,V", [(1, 1, 2), (3, 47, 123)])
@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_matches_slow_reference(name, params, B, T, V):
    s, t, mask = _inputs(B, T, V)
    expected = divergence_slow(name, s, t, mask, **params)
    fn = get_divergence(name, **params)
    for dtype in (torch.float64, torch.float32):
        out = fn(s.to(dtype), t.to(dtype), mask)
        assert out.dtype == dtype
        assert_close_verbose(out, expected, dtype)
    assert (out[~mask] == 0).all()


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_temperature_matches_slow_reference(name, params):
    s, t, mask = _inputs(2, 5, 17, seed=1, scale=4.0)
    expected = divergence_slow(name, s, t, mask, temperature=2.5, **params)
    assert_close_verbose(DIVERGENCES[name](s, t, mask, temperature=2.5, **params), expected, torch.float64)


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_divergence_of_a_distribution_from_itself_is_zero(name, params):
    s, _, mask = _inputs(3, 7, 31, seed=2)
    out = DIVERGENCES[name](s, s.clone(), mask, **params)
    assert_close_verbose(out, torch.zeros(3, 7, dtype=torch.float64), torch.float64)


def test_jsd_endpoints_are_forward_and_reverse_kl():
    s, t, mask = _inputs(3, 11, 29, seed=3)
    assert_close_verbose(
        generalized_jsd(s, t, mask, beta=0.0), divergence_slow("forward_kl", s, t, mask), torch.float64
    )
    assert_close_verbose(
        generalized_jsd(s, t, mask, beta=1.0), divergence_slow("reverse_kl", s, t, mask), torch.float64
    )


def test_jsd_endpoints_are_the_normalised_limits():
    # JSD(β) = β·KL(p‖q) + O(β²) near 0 and (1−β)·KL(q‖p) + O((1−β)²) near 1: the β = 0 / 1 endpoints
    # are the limits of JSD(β)/β and JSD(β)/(1−β), while JSD(β) itself tends to 0.
    s, t, mask = _inputs(2, 6, 13, seed=4, scale=1.0)
    eps = 1e-6
    fwd, rev = divergence_slow("forward_kl", s, t, mask), divergence_slow("reverse_kl", s, t, mask)
    torch.testing.assert_close(generalized_jsd(s, t, mask, beta=eps) / eps, fwd, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(generalized_jsd(s, t, mask, beta=1 - eps) / eps, rev, rtol=1e-4, atol=1e-8)
    assert generalized_jsd(s, t, mask, beta=eps).max() < 1e-5


def test_skew_kl_at_alpha_zero_is_plain_kl_and_at_one_is_zero():
    s, t, mask = _inputs(3, 11, 29, seed=5)
    fwd, rev = divergence_slow("forward_kl", s, t, mask), divergence_slow("reverse_kl", s, t, mask)
    assert_close_verbose(skew_forward_kl(s, t, mask, alpha=0.0), fwd, torch.float64)
    assert_close_verbose(skew_reverse_kl(s, t, mask, alpha=0.0), rev, torch.float64)
    zeros = torch.zeros(3, 11, dtype=torch.float64)
    assert_close_verbose(skew_forward_kl(s, t, mask, alpha=1.0), zeros, torch.float64)
    assert_close_verbose(skew_reverse_kl(s, t, mask, alpha=1.0), zeros, torch.float64)


def test_tvd_lies_in_unit_interval_and_is_one_for_disjoint_supports():
    s, t, mask = _inputs(3, 47, 123, seed=6, scale=10.0)
    out = total_variation(s, t, mask)
    assert (out >= 0).all() and (out <= 1).all() and out[mask].max() > 0.99
    # Student on the first half of the vocabulary, teacher on the second: TVD = 1 exactly.
    half = torch.arange(8) < 4
    s2 = torch.zeros(1, 1, 8, dtype=torch.float64).masked_fill(~half, -math.inf)
    t2 = torch.zeros(1, 1, 8, dtype=torch.float64).masked_fill(half, -math.inf)
    assert total_variation(s2, t2, torch.ones(1, 1, dtype=torch.bool)).item() == 1.0


def test_two_token_case_worked_by_hand():
    # Teacher logits (0, 0) -> p = (0.5, 0.5); student logits (ln 4, 0) -> q = (0.8, 0.2).
    # forward KL(p‖q) = 0.5·ln(0.5/0.8) + 0.5·ln(0.5/0.2) = 0.5·ln(1.5625) = ln 1.25 = 0.2231436
    # reverse KL(q‖p) = 0.8·ln 1.6 + 0.2·ln 0.4 = 0.3760029 − 0.1832581 = 0.1927448
    # JSD(0.5): m = (0.65, 0.35); KL(p‖m) = 0.5·ln(0.5/0.65) + 0.5·ln(0.5/0.35) = 0.0471553,
    #   KL(q‖m) = 0.8·ln(0.8/0.65) + 0.2·ln(0.2/0.35) = 0.0541883; JSD = 0.5·(0.0471553 + 0.0541883) = 0.0506718
    # TVD = 0.5·(|0.5 − 0.8| + |0.5 − 0.2|) = 0.3
    # skew forward KL(α=0.1): mix = 0.1·p + 0.9·q = (0.77, 0.23); 0.5·ln(0.5/0.77) + 0.5·ln(0.5/0.23) = 0.1723732
    # skew reverse KL(α=0.1): mix = 0.1·q + 0.9·p = (0.53, 0.47); 0.8·ln(0.8/0.53) + 0.2·ln(0.2/0.47) = 0.1585047
    # temperature 2: q ∝ (√4, 1) = (2/3, 1/3); forward KL = 0.5·ln(0.75) + 0.5·ln(1.5) = 0.5·ln 1.125 = 0.0588915
    #   (no T² factor: with one it would be 0.2355661)
    s = torch.tensor([[[math.log(4.0), 0.0]]])
    t = torch.zeros(1, 1, 2)
    m = torch.ones(1, 1, dtype=torch.bool)
    got = {
        "forward": forward_kl(s, t, m),
        "reverse": reverse_kl(s, t, m),
        "jsd": generalized_jsd(s, t, m, beta=0.5),
        "tvd": total_variation(s, t, m),
        "skew_forward": skew_forward_kl(s, t, m, alpha=0.1),
        "skew_reverse": skew_reverse_kl(s, t, m, alpha=0.1),
        "forward_T2": forward_kl(s, t, m, temperature=2.0),
    }
    want = {
        "forward": 0.2231436,
        "reverse": 0.1927448,
        "jsd": 0.0506718,
        "tvd": 0.3,
        "skew_forward": 0.1723732,
        "skew_reverse": 0.1585047,
        "forward_T2": 0.0588915,
    }
    for key, value in want.items():
        assert got[key].item() == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_gradcheck_float64(name, params):
    s, t, mask = _inputs(2, 3, 5, seed=7)
    mask[1, 2] = False
    fn = get_divergence(name, **params)
    assert torch.autograd.gradcheck(fn, (s.requires_grad_(), t.requires_grad_(), mask))


# Which of the one-sided -inf placements leave each divergence finite: forward KL weights by p, so a
# student-only -inf under teacher mass is truly infinite; reverse KL the other way round.
_INFINITE = {("forward_kl", "student"), ("reverse_kl", "teacher")}


@pytest.mark.parametrize("where", ["both", "teacher", "student"])
@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_neg_inf_logits_give_exact_zero_terms_and_no_nan(name, params, where):
    s, t, mask = _inputs(2, 4, 9, seed=8)
    banned = torch.zeros(9, dtype=torch.bool)
    banned[[0, 3, 4]] = True  # [V]
    if where in ("both", "student"):
        s = s.masked_fill(banned, -math.inf)
    if where in ("both", "teacher"):
        t = t.masked_fill(banned, -math.inf)
    s.requires_grad_()
    t.requires_grad_()
    out = DIVERGENCES[name](s, t, mask, **params)
    if (name, where) in _INFINITE:
        assert torch.isposinf(out[mask]).all()
        return
    assert_close_verbose(out, divergence_slow(name, s.detach(), t.detach(), mask, **params), torch.float64)
    out.sum().backward()
    for x in (s, t):
        assert torch.isfinite(x.grad).all()
        assert (x.grad[torch.isneginf(x)] == 0).all()  # a -inf logit stays at probability 0


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_bf16_inputs_are_upcast(name, params):
    s, t, mask = _inputs(2, 13, 123, seed=9, dtype=torch.float32)
    s16, t16 = s.bfloat16(), t.bfloat16()
    out = DIVERGENCES[name](s16, t16, mask, **params)
    assert out.dtype == torch.float32
    # Against the reference on the same rounded inputs, fp32 tolerance: this fails if the maths ran in bf16.
    assert_close_verbose(out, divergence_slow(name, s16, t16, mask, **params), torch.float32)
    # Against the unrounded inputs: the whole error budget of bf16 logits.
    assert_close_verbose(out, divergence_slow(name, s, t, mask, **params), torch.bfloat16)


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_all_masked_batch_gives_zeros_and_zero_grads(name, params):
    s, t, _ = _inputs(2, 5, 11, seed=10)
    s.requires_grad_()
    t.requires_grad_()
    out = DIVERGENCES[name](s, t, torch.zeros(2, 5, dtype=torch.bool), **params)
    assert (out == 0).all()
    out.sum().backward()
    assert (s.grad == 0).all() and (t.grad == 0).all()


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_garbage_logits_at_masked_positions_are_never_read(name, params):
    s, t, mask = _inputs(2, 5, 11, seed=11)
    mask[0, 1] = mask[1, 3] = False
    expected = divergence_slow(name, s, t, mask, **params)
    s[0, 1] = math.nan
    t[1, 3] = -math.inf  # an all -inf row: log-softmax would give NaN
    s.requires_grad_()
    t.requires_grad_()
    out = DIVERGENCES[name](s, t, mask, **params)
    assert_close_verbose(out, expected, torch.float64)
    out.sum().backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    assert (s.grad[~mask] == 0).all() and (t.grad[~mask] == 0).all()


def test_output_dtype_follows_the_compute_dtype():
    s, t, mask = _inputs(1, 2, 3)
    assert forward_kl(s, t, mask).dtype == torch.float64
    assert forward_kl(s.float(), t.float(), mask).dtype == torch.float32
    assert forward_kl(s.bfloat16(), t.float(), mask).dtype == torch.float32
    assert forward_kl(s.half(), t.bfloat16(), mask).dtype == torch.float32
    assert forward_kl(s.float(), t, mask).dtype == torch.float64


def test_get_divergence_binds_parameters():
    s, t, mask = _inputs(2, 3, 7, seed=12)
    got = get_divergence("jsd", beta=0.3, temperature=2.0)(s, t, mask)
    assert torch.equal(got, generalized_jsd(s, t, mask, beta=0.3, temperature=2.0))
    assert set(DIVERGENCES) == {
        "forward_kl",
        "reverse_kl",
        "jsd",
        "tvd",
        "skew_forward_kl",
        "skew_reverse_kl",
    }


@pytest.mark.parametrize(
    "name,params,message",
    [
        (
            "kl",
            {},
            "valid names: ['forward_kl', 'jsd', 'reverse_kl', 'skew_forward_kl', 'skew_reverse_kl', 'tvd']",
        ),
        ("forward_kl", {"beta": 0.5}, "invalid parameter(s) ['beta']; valid parameters: ['temperature']"),
        ("jsd", {"alpha": 0.5}, "valid parameters: ['beta', 'temperature']"),
        ("jsd", {"beta": 1.5}, "beta must be in [0, 1], got 1.5"),
        ("skew_reverse_kl", {"alpha": -0.1}, "alpha must be in [0, 1], got -0.1"),
        ("tvd", {"temperature": 0.0}, "temperature must be > 0, got 0.0"),
    ],
)
def test_get_divergence_rejects_bad_names_and_parameters(name, params, message):
    with pytest.raises(ValueError) as info:
        get_divergence(name, **params)
    assert message in str(info.value)


def test_direct_calls_check_parameters_and_shapes():
    s, t, mask = _inputs(1, 2, 3)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, t, mask, beta=2.0)
    with pytest.raises(ValueError, match="temperature"):
        reverse_kl(s, t, mask, temperature=-1.0)
    with pytest.raises(AssertionError, match="teacher"):
        reverse_kl(s, t[..., :2], mask)
    with pytest.raises(AssertionError, match="bool"):
        reverse_kl(s, t, mask.float())


# Every closed form, with the endpoints where a divergence turns into another (β, α = 0 and 1) and a
# temperature: the parameters the chunked KD path can be given.
LOGIT_GRAD_CASES = [
    *CASES,
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("skew_forward_kl", {"alpha": 0.0}),
    ("skew_forward_kl", {"alpha": 1.0}),
    ("skew_reverse_kl", {"alpha": 0.0}),
    ("skew_reverse_kl", {"alpha": 1.0}),
    ("jsd", {"beta": 0.3, "temperature": 2.0}),
    ("reverse_kl", {"temperature": 0.5}),
]
LOGIT_GRAD_IDS = [name + "".join(f"-{k}{v}" for k, v in params.items()) for name, params in LOGIT_GRAD_CASES]


def _autograd(name: str, params: dict, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """D [C] and ∂ΣD/∂s [C, V] of the [B, T, V] function by autograd (rows of s, t as one batch row)."""
    x = s.clone().requires_grad_()
    value = DIVERGENCES[name](x[None], t[None], torch.ones(1, len(s), dtype=torch.bool), **params)[0]
    if value.requires_grad:  # at α = 1 the skew KLs are the constant 0
        value.sum().backward()
    return value.detach(), x.grad if x.grad is not None else torch.zeros_like(s)


@pytest.mark.parametrize("where", ["none", "both", "teacher", "student"])
@pytest.mark.parametrize("name,params", LOGIT_GRAD_CASES, ids=LOGIT_GRAD_IDS)
def test_logit_grad_matches_autograd_float64(name, params, where):
    """The closed-form value and logit gradient equal float64 autograd through the [B, T, V] function, also
    with -inf logits on either side (a banned vocabulary entry); where the divergence is truly infinite
    the value is +inf, as autograd's."""
    s, t, _ = _inputs(1, 47, 123, seed=11)
    s, t = s[0], t[0]  # [C, V]
    banned = torch.zeros(123, dtype=torch.bool)
    banned[[0, 5, 122]] = True
    if where in ("both", "student"):
        s = s.masked_fill(banned, -math.inf)
    if where in ("both", "teacher"):
        t = t.masked_fill(banned, -math.inf)
    want_value, want_grad = _autograd(name, params, s, t)
    work = torch.full((3, *s.shape), math.nan, dtype=torch.float64)  # garbage scratch must not leak
    value, grad = get_logit_grad(name, **params)(s.clone(), t.clone(), work)
    # forward KL (also JSD β = 0, skew forward α = 0) is infinite with teacher mass on a student -inf;
    # reverse KL (JSD β = 1, skew reverse α = 0) the other way round
    forward = name == "forward_kl" or params in ({"beta": 0.0}, {"alpha": 0.0}) and name != "skew_reverse_kl"
    reverse = name == "reverse_kl" or params in ({"beta": 1.0}, {"alpha": 0.0}) and name != "skew_forward_kl"
    if (forward and where == "student") or (reverse and where == "teacher"):
        assert torch.isposinf(value).all() and torch.isposinf(want_value).all()
        return  # no gradient to compare: autograd's is not finite either
    assert_close_verbose(value, want_value, torch.float64)
    assert torch.isfinite(grad).all()
    assert_close_verbose(grad, want_grad, torch.float64)
    if where == "both":
        assert (grad[:, banned] == 0).all()  # an entry banned on both sides stays at probability 0


def test_logit_grad_tvd_subgradient_at_equal_probabilities_is_zero():
    """TVD's |p − q| has a kink at p_v = q_v: the closed form takes sign(0) = 0 there, the subgradient
    autograd's abs gives, so q = p (TVD = 0, its minimum) has gradient exactly 0."""
    s, t, _ = _inputs(1, 4, 9, seed=12)
    value, grad = get_logit_grad("tvd")(s[0].clone(), s[0].clone(), torch.empty(3, 4, 9, dtype=torch.float64))
    assert (value == 0).all() and (grad == 0).all()
    # one entry equal, the rest not: that entry's g is 0, as autograd's
    t = s[0].clone()
    t[:, 1:] = t[:, 1:] + 0.5 * torch.arange(8, dtype=torch.float64)
    want_value, want_grad = _autograd("tvd", {}, s[0], t)
    value, grad = get_logit_grad("tvd")(s[0].clone(), t.clone(), torch.empty(3, 4, 9, dtype=torch.float64))
    assert_close_verbose(value, want_value, torch.float64)
    assert_close_verbose(grad, want_grad, torch.float64)


def test_logit_grad_checks_parameters_as_get_divergence():
    with pytest.raises(ValueError, match="beta"):
        get_logit_grad("jsd", beta=1.5)
    with pytest.raises(ValueError, match="invalid parameter"):
        get_logit_grad("tvd", alpha=0.1)
    with pytest.raises(ValueError, match="unknown divergence"):
        get_logit_grad("kl")
