"""objectives.lm against plain full-logit float64 computations: token log-probs, CE and divergence sums."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_divergences import LOGIT_GRAD_CASES
from tolerances import TOL, assert_close_verbose

from minillm.objectives.chunked import Head
from minillm.objectives.divergences import DIVERGENCES, get_logit_grad
from minillm.objectives.lm import ce_kd_sum, token_logprobs

N, V, H = 23, 57, 9


def _data(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        rows=torch.randn(N, H, generator=g, dtype=torch.float64) * 2,
        t_rows=torch.randn(N, H + 2, generator=g, dtype=torch.float64) * 2,
        weight=torch.randn(V, H, generator=g, dtype=torch.float64),
        t_weight=torch.randn(V, H + 2, generator=g, dtype=torch.float64),
        bias=torch.randn(V, generator=g, dtype=torch.float64),
        targets=torch.randint(0, V, (N,), generator=g),
        token_weights=torch.rand(N, generator=g, dtype=torch.float64),
    )


@pytest.mark.parametrize("chunk_size", [1, 5, N, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_token_logprobs(chunk_size, dtype, with_bias):
    d = _data()
    rows, weight = d["rows"].to(dtype), d["weight"].to(dtype)
    bias = d["bias"].to(dtype) if with_bias else None
    got = token_logprobs(rows, d["targets"], Head(weight, bias), chunk_size=chunk_size)
    logits = F.linear(rows.double(), weight.double(), None if bias is None else bias.double())
    want = logits.log_softmax(-1).gather(-1, d["targets"][:, None])[:, 0]
    assert got.dtype == torch.float32 and got.shape == (N,)
    # an fp32 result; bf16 inputs also give bf16 logits
    torch.testing.assert_close(got.double(), want, **TOL[dtype if dtype == torch.bfloat16 else torch.float32])


# (divergence, parameters, kd_ratio): every closed form through the chunked head, endpoints included
KD_CASES = [
    *[(name, params, 1.0) for name, params, *_ in LOGIT_GRAD_CASES],
    ("jsd", {"beta": 0.5}, 0.5),
    ("reverse_kl", {"temperature": 2.0}, 0.5),
]


@pytest.mark.parametrize("name,params,kd_ratio", KD_CASES, ids=[f"{n}{p}-r{r}" for n, p, r in KD_CASES])
@pytest.mark.parametrize("masked", ["random", "all"])
def test_ce_kd_sum_every_divergence_matches_autograd_float64(name, params, kd_ratio, masked):
    """kd_ratio·ΣD + (1 − kd_ratio)·ΣCE over the valid rows of a [B, T] batch (T = 47, V = 123: neither
    divides the chunk of 16), closed form through a scaled head (soft caps: test_heads) with a vocabulary entry
    banned on both sides (a -inf bias), equals float64 autograd through the [B, T, V] divergence:
    value and gradients w.r.t. hidden states, head weight and bias. An all-masked batch gives 0 and
    zero gradients."""
    B, T, V, H = 3, 47, 123, 9
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    t_hidden = torch.randn(B, T, H + 2, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    bias[7] = -math.inf
    t_head = Head(torch.randn(V, H + 2, generator=g, dtype=torch.float64), bias.clone(), 0.5, None)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[targets == 7] = 8  # a banned entry is never a target
    mask = torch.rand(B, T, generator=g) > 0.3 if masked == "random" else torch.zeros(B, T, dtype=torch.bool)

    def leaves() -> list[torch.Tensor]:
        return [x.clone().requires_grad_() for x in (hidden, weight, bias)]

    h, w, b = leaves()
    head = Head(w, b, 1.3, None)
    got = ce_kd_sum(
        h[mask],
        targets[mask],
        head,
        chunk_size=16,
        teacher=(t_hidden[mask], t_head),
        kd_ratio=kd_ratio,
        divergence=get_logit_grad(name, **params),
    )
    got.backward()

    h64, w64, b64 = leaves()
    logits = Head(w64, b64, 1.3, None).logits(h64)  # [B, T, V]
    t_logits = t_head.logits(t_hidden)
    kd = DIVERGENCES[name](logits, t_logits, mask, **params).sum()
    ce = F.cross_entropy(logits[mask], targets[mask], reduction="sum")
    want = kd_ratio * kd + (1 - kd_ratio) * ce
    if want.requires_grad:
        want.backward()
    assert_close_verbose(got, want.detach(), torch.float64)
    for x, ref in ((h, h64), (w, w64), (b, b64)):
        expected = ref.grad if ref.grad is not None else torch.zeros_like(ref)
        assert_close_verbose(x.grad, expected, torch.float64)


@pytest.mark.parametrize("chunk_size", [4, N])
@pytest.mark.parametrize("kd_ratio", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ce_kd_sum_closed_form_value_and_grads(chunk_size, kd_ratio, dtype):
    """MiniLLM's PT loss (1 − r)·CE + r·KL(p ‖ q) from one closed-form pass equals float64 autograd through
    log_softmax, value and every gradient; r = 0 without a teacher is plain CE."""
    d = _data(2)

    def leaves(dt: torch.dtype) -> list[torch.Tensor]:
        return [d[k].to(dt).requires_grad_() for k in ("rows", "weight", "bias")]

    rows, weight, bias = leaves(dtype)
    teacher = (d["t_rows"].to(dtype), Head(d["t_weight"].to(dtype))) if kd_ratio > 0 else None
    got = ce_kd_sum(
        rows, d["targets"], Head(weight, bias), chunk_size=chunk_size, teacher=teacher, kd_ratio=kd_ratio
    )
    got.backward()

    rows64, weight64, bias64 = leaves(torch.float64)
    # the reference sees the same rounded inputs
    with torch.no_grad():
        for ref, x in ((rows64, rows), (weight64, weight), (bias64, bias)):
            ref.copy_(x.double())
    logq = F.linear(rows64, weight64, bias64).log_softmax(-1)
    ce = -logq.gather(-1, d["targets"][:, None]).sum()
    logp = F.linear(d["t_rows"].to(dtype).double(), d["t_weight"].to(dtype).double()).log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum()
    want = (1 - kd_ratio) * ce + kd_ratio * kl
    want.backward()
    tol = TOL[dtype]
    torch.testing.assert_close(got.double(), want.detach(), **tol)
    for g, w in ((rows.grad, rows64.grad), (weight.grad, weight64.grad), (bias.grad, bias64.grad)):
        torch.testing.assert_close(g.double(), w, **tol)


def test_ce_kd_sum_needs_the_teacher_and_its_vocabulary():
    d = _data()
    head = Head(d["weight"], d["bias"])
    with pytest.raises(ValueError, match="teacher"):
        ce_kd_sum(d["rows"], d["targets"], head, chunk_size=4, kd_ratio=0.5)
    other = (d["t_rows"], Head(d["t_weight"][:-1]))
    with pytest.raises(ValueError, match="vocabulary"):
        ce_kd_sum(d["rows"], d["targets"], head, chunk_size=4, teacher=other, kd_ratio=0.5)
