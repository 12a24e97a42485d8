"""One per-dtype tolerance table for comparing a computation against its float64 reference.

Key = the dtype the computation under test ran in (its inputs, or its maths). Compare with
``assert_close_verbose``, which applies |actual − expected| ≤ atol + rtol·|expected| elementwise.
"""

import torch
from torch import Tensor

TOL: dict[torch.dtype, dict[str, float]] = {
    # Both sides exact double maths; they differ only in operation order (log-softmax vs explicit
    # sums, chunked vs whole sums): measured ≤ 4e-15 relative at V = 123. The margin covers V ~ 1e5 and
    # long accumulations; atol is for quantities that should be 0 (KL(p ‖ p)).
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    # Unit roundoff 6e-8; a log-softmax plus a V-term sum measured ≤ 1e-6 relative (V = 123, logits up
    # to ±40). 10x margin for larger vocabularies and other summation orders; atol for values near 0.
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    # Inputs keep 8 significant bits (unit roundoff 2^-9 ≈ 2e-3): rounding a logit of size x moves
    # log-probs by ~x·2e-3, and KL-type values by as much (measured ≤ 1.7e-2 relative for N(0, 3²)
    # logits, 2.7e-3 for N(0, 1)). Maths after the upcast is fp32 and adds nothing visible.
    torch.bfloat16: dict(rtol=2e-2, atol=2e-3),
}


def assert_close_verbose(actual: Tensor, expected: Tensor, dtype: torch.dtype, max_report: int = 10) -> None:
    """Assert ``actual`` matches ``expected`` within ``TOL[dtype]``; on failure list the first mismatches.

    Both sides are compared in float64. NaN never matches; +inf matches +inf.
    """
    tol = TOL[dtype]
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a = actual.detach().to(device="cpu", dtype=torch.float64)
    e = expected.detach().to(device="cpu", dtype=torch.float64)
    close = torch.isclose(a, e, **tol)
    if bool(close.all()):
        return
    bad = (~close).nonzero().tolist()
    lines = [f"{len(bad)}/{a.numel()} elements differ beyond the {dtype} tolerance {tol}:"]
    for index in bad[:max_report]:
        i = tuple(index)
        x, y = a[i].item(), e[i].item()
        lines.append(f"  at {i}: actual {x:.12g}, expected {y:.12g}, |diff| {abs(x - y):.3g}")
    raise AssertionError("\n".join(lines))


# A 2-process run (gloo) against 1 process with the same global batch, fp32 on a CPU
# (tests/test_distributed.py). The two differ only in summation order: the all-reduce adds the ranks'
# gradients, micro-batches are padded to other widths and rows grouped otherwise. Per-step loss and
# gradient norm: measured ≤ 2e-7 relative; 1e-5 leaves room and still sees a factor 2 (a gradient not
# scaled by the number of processes) or another rank's batch. Weights after 3 AdamW steps at lr 1e-2:
# AdamW divides by √v, so where a gradient is near 0 its rounding noise reaches the update in full; measured
# ≤ 4.5e-6 absolute (SFT, KD), 7.8e-6 (SeqKD), 1.5e-5 (GKD, small gradients on sampled responses), against
# ~1e-2 per step for a wrong batch or update.
DISTRIBUTED: dict[str, float] = dict(metric_rtol=1e-5, weight_rtol=1e-5, weight_atol=1e-4)
