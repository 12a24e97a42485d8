"""What sampling computed, reused by the update that runs at the same weights.

With one inner epoch and one mini-batch per collection (TRL's MiniLLMTrainer default, and the first step
of any collection), the policy-gradient update evaluates the student at exactly the weights it sampled
with. The sampler has then already computed two things that update recomputes: the student's logits at
every sampled position (its head forward, ~1 s per 1024 positions at V = 49k on one CPU core) and every
decoder layer's output at every prompt and response position (its layer forward, ~1.3 s for 8 Dolly
prompts + 128 tokens on the embedded pair). `SamplingCache` keeps both and the first update reads them:

- logits: the closed-form head pass takes them instead of running the head matmul;
- layer outputs: the update's forward returns each layer's kept output without computing it, and backward
  recomputes the layer from its input and backpropagates through it, as gradient checkpointing does: the
  step costs one layer forward less (`_Replay`). That recompute skips the matmul of the layer's last
  linear (Llama's down_proj, a quarter of its FLOPs) where that output only feeds the residual sum the
  layer returns: backward never reads the value (`_output_linear`).

Both equal the update's own computation up to kernel rounding (the sampler runs other matmul kernels and a
KV cache). They are valid only while the weights are unchanged (the update, like sampling, runs without
dropout), so the trainer drops them once the first step's forwards have read them.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable
from transformers.modeling_layers import GradientCheckpointingLayer

from minillm import models
from minillm.config import GKDConfig, MiniLLMConfig
from minillm.objectives.chunked import take_rows


@dataclass
class SamplingCache:
    """The student's side of a collection as the sampler computed it.

    logits: [R x N, V] raw logits, rollout r's step t at r·N + t (N = max_new_tokens)
    index:  [M] the flat place in `logits` of each valid position of this view, row-major `x[mask]` order
    layers: per decoder layer [R, S, H] outputs, row r's position j (prompt then response) at
            S_p − prompt_len_r + j, S_p = `width`, S = S_p + N; None when not kept
    rows:   [B'] the rollouts of this view
    width:  S_p, the prompt width of the `layers` layout
    """

    logits: Tensor
    index: Tensor
    layers: list[Tensor] | None
    rows: Tensor
    width: int

    def select(self, index: Tensor, rows: Tensor) -> SamplingCache:
        """The view of positions `index` [M] and rollouts `rows` [B'] of this view."""
        return replace(self, index=self.index[index], rows=self.rows[rows])

    def logits_into(self, out: Tensor, start: int, end: int) -> Tensor:
        """This view's positions start:end [C, V], read in place when consecutive (the caller may
        overwrite them: they are read once), else written into `out` [C, V] (`take_rows`)."""
        return take_rows(self.logits, self.index[start:end], out)

    @contextlib.contextmanager
    def replay(
        self, model: nn.Module, group: list[int], prompt_len: list[int], seq_len: list[int]
    ) -> Iterator[None]:
        """While inside, a forward of `model` over the sequences of this view's rows `group` (prompt +
        response, unpadded and right-padded to the longest, as `response_rows` builds them; prompt_len and
        seq_len per row of the view) takes every decoder layer's output from the cache (`_Replay`)."""
        assert self.layers is not None
        dev = self.layers[0].device
        length = max(seq_len[i] for i in group)
        pos = torch.arange(length, device=dev)[None, :]  # [1, L]
        last = torch.tensor([seq_len[i] - 1 for i in group], device=dev)[:, None]  # [G, 1]
        start = torch.tensor([self.width - prompt_len[i] for i in group], device=dev)[:, None]  # [G, 1]
        # right padding reads the row's last position: finite values that causality keeps out of every row used
        slots = start + torch.minimum(pos, last)  # [G, L]
        rows = self.rows[group][:, None]  # [G, 1]
        layers = models.decoder_layers(model)
        before = [
            (layer.gradient_checkpointing, layer.training, layer.__dict__.get("_gradient_checkpointing_func"))
            for layer in layers
        ]
        calls: list[bool] = []  # one entry per layer forward routed here: True where it was replayed
        for layer, kept, (_, training, _) in zip(layers, self.layers, before, strict=True):
            # with both flags on, HF routes the layer's forward through `_gradient_checkpointing_func`; the
            # layer's own train flag only (the RL update runs in eval mode): the replayed forward computes
            # nothing, and backward's recompute runs after the flag is restored, so no dropout is drawn
            layer.gradient_checkpointing = layer.training = True
            layer._gradient_checkpointing_func = functools.partial(
                _replay, kept[rows, slots], layer, training, calls
            )
        try:
            yield
            if not calls:  # the forward ran every layer itself: right, but nothing was spared
                models.note_path(
                    model,
                    "the sampling cache's layer replay",
                    "full layer forwards",
                    "transformers did not route the decoder layers through _gradient_checkpointing_func",
                )
            elif all(calls):
                models.note_path(model, "the sampling cache's layer replay", "replayed layer outputs")
        finally:
            for layer, (flag, training, func) in zip(layers, before, strict=True):
                layer.gradient_checkpointing, layer.training = flag, training
                if func is None:
                    del layer._gradient_checkpointing_func
                else:
                    layer._gradient_checkpointing_func = func


def _replay(
    kept: Tensor,
    layer: nn.Module,
    training: bool,
    calls: list[bool],
    run: Callable[..., Tensor | tuple],
    *args: Tensor,
) -> Tensor | tuple:
    """A `_gradient_checkpointing_func` for HF decoder layers: `run(hidden, *args)` is the layer's forward.
    A layer that does not return its hidden states as one tensor of its input's shape (Falcon's returns a
    tuple) runs in full, in its own train mode (`training`; Falcon's reads it for dropout): the replay
    could only return a tensor."""
    with _own_mode(layer, training):
        replayed = bool(args) and args[0].shape == kept.shape and _returns_hidden(layer, run, args)
        calls.append(replayed)
        if not replayed:
            return run(*args)
    hidden, *rest = args  # GPT-2 passes mask etc. positionally
    return _Replay.apply(lambda h: run(h, *rest), hidden, kept, layer)


@contextlib.contextmanager
def _own_mode(layer: nn.Module, training: bool) -> Iterator[None]:
    """The layer's own train flag as it was before `replay` set it to route the layer (submodules keep
    theirs throughout)."""
    routed = layer.training
    layer.training = training
    try:
        yield
    finally:
        layer.training = routed


# Per decoder layer class: whether its forward returns a bare tensor shaped like its input (`_returns_hidden`)
_RETURNS_HIDDEN: dict[type, bool] = {}


def _returns_hidden(layer: nn.Module, run: Callable[..., Tensor | tuple], args: tuple[Tensor, ...]) -> bool:
    """Whether `layer`'s forward returns one tensor shaped like its input, found by running it once per
    layer class without grad; a fallback is logged once (`models.note_path`)."""
    cls = type(layer)
    if cls not in _RETURNS_HIDDEN:
        with torch.no_grad():
            out = run(*args)
        _RETURNS_HIDDEN[cls] = isinstance(out, Tensor) and out.shape == args[0].shape
        if not _RETURNS_HIDDEN[cls]:
            models.note_path(
                layer,
                "the sampling cache's layer replay",
                "full layer forwards",
                f"the layer returns {type(out).__name__}, not its hidden states alone",
            )
    return _RETURNS_HIDDEN[cls]


class _Replay(torch.autograd.Function):
    """A layer whose output is known: forward returns it without computing; backward recomputes the layer
    from its input with grad and backpropagates through it (parameter gradients accumulate directly, as
    in reentrant gradient checkpointing)."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        run: Callable[[Tensor], Tensor | tuple],
        hidden: Tensor,
        kept: Tensor,
        layer: nn.Module,
    ) -> Tensor:
        ctx.run, ctx.layer = run, layer
        ctx.save_for_backward(hidden)
        return kept

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[None, Tensor | None, None, None]:
        (hidden,) = ctx.saved_tensors
        with torch.enable_grad():
            h = hidden.detach().requires_grad_(ctx.needs_input_grad[1])
            out = _recompute(ctx.layer, ctx.run, h)
        torch.autograd.backward(out[0] if isinstance(out, tuple) else out, grad_out)
        return None, h.grad, None, None


# Per decoder layer: the name of its linear whose output value backward never reads, or None (found on the
# layer's first recompute, `_output_linear`).
_SKIPPABLE: weakref.WeakKeyDictionary[nn.Module, str | None] = weakref.WeakKeyDictionary()


def _recompute(layer: nn.Module, run: Callable[[Tensor], Tensor | tuple], h: Tensor) -> Tensor | tuple:
    """`run(h)` with grad for backward, the layer's value-free output linear (if any) left unevaluated."""
    if layer not in _SKIPPABLE:
        outputs: list[tuple[str, Tensor]] = []
        hooks = [
            m.register_forward_hook(lambda _m, _a, y, n=name: outputs.append((n, y)))
            for name, m in layer.named_modules()
            if type(m) is nn.Linear
        ]
        try:
            out = run(h)
        finally:
            for hook in hooks:
                hook.remove()
        _SKIPPABLE[layer] = _output_linear(out[0] if isinstance(out, tuple) else out, outputs)
        return out
    name = _SKIPPABLE[layer]
    linear = None if name is None else layer.get_submodule(name)
    if type(linear) is not nn.Linear or "forward" in linear.__dict__:  # none, or wrapped since (adapters)
        return run(h)
    linear.forward = functools.partial(_unevaluated_linear, linear)  # instance attribute over the class's
    try:
        return run(h)
    finally:
        del linear.forward


def _output_linear(out: Tensor, outputs: list[tuple[str, Tensor]]) -> str | None:
    """The name of the last linear called, when its output y enters the graph of `out` only as a direct
    operand of the final sum (out = r + y): backward then needs y's gradient, equal to out's, but never
    its value. None otherwise (e.g. a norm after it, as in Gemma's post-feed-forward norm, or dropout)."""
    if not outputs or out.grad_fn is None or out.grad_fn.name() != "AddBackward0":
        return None
    name, y = outputs[-1]
    node = y.grad_fn
    if node is None or node not in [n for n, _ in out.grad_fn.next_functions]:
        return None
    uses, seen, todo = 0, set(), [out.grad_fn]
    while todo:  # every edge into y's node in the graph (the layer's own nodes down to its inputs)
        fn = todo.pop()
        for nxt, _ in fn.next_functions:
            if nxt is None:
                continue
            uses += nxt is node
            if nxt not in seen and nxt is not node:
                seen.add(nxt)
                todo.append(nxt)
    return name if uses == 1 else None


def _unevaluated_linear(linear: nn.Linear, x: Tensor) -> Tensor:
    return _UnevaluatedLinear.apply(x, linear.weight, linear.bias)


class _UnevaluatedLinear(torch.autograd.Function):
    """x @ W.T + b for a recompute that never reads the value (`_output_linear`): forward returns zeros of
    the output's shape without the matmul; backward gives the linear's true gradients (those need only x,
    W and the incoming gradient)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return x.new_zeros(()).expand(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])  # [rows, out]
        gx = grad @ weight if ctx.needs_input_grad[0] else None
        gw = g2.T @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def sampling_buffers(
    student: nn.Module, rollouts: int, cfg: MiniLLMConfig | GKDConfig, *, layers: bool
) -> tuple[Tensor, list[Tensor] | None] | None:
    """Empty stores for one collection: logits [rollouts x max_new_tokens, V] fp32 and, with `layers`, the
    decoder layers' outputs [rollouts, max_prompt_length + max_new_tokens, H] each in the model's dtype
    (on its device; untouched pages of a CPU `torch.empty` take no memory). None when they exceed
    `sampling_cache_mib`.
    `layers` needs the fast sampler, HF checkpointable decoder layers, and no autocast or gradient sync
    around the update (its backward bypasses both)."""
    param = next(student.parameters())
    V, H = models.output_head(student).weight.shape
    N, S = cfg.max_new_tokens, cfg.max_prompt_length + cfg.max_new_tokens
    decoder = models.decoder_layers(student)
    checkpointable = all(isinstance(m, GradientCheckpointingLayer) for m in decoder)
    if layers and cfg.fast_rollout and not checkpointable:
        models.note_path(
            student,
            "the sampling cache's layer replay",
            "full layer forwards",
            "its decoder layers are not transformers GradientCheckpointingLayers",
        )
    # nor are layers kept once their class is known to return more than its hidden states (`_replay`)
    replayable = checkpointable and all(_RETURNS_HIDDEN.get(type(m), True) for m in decoder)
    keep = layers and cfg.fast_rollout and replayable
    size = rollouts * N * V * 4 + (len(decoder) * rollouts * S * H * param.element_size() if keep else 0)
    if size > cfg.sampling_cache_mib * 2**20:
        return None
    logits = torch.empty(rollouts * N, V, device=param.device)
    if not keep:
        return logits, None
    return logits, [torch.empty(rollouts, S, H, dtype=param.dtype, device=param.device) for _ in decoder]
