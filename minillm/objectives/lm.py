"""Language-modelling cross-entropy on chosen target tokens, computed in token chunks."""

from __future__ import annotations

import torch
from torch import Tensor

from minillm.objectives.chunked import Head, LogitsFn, chunked_head_loss, head_logits_into
from minillm.objectives.divergences import LogitGrad, get_logit_grad, log_softmax_inplace

FORWARD_KL = get_logit_grad("forward_kl")


def head_log_probs_into(out: Tensor, rows: Tensor, head: Head, work: Tensor) -> Tensor:
    """out [C, V] = log softmax of the head's logits of rows [C, H], in out's dtype (fp32 or wider); work
    [C, V] scratch in out's dtype (left holding the softmax). No allocation when rows and head share
    out's dtype."""
    if rows.dtype == head.weight.dtype == out.dtype:
        head_logits_into(out, rows, head)
    else:  # e.g. a bf16 head: the matmul in its dtype, the softmax in out's
        out.copy_(head.logits(rows))
    log_softmax_inplace(out, work)
    return out


def fill_log_probs(out: Tensor, rows: Tensor, head: Head, *, chunk_size: int) -> Tensor:
    """out [N, V] = log softmax of the head's logits of rows [N, H], the softmax C rows at a time (scratch
    [C, V]). When the dtypes agree the head is one matmul over all N rows straight into `out`: on one CPU
    core a [1024, 576] x [576, 49152] GEMM runs at ~70 GFLOP/s, four of 256 rows at ~55."""
    N = len(rows)
    work = out.new_empty(min(chunk_size, N), out.shape[1])
    whole = rows.dtype == head.weight.dtype == out.dtype
    if whole:
        head_logits_into(out, rows, head)
    for start in range(0, N, chunk_size):
        end = min(start + chunk_size, N)
        if whole:
            log_softmax_inplace(out[start:end], work[: end - start])
        else:
            head_log_probs_into(out[start:end], rows[start:end], head, work[: end - start])
    return out


