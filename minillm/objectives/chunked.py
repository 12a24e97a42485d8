"""A head loss computed C rows at a time, so no [N, V] logits tensor ever exists.

The LM head over a 50k vocabulary is distillation's memory peak: an unchunked full-vocabulary KL at
B=64, T=384 holds several [64, 384, 50257] fp32 tensors, 46.8 GiB (docs/design.md §5). Here each chunk's
logits, loss and gradients w.r.t. hidden, weight and bias are computed inside forward and the chunk's
graph is dropped at once (Liger-Kernel's fused-linear approach); backward only scales the stored
gradients by grad_output, so the head matmul is never recomputed. Peak extra memory is O(C·V) for
one chunk, plus the [N, H], [V, H] and [V] gradient buffers autograd would hold anyway.

A loss whose gradient w.r.t. the logits has a closed form can skip autograd altogether
(`closed_form=True`): token_fn then gets one [C, V] logits buffer, reused for every chunk, overwrites it
in place and returns the gradient in it (or in its own buffer). On a CPU this halves the full-vocabulary
passes and keeps the allocator from mapping and faulting in fresh [C, V] pages every chunk; no library
offers such a fused CPU kernel (Liger-Kernel's fused linear losses are Triton, GPU only).

Some families transform hidden @ Wᵀ + b further before their logits: a scale (Granite divides by
`logits_scaling`, Cohere multiplies by `logit_scale`) and a tanh soft-cap (Gemma 2/3's
`final_logit_softcapping`). A `Head` carries both, every head pass here applies them, and the closed-form
path chains its logit gradient through them, so the chunked maths sees the model's own logits.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

# token_fn(logits [C, V], start, end) -> scalar: summed, already weighted loss of rows start:end;
# with closed_form=True it returns (that scalar, its gradient w.r.t. logits [C, V]).
TokenFn = Callable[[Tensor, int, int], Tensor | tuple[Tensor, Tensor]]
# logits_into(out [C, V], start, end) -> the logits of rows start:end, written into out (closed form only).
LogitsFn = Callable[[Tensor, int, int], Tensor]


@dataclass(frozen=True)
class Head:
    """How a model turns final hidden states into logits: with z = hidden @ weight.T + bias,
    logits = softcap · tanh(logit_scale · z / softcap), or logit_scale · z when softcap is None.

    weight:      [V, H] output embedding (may be tied to the input embedding; only its first V rows when
                 the vocabulary is cut to the tokenizer's, `models.output_head`)
    bias:        [V] or None
    logit_scale: multiplies z (Granite: 1 / logits_scaling; Cohere: logit_scale; 1 for most families)
    softcap:     the tanh cap (Gemma 2/3: final_logit_softcapping), or None
    """

    weight: Tensor
    bias: Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None

    def finish_(self, z: Tensor) -> Tensor:
        """z [C, V] = hidden @ W.T + b becomes the model's logits, in place."""
        if self.logit_scale != 1.0:
            z.mul_(self.logit_scale)
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def logits(self, hidden: Tensor) -> Tensor:
        """The model's logits [N, V] of hidden [N, H], differentiable, in the matmul's dtype."""
        return self.transform(F.linear(hidden, self.weight, self.bias))

    def transform(self, z: Tensor) -> Tensor:
        """`finish_` out of place and differentiable: z [C, V] → logits [C, V]."""
        if self.logit_scale != 1.0:
            z = z * self.logit_scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def cap_slope_into(self, out: Tensor, logits: Tensor) -> Tensor:
        """out [C, V] = d logits / d(logit_scale · z) = 1 − (logits / softcap)² (d tanh), from the capped
        logits [C, V] themselves; the chain rule's logit_scale factor is the caller's."""
        return torch.div(logits, self.softcap, out=out).square_().neg_().add_(1.0)


def head_logits_into(out: Tensor, hidden: Tensor, head: Head) -> Tensor:
    """The model's logits of hidden [C, H] (`Head`) written into the preallocated `out` [C, V]."""
    if head.bias is None:
        torch.mm(hidden, head.weight.T, out=out)
    else:
        torch.addmm(head.bias, hidden, head.weight.T, out=out)
    return head.finish_(out)


def take_rows(src: Tensor, at: Tensor, out: Tensor) -> Tensor:
    """src[at] for row indices at [C]: a view of src when they are consecutive (a cached chunk read in
    order: no [C, V] copy), else gathered into `out` [C, ...] (cast to its dtype)."""
    if out.dtype != src.dtype:
        return out.copy_(src[at])
    if bool((at.diff() == 1).all()):
        return src[int(at[0]) : int(at[0]) + len(at)]
    return torch.index_select(src, 0, at, out=out)


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        head: Head,
        token_fn: TokenFn,
        chunk_size: int,
        grad_enabled: bool,
        closed_form: bool,
        logits_into: LogitsFn | None,
        scale: float,
    ) -> Tensor:
        N, H = hidden.shape
        # forward always runs under no_grad; the caller's grad mode says whether grads are wanted at all.
        need_h, need_w, need_b = (grad_enabled and need for need in ctx.needs_input_grad[:3])
        need_any = need_h or need_w or need_b
        # Weight and bias gradients sum over N/C chunks: accumulate in fp32 at least, round once at the end.
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_hidden = torch.zeros_like(hidden) if need_h else None  # [N, H]
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None  # [V, H]
        grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None  # [V]
        w = weight.detach()
        b = bias.detach() if bias is not None else None
        # d loss / d z of the autograd path includes the head's scale; the closed form's is w.r.t. the
        # logits, so its chain rule's scale factor rides on the gradient matmuls' alpha
        alpha = scale * head.logit_scale if closed_form else scale
        total = None
        dev = hidden.device.type
        # The head matmul runs in autocast's dtype when it is on; token_fn never does: log-probabilities, KL
        # terms and the teacher's logits stay fp32 (autocast would run token_fn's bmm / linear in bf16).
        fp32_maths = torch.autocast(dev, enabled=False)
        if closed_form:
            # One dtype for the shared buffer: autocast's if on (out= variants are not autocast), else the
            # inputs'. token_fn upcasts what it reads, as in the autograd path.
            cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
            w, b = w.to(cd), None if b is None else b.to(cd)
            buf = torch.empty(min(chunk_size, N), weight.shape[0], dtype=cd, device=hidden.device)  # [C, V]
            # d tanh of a soft-capped head, taken before token_fn overwrites the logits
            slope = torch.empty_like(buf) if head.softcap is not None and need_any else None
        chunk_head = Head(w, b, head.logit_scale, head.softcap)  # in the buffer's dtype (closed form)
        for start in range(0, N, chunk_size):
            end = min(start + chunk_size, N)
            h = hidden[start:end].detach()  # [C, H]
            grad_logits = None
            if closed_form:
                if logits_into is not None:
                    logits = logits_into(buf[: end - start], start, end)
                else:
                    logits = head_logits_into(buf[: end - start], h.to(w.dtype), chunk_head)
                if slope is not None:
                    head.cap_slope_into(slope[: end - start], logits)
                with fp32_maths:
                    loss, grad_logits = token_fn(logits, start, end)
                grad_logits = grad_logits.to(w.dtype)
                if slope is not None:
                    grad_logits.mul_(slope[: end - start])
            else:
                with torch.enable_grad():
                    # A fresh leaf: token_fn's graph starts at z and is freed after autograd.grad.
                    z = F.linear(h, w, b).requires_grad_(need_any)  # [C, V], in the input dtype
                    with fp32_maths:
                        loss = token_fn(head.transform(z), start, end)
                if need_any and loss.requires_grad:  # a chunk whose loss is a constant has zero gradients
                    (grad_logits,) = torch.autograd.grad(loss, z)  # [C, V]
            assert loss.dim() == 0, f"token_fn must return a scalar sum, got shape {tuple(loss.shape)}"
            if need_any and grad_logits is not None:
                if need_h:
                    grad_hidden[start:end] = (grad_logits @ w).mul_(alpha)  # [C, V] @ [V, H] -> [C, H]
                if need_w:  # [V, C] @ [C, H] -> [V, H]
                    grad_weight.addmm_(grad_logits.T.to(acc), h.to(acc), alpha=alpha)
                if need_b:
                    grad_bias.add_(grad_logits.sum(0, dtype=acc), alpha=alpha)  # [V]
            loss = loss.detach()
            total = loss.to(torch.promote_types(loss.dtype, torch.float32)) if total is None else total + loss
        if total is None:  # N == 0
            total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
        ctx.save_for_backward(
            grad_hidden,
            grad_weight.to(weight.dtype) if need_w else None,
            grad_bias.to(bias.dtype) if need_b else None,
        )
        return total * scale

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        rest = (None,) * 7
        # A caller that normalises through `scale` backpropagates 1: the stored gradients go out as they are,
        # sparing a fresh [V, H] product (~0.1 s of page faults and 113 MB at V = 49k on a CPU).
        if grad_output.device.type == "cpu" and float(grad_output) == 1.0:
            return (*ctx.saved_tensors, *rest)
        return (*[None if g is None else g * grad_output.to(g.dtype) for g in ctx.saved_tensors], *rest)


