"""chunked_head_loss against the plain unchunked head + loss: values, gradients, tied weights, memory."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close_verbose

from minillm.objectives.chunked import Head, chunked_head_loss, take_rows
from minillm.objectives.divergences import reverse_kl

N, V, H, H_TEACHER = 47, 123, 19, 11


def _problem(dtype: torch.dtype = torch.float64, seed: int = 0) -> dict:
    """Student head inputs and the per-row data a token_fn closes over, seeded."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    mask = torch.rand(N, generator=g) > 0.25  # [N] rows trained on
    return dict(
        hidden=randn(N, H),
        weight=randn(V, H) * 0.5,
        bias=randn(V),
        teacher_hidden=randn(N, H_TEACHER),
        teacher_weight=randn(V, H_TEACHER) * 0.5,
        targets=torch.randint(0, V, (N,), generator=g),
        mask=mask,
        row_weight=mask.double() * torch.rand(N, generator=g, dtype=torch.float64),  # [N], 0 on masked rows
    )


def _token_fn(data: dict, calls: list | None = None):
    """Weighted reverse KL to a teacher whose logits are computed per chunk, plus half a CE term."""

    def token_fn(logits: torch.Tensor, start: int, end: int) -> torch.Tensor:
        if calls is not None:
            calls.append((tuple(logits.shape), start, end))
        with torch.no_grad():
            teacher_logits = data["teacher_hidden"][start:end] @ data["teacher_weight"].T  # [C, V]
        mask = data["mask"][start:end]
        kl = reverse_kl(logits[None], teacher_logits[None], mask[None])[0]  # [1, C, V] -> [C]
        ce = F.cross_entropy(logits.to(kl.dtype), data["targets"][start:end], reduction="none")  # [C]
        return (data["row_weight"][start:end].to(kl.dtype) * (kl + 0.5 * ce)).sum()

    return token_fn