def ce_kd_sum(
    rows: Tensor,
    targets: Tensor,
    head: Head,
    *,
    chunk_size: int,
    teacher: tuple[Tensor, Head] | None = None,
    kd_ratio: float = 0.0,
    divergence: LogitGrad = FORWARD_KL,
    parts: dict[str, float] | None = None,
    scale: float = 1.0,
    logits_into: LogitsFn | None = None,
) -> Tensor:
    """Σ_n (1 − r)·CE(q_n, y_n) + r·D(p_n, q_n) with r = kd_ratio (word-level KD; MiniLLM's PT loss with D
    the forward KL), in one chunked pass whose logit gradient is closed-form, (1 − r)·(q − onehot(y)) +
    r·∂D/∂s (`divergences.get_logit_grad`): no autograd through log-softmax or D, one student head pass
    for both terms, reused [C, V] buffers.

    rows:       [N, H] student hidden states; targets: [N] long
    head:       the student's `Head` ([V, H] weight)
    teacher:    (teacher_rows [N, H_t], the teacher's `Head`) giving p, or None for CE alone (r = 0)
    divergence: D with its parameters bound (default forward KL at temperature 1); CE is at temperature 1
    parts:      if given, receives the unweighted sums {"ce": Σ CE, "kd": Σ D} of the terms computed (a
                term whose weight is 0 is not)
    scale:      multiplies the returned sum and its gradients (`chunked_head_loss`)
    logits_into: supplies the student's logits instead of its head pass (`chunked_head_loss`)
    returns:    scalar, fp32 at least
    """
    N = len(rows)
    r = kd_ratio
    use_teacher = teacher is not None and r > 0.0
    if teacher is None and r != 0.0:
        raise ValueError(f"kd_ratio {r} needs the teacher's rows and head")
    V = head.weight.shape[0]
    if use_teacher and teacher[1].weight.shape[0] != V:
        raise ValueError(f"student vocabulary {V} != teacher vocabulary {teacher[1].weight.shape[0]}")
    dt = torch.promote_types(rows.dtype, torch.float32)
    C = min(chunk_size, N)
    work = torch.empty(3 if use_teacher else 1, C, V, dtype=dt, device=rows.device)  # [3 or 1, C, V]
    t_buf = torch.empty(C, V, dtype=dt, device=rows.device) if use_teacher else None
    # At another temperature D's log q is not CE's: CE's gradient is then formed first, in its own buffer
    ce_apart = use_teacher and r < 1.0 and divergence.temperature != 1.0
    ce_buf = torch.empty(C, V, dtype=dt, device=rows.device) if ce_apart else None
    sums = {} if parts is None else parts

    def add(key: str, value: Tensor) -> None:
        sums[key] = sums.get(key, 0.0) + float(value)

    def token_fn(logits: Tensor, start: int, end: int) -> tuple[Tensor, Tensor]:
        n = end - start
        pick = targets[start:end, None]
        x = logits.to(dt)  # the buffer itself unless bf16
        if not use_teacher:
            q = log_softmax_inplace(x, work[0, :n])  # [n, V]; x is log q
            ce = -x.gather(-1, pick).sum()
            add("ce", ce)
            return ce, q.scatter_add_(-1, pick, q.new_full((n, 1), -1.0))
        ce = grad_ce = None
        if ce_apart:  # log q at temperature 1 in ce_buf, q in work[1], before D takes both buffers
            q = log_softmax_inplace(ce_buf[:n].copy_(x), work[1, :n])
            ce = -ce_buf[:n].gather(-1, pick).sum()
            grad_ce = ce_buf[:n].copy_(q)
        t_logits = t_buf[:n]
        t_rows = teacher[0][start:end]
        if t_rows.dtype == teacher[1].weight.dtype == dt:
            head_logits_into(t_logits, t_rows, teacher[1])
        else:  # e.g. a bf16 teacher: the matmul in its dtype, the maths in fp32
            t_logits.copy_(teacher[1].logits(t_rows))
        kd, grad = divergence(x, t_logits, work[:, :n])
        kd = kd.sum()
        add("kd", kd)
        if r == 1.0:
            return kd, grad
        if grad_ce is None:  # temperature 1: D left log q in x and q in work[0]
            ce = -x.gather(-1, pick).sum()
            grad_ce = work[0, :n]
        add("ce", ce)
        grad = grad.mul_(r).add_(grad_ce, alpha=1.0 - r)
        grad.scatter_add_(-1, pick, grad.new_full((n, 1), r - 1.0))
        return (1.0 - r) * ce + r * kd, grad

    return chunked_head_loss(
        rows, head, token_fn, chunk_size=chunk_size, closed_form=True, logits_into=logits_into, scale=scale
    )


@torch.no_grad()
def token_logprobs(rows: Tensor, targets: Tensor, head: Head, *, chunk_size: int) -> Tensor:
    """log softmax(head's logits of rows)[targets] without grad, chunked over rows.

    rows: [N, H]; targets: [N] long; returns [N] fp32. One [C, V] buffer serves every chunk and the
    log-sum-exp runs in place in it (no [C, V] temporaries to allocate and fault in per chunk).
    """
    N, H = rows.shape
    assert targets.shape == (N,)
    out = torch.empty(N, dtype=torch.float32, device=rows.device)
    buf = torch.empty(
        min(chunk_size, N), head.weight.shape[0], dtype=rows.dtype, device=rows.device
    )  # [C, V]
    for start in range(0, N, chunk_size):
        h = rows[start : start + chunk_size]
        logits = head_logits_into(buf[: len(h)], h, head)
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))  # the buffer itself unless bf16
        picked = x.gather(-1, targets[start : start + chunk_size, None])[:, 0]  # [C]
        top = x.amax(-1, keepdim=True)  # [C, 1]
        out[start : start + chunk_size] = picked - top[:, 0] - x.sub_(top).exp_().sum(-1).log()
    return out