def chunked_head_loss(
    hidden: Tensor,
    head: Head,
    token_fn: TokenFn,
    *,
    chunk_size: int,
    closed_form: bool = False,
    logits_into: LogitsFn | None = None,
    scale: float = 1.0,
) -> Tensor:
    """Σ over row chunks of ``token_fn(head's logits of hidden[start:end], start, end)``, memory O(C·V).

    hidden:     [N, H] final hidden states of the rows to train on, any float dtype; pass only the
                valid rows (e.g. ``hidden[mask]``) to skip the head on padding
    head:       the model's `Head`: weight [V, H] (may be tied to the input embedding; its gradient
                accumulates into the same Parameter through autograd as usual), bias [V] or None, and
                the logit scale and soft-cap the model applies after them
    token_fn:   ``(logits [C, V], start, end) -> scalar``: the SUM of the already weighted per-token
                losses of rows start:end. It closes over the data for those rows (targets, weights,
                teacher hidden states or logits, computed or sliced there under no_grad). Logits come in
                the input dtype (bf16 hidden gives bf16 logits); upcast inside, as the divergences do.
                Only hidden, weight and bias receive gradients: other tensors token_fn reads are constants.
    chunk_size: C, rows per chunk (≥ 1); the last chunk may be shorter
    closed_form: token_fn returns (loss, grad_logits [C, V]) and may overwrite its logits argument, a
                buffer shared by all chunks; autograd is not used (module docstring). The gradient is
                w.r.t. the head's final logits; the chain rule through scale and soft-cap is applied here
    logits_into: closed form only: ``(out [C, V], start, end) -> logits`` supplies rows start:end's
                final logits (e.g. kept from sampling with the same weights) instead of the head pass
    scale:      multiplies the returned sum and its gradients (e.g. 1 / token count), folded into the
                gradient matmuls instead of a pass over [V, H] in backward
    returns:    scalar, fp32 at least (the chunk losses' dtype if wider); gradients w.r.t. hidden, weight
                and bias equal those of the unchunked loss. Not twice differentiable.
    """
    N, H = hidden.shape
    weight, bias = head.weight, head.bias
    V = weight.shape[0]
    assert weight.shape == (V, H), f"weight {tuple(weight.shape)} != (V, H) = {(V, H)}"
    assert bias is None or bias.shape == (V,), f"bias {tuple(bias.shape)} != (V,) = {(V,)}"
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if logits_into is not None and not closed_form:
        raise ValueError("logits_into needs closed_form=True")
    return _ChunkedHeadLoss.apply(
        hidden,
        weight,
        bias,
        head,
        token_fn,
        chunk_size,
        torch.is_grad_enabled(),
        closed_form,
        logits_into,
        scale,
    )
