"""objectives.lm against plain full-logit float64 computations: token log-probs, CE and divergence sums."""

import pytest
import torch
import torch.nn.functional as F
from tolerances import TOL

from minillm.objectives.divergences import forward_kl
from minillm.objectives.lm import ce_sum, divergence_sum, token_logprobs

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
    got = token_logprobs(rows, d["targets"], (weight, bias), chunk_size=chunk_size)
    logits = F.linear(rows.double(), weight.double(), None if bias is None else bias.double())
    want = logits.log_softmax(-1).gather(-1, d["targets"][:, None])[:, 0]
    assert got.dtype == torch.float32 and got.shape == (N,)
    # an fp32 result; bf16 inputs also give bf16 logits
    torch.testing.assert_close(got.double(), want, **TOL[dtype if dtype == torch.bfloat16 else torch.float32])


@pytest.mark.parametrize("chunk_size", [4, N])
def test_ce_and_divergence_sums_value_and_grads(chunk_size):
    d = _data(1)

    def run(chunked: bool) -> list[torch.Tensor]:
        rows, weight, bias = (d[k].clone().requires_grad_() for k in ("rows", "weight", "bias"))
        w = d["token_weights"]
        t_head = (d["t_weight"], None)
        if chunked:
            ce = ce_sum(rows, d["targets"], weight, bias, chunk_size=chunk_size, token_weights=w)
            kl = divergence_sum(
                rows, d["t_rows"], (weight, bias), t_head, forward_kl, chunk_size=chunk_size, token_weights=w
            )
        else:
            logits = F.linear(rows, weight, bias)
            ce = (w * F.cross_entropy(logits, d["targets"], reduction="none")).sum()
            logp = F.linear(d["t_rows"], d["t_weight"]).log_softmax(-1)
            kl = (w * (logp.exp() * (logp - logits.log_softmax(-1))).sum(-1)).sum()
        (ce + 2 * kl).backward()
        return [ce.detach(), kl.detach(), rows.grad, weight.grad, bias.grad]

    for got, want in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(got, want, **TOL[torch.float64])
