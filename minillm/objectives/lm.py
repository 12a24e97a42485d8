"""Language-modelling cross-entropy on chosen target tokens, computed in token chunks."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from minillm.objectives.chunked import Head, chunked_head_loss, head_logits_into


def target_rows(hidden: Tensor, input_ids: Tensor, target_mask: Tensor) -> tuple[Tensor, Tensor]:
    """The hidden states that predict target tokens, and those tokens.

    hidden:      [B, L, H] final hidden states (position i predicts token i + 1)
    input_ids:   [B, L] long
    target_mask: [B, L] bool, True where the token is a loss target (never position 0)
    returns:     rows [N, H], targets [N] long, N = target_mask.sum()
    """
    B, L, H = hidden.shape
    assert input_ids.shape == (B, L) and target_mask.shape == (B, L) and target_mask.dtype == torch.bool
    keep = target_mask[:, 1:]  # [B, L-1]: row i of hidden predicts token i + 1
    return hidden[:, :-1][keep], input_ids[:, 1:][keep]


def log_softmax_inplace(x: Tensor, work: Tensor) -> Tensor:
    """x [C, V] becomes log softmax(x) in place; returns softmax(x), written into `work` [C, V]."""
    top = x.amax(-1, keepdim=True)  # [C, 1]
    torch.sub(x, top, out=work).exp_()
    z = work.sum(-1, keepdim=True)  # [C, 1]
    x.sub_(top + z.log())
    return work.div_(z)


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


def ce_sum(
    rows: Tensor, targets: Tensor, head: Head, *, chunk_size: int, token_weights: Tensor | None = None
) -> Tensor:
    """Σ_n w_n · CE(head's logits of rows[n], targets[n]) as a scalar (fp32), chunked over tokens.

    rows: [N, H]; targets: [N] long; head: the model's `Head` ([V, H] weight); token_weights: [N] or None.
    """
    N, H = rows.shape
    assert targets.shape == (N,) and head.weight.shape[1] == H

    def token_fn(logits: Tensor, start: int, end: int) -> Tensor:
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp64 stays fp64
        ce = F.cross_entropy(x, targets[start:end], reduction="none")  # [C]
        return (ce * token_weights[start:end]).sum() if token_weights is not None else ce.sum()

    return chunked_head_loss(rows, head, token_fn, chunk_size=chunk_size)


def ce_kd_sum(
    rows: Tensor,
    targets: Tensor,
    head: Head,
    *,
    chunk_size: int,
    teacher: tuple[Tensor, Head] | None = None,
    kd_ratio: float = 0.0,
) -> Tensor:
    """Σ_n (1 − r)·CE(q_n, y_n) + r·KL(p_n ‖ q_n) with r = kd_ratio: MiniLLM's PT loss, in one chunked pass
    whose logit gradient is closed-form, q − (1 − r)·onehot(y) − r·p (no autograd through log-softmax,
    one student head pass for both terms).

    rows:    [N, H] student hidden states; targets: [N] long
    head:    the student's `Head` ([V, H] weight)
    teacher: (teacher_rows [N, H_t], the teacher's `Head`) giving p, or None for CE alone (r = 0)
    returns: scalar, fp32 at least
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
    work = torch.empty(min(chunk_size, N), V, dtype=dt, device=rows.device)  # [C, V]
    t_buf = torch.empty_like(work) if use_teacher else None

    def token_fn(logits: Tensor, start: int, end: int) -> tuple[Tensor, Tensor]:
        n = end - start
        logp = None
        if t_buf is not None:  # first, while `work` is free scratch
            logp = head_log_probs_into(t_buf[:n], teacher[0][start:end], teacher[1], work[:n])
        logq = logits.to(dt)
        q = log_softmax_inplace(logq, work[:n])  # [n, V]
        pick = targets[start:end, None]
        loss = (1 - r) * -logq.gather(-1, pick).sum()
        grad = q
        if logp is not None:
            diff = logq.sub_(logp).neg_()  # [n, V] log p − log q
            p = logp.exp_()
            loss = loss + r * torch.bmm(p[:, None, :], diff[:, :, None]).sum()
            grad = q.sub_(p, alpha=r)
        grad.scatter_add_(-1, pick, grad.new_full((n, 1), r - 1))
        return loss, grad

    return chunked_head_loss(rows, head, token_fn, chunk_size=chunk_size, closed_form=True)


def divergence_sum(
    rows: Tensor,
    teacher_rows: Tensor,
    head: Head,
    teacher_head: Head,
    divergence: Callable[[Tensor, Tensor, Tensor], Tensor],
    *,
    chunk_size: int,
    token_weights: Tensor | None = None,
) -> Tensor:
    """Σ_n w_n · D(student_n ‖ teacher_n) as a scalar, never holding more than a chunk of logits.

    rows:         [N, H] student hidden states (gradients flow here and into the student head)
    teacher_rows: [N, H_t] teacher hidden states of the same positions (constants)
    head, teacher_head: each model's `Head` ([V, H] and [V, H_t] weights); V must agree
    divergence:   a function of `minillm.objectives.divergences` with its parameters bound,
                  (student_logits [B, T, V], teacher_logits [B, T, V], mask [B, T]) -> [B, T]
    token_weights: [N] or None (= 1)
    """
    N, H = rows.shape
    assert teacher_rows.shape[0] == N, f"{teacher_rows.shape[0]} teacher rows for {N} student rows"
    V, V_t = head.weight.shape[0], teacher_head.weight.shape[0]
    if V_t != V:
        raise ValueError(f"student vocabulary {V} != teacher vocabulary {V_t}")

    def token_fn(logits: Tensor, start: int, end: int) -> Tensor:
        with torch.no_grad():
            t_logits = teacher_head.logits(teacher_rows[start:end])  # [C, V]
        ones = torch.ones(1, end - start, dtype=torch.bool, device=logits.device)
        per_token = divergence(logits[None], t_logits[None], ones)[0]  # [C]
        return (per_token * token_weights[start:end]).sum() if token_weights is not None else per_token.sum()

    return chunked_head_loss(rows, head, token_fn, chunk_size=chunk_size)


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