def _loss_and_grads(
    data: dict, chunk_size: int | None, grad_scale: float = 1.0, calls: list | None = None, scale: float = 1.0
):
    """Loss and grads w.r.t. hidden, weight, bias; chunk_size None is the plain unchunked reference (times
    `scale`, which the chunked call takes as its argument)."""
    leaves = [data[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    hidden, weight, bias = leaves
    token_fn = _token_fn(data, calls)
    if chunk_size is None:
        loss = token_fn(F.linear(hidden, weight, bias), 0, N) * scale
    else:
        loss = chunked_head_loss(hidden, Head(weight, bias), token_fn, chunk_size=chunk_size, scale=scale)
    (loss * grad_scale).backward()
    return loss.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("chunk_size", [1, 7, 16, N, 100])
def test_chunked_equals_unchunked_float64(chunk_size):
    data = _problem()
    calls = []
    loss, grads = _loss_and_grads(data, chunk_size, grad_scale=2.5, calls=calls)
    ref_loss, ref_grads = _loss_and_grads(data, None, grad_scale=2.5)
    assert_close_verbose(loss, ref_loss, torch.float64)
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert_close_verbose(grad, ref, torch.float64)
    # token_fn saw consecutive chunks of at most chunk_size rows tiling [0, N).
    assert [c[1] for c in calls] == list(range(0, N, chunk_size))
    assert all(shape == (end - start, V) and end - start <= chunk_size for shape, start, end in calls)
    assert calls[-1][2] == N


@pytest.mark.parametrize("grad_scale", [1.0, 2.5], ids=["backward 1", "backward 2.5"])
def test_scale_folds_into_value_and_gradients(grad_scale):
    """scale=s gives s times the loss and every gradient, whether backward then brings 1 (the stored
    gradients leave as they are) or another factor."""
    data = _problem(seed=6)
    loss, grads = _loss_and_grads(data, 7, grad_scale=grad_scale, scale=1 / 3)
    ref_loss, ref_grads = _loss_and_grads(data, None, grad_scale=grad_scale, scale=1 / 3)
    assert_close_verbose(loss, ref_loss, torch.float64)
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert_close_verbose(grad, ref, torch.float64)


@pytest.mark.parametrize("chunk_size", [1, 7, N, 100])
def test_closed_form_equals_autograd_path(chunk_size):
    """closed_form=True: a weighted CE whose logit gradient is written by hand, in the shared buffer,
    gives the plain unchunked autograd loss and gradients (hidden, weight, bias; short last chunk)."""
    data = _problem(seed=4)
    targets, row_weight = data["targets"], data["row_weight"]
    buffers = set()

    def closed(logits, start, end):
        buffers.add(logits.untyped_storage().data_ptr())
        w = row_weight[start:end, None]  # [C, 1]
        loss = (w[:, 0] * F.cross_entropy(logits, targets[start:end], reduction="none")).sum()
        grad = logits.softmax(-1).mul_(w)  # d/ds of w·CE = w·(softmax − onehot)
        grad.scatter_add_(-1, targets[start:end, None], -w)
        logits.fill_(float("nan"))  # the buffer is token_fn's to overwrite
        return loss, grad

    def plain(logits, start, end):
        ce = F.cross_entropy(logits, targets[start:end], reduction="none")
        return (row_weight[start:end] * ce).sum()

    results = []
    for fn, chunk, closed_form in ((closed, chunk_size, True), (plain, None, False)):
        leaves = [data[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
        if chunk is None:
            loss = fn(F.linear(*leaves), 0, N)
        else:
            loss = chunked_head_loss(
                leaves[0], Head(leaves[1], leaves[2]), fn, chunk_size=chunk, closed_form=closed_form
            )
        (3.0 * loss).backward()
        results.append([loss.detach(), *(x.grad for x in leaves)])
    for got, want in zip(*results, strict=True):
        assert_close_verbose(got, want, torch.float64)
    assert len(buffers) == 1  # one logits buffer served every chunk


def test_tied_weight_accumulates_head_and_embedding_gradients():
    data = _problem(seed=1)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (N,), generator=g)
    proj = torch.randn(H, H, generator=g, dtype=torch.float64)

    def run(chunk_size: int | None):
        embedding = torch.nn.Parameter(data["weight"].clone())  # [V, H], input embedding and head
        A = proj.clone().requires_grad_()
        hidden = torch.tanh(embedding[ids] @ A)  # [N, H]
        token_fn = _token_fn(data)
        if chunk_size is None:
            loss = token_fn(hidden @ embedding.T, 0, N)
        else:
            loss = chunked_head_loss(hidden, Head(embedding), token_fn, chunk_size=chunk_size)
        loss.backward()
        return loss.detach(), embedding.grad, A.grad

    got, want = run(7), run(None)
    for a, b in zip(got, want, strict=True):
        assert_close_verbose(a, b, torch.float64)
    # Both uses feed the tied weight: its gradient through the head alone differs from the total.
    embedding = torch.nn.Parameter(data["weight"].clone())
    hidden = torch.tanh(embedding[ids] @ proj).detach()
    _token_fn(data)(hidden @ embedding.T, 0, N).backward()
    assert (got[1] - embedding.grad).abs().max() > 1e-3


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    hidden, weight, bias = (torch.randn(*s, generator=g, dtype=torch.float64) for s in [(5, 3), (7, 3), (7,)])
    targets = torch.tensor([0, 6, 3, 3, 1])
    row_weight = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0], dtype=torch.float64)

    def token_fn(logits, start, end):
        ce = F.cross_entropy(logits, targets[start:end], reduction="none")  # [C]
        return (row_weight[start:end] * ce).sum()

    def fn(h, w, b):
        return chunked_head_loss(h, Head(w, b), token_fn, chunk_size=2)

    assert torch.autograd.gradcheck(
        fn, (hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_())
    )


def test_frozen_head_and_constant_chunks():
    data = _problem(seed=3)
    hidden = data["hidden"].clone().requires_grad_()
    weight = data["weight"]  # frozen: no grad wanted
    inner = _token_fn(data)

    def token_fn(logits, start, end):
        # Rows 0..15 contribute nothing and return a constant, as a user's early exit would.
        return logits.new_zeros(()) if end <= 16 else inner(logits, start, end)

    loss = chunked_head_loss(hidden, Head(weight), token_fn, chunk_size=8)
    loss.backward()
    assert weight.grad is None
    assert (hidden.grad[:16] == 0).all()

    ref_hidden = data["hidden"].clone().requires_grad_()
    ref = inner(ref_hidden[16:] @ weight.T, 16, N)
    ref.backward()
    assert_close_verbose(loss, ref, torch.float64)
    assert_close_verbose(hidden.grad[16:], ref_hidden.grad[16:], torch.float64)


def test_no_grad_mode_computes_the_loss_only(monkeypatch):
    data = _problem(seed=5)
    hidden, weight = data["hidden"].clone().requires_grad_(), data["weight"].clone().requires_grad_()
    token_fn = _token_fn(data)

    def no_grads(*args, **kwargs):
        raise AssertionError("gradients computed under no_grad (evaluation would pay for them)")

    monkeypatch.setattr(torch.autograd, "grad", no_grads)
    with torch.no_grad():
        loss = chunked_head_loss(hidden, Head(weight), token_fn, chunk_size=8)
    assert not loss.requires_grad
    assert_close_verbose(loss, token_fn(hidden @ weight.T, 0, N), torch.float64)


def test_bf16_hidden_and_weight():
    data = _problem(dtype=torch.bfloat16, seed=4)
    loss, grads = _loss_and_grads(data, 7)
    ref_loss, ref_grads = _loss_and_grads(data, None)
    assert loss.dtype == torch.float32
    assert_close_verbose(loss, ref_loss, torch.bfloat16)
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert grad.dtype == torch.bfloat16
        assert_close_verbose(grad, ref, torch.bfloat16)


def test_rejects_bad_arguments():
    data = _problem()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_head_loss(data["hidden"], Head(data["weight"]), _token_fn(data), chunk_size=0)
    with pytest.raises(AssertionError, match="weight"):
        chunked_head_loss(data["hidden"], Head(data["weight"][:, :5]), _token_fn(data), chunk_size=4)


# Peak RSS is the reliable CPU measure (torch.profiler's CPU memory events miss allocations made
# outside the profiled ops). A fresh process has a clean high-water mark; a warm-up first pulls in
# the code pages and allocator arenas, which do not grow with N. An unchunked run needs several
# [N, V] fp32 tensors (logits, log-softmax, its gradient): 1.5 GiB each here.
_MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource
    import torch
    import torch.nn.functional as F
    from minillm.objectives.chunked import Head, chunked_head_loss

    N, V, H, C = 3072, 131072, 8, 32
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=g)

    def token_fn(logits, start, end):
        return F.cross_entropy(logits, targets[start:end], reduction="sum")

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()

    chunked_head_loss(hidden[: 2 * C], Head(weight), token_fn, chunk_size=C).backward()
    hidden.grad = weight.grad = None
    before = rss()
    chunked_head_loss(hidden, Head(weight), token_fn, chunk_size=C).backward()
    assert hidden.grad.shape == (N, H) and weight.grad.shape == (V, H)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(N * V * 4, peak - before)
    """
)


def test_peak_memory_does_not_grow_with_rows_times_vocab():
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    unchunked_logits_bytes, extra_peak = map(int, result.stdout.split())
    assert unchunked_logits_bytes >= 1.5 * 2**30
    # Measured ~210 MiB (chunk temporaries of 16 MiB each, plus warm-up and thread buffers).
    assert extra_peak < 512 * 2**20, f"peak grew by {extra_peak / 2**20:.0f} MiB"


def test_take_rows_views_consecutive_rows_and_gathers_the_rest():
    src = torch.arange(40.0).view(10, 4)
    out = torch.full((3, 4), float("nan"))
    got = take_rows(src, torch.tensor([4, 5, 6]), out)
    assert torch.equal(got, src[4:7]) and got.data_ptr() == src[4].data_ptr()  # a view: no copy
    assert torch.isnan(out).all()
    got = take_rows(src, torch.tensor([6, 5, 4]), out)  # consecutive but not in order
    assert torch.equal(got, src[[6, 5, 4]]) and got.data_ptr() == out.data_ptr()
    got = take_rows(src, torch.tensor([0, 2, 9]), out)
    assert torch.equal(got, src[[0, 2, 9]]) and got.data_ptr() == out.data_ptr()
    out64 = torch.empty(3, 4, dtype=torch.float64)  # another dtype: always gathered and cast
    assert torch.equal(take_rows(src, torch.tensor([4, 5, 6]), out64), src[4:7].double())
