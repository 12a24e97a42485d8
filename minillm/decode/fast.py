"""The fast sampler: static KV cache prefilled in length groups, one preallocated decode mask, output
buffers allocated once, one fused step (warp, mix, draw, EOS bookkeeping) and ended rows compacted out
(`minillm/rollout.py` docstring)."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache, StaticCache

from minillm.data.tokenize import length_groups
from minillm.decode.cache import prefill, with_cache
from minillm.decode.draw import (
    Generators,
    Sampling,
    check_ban,
    inverse_cdf,
    mixed_draw,
    ngram_ban,
    uniforms,
)
from minillm.decode.packing import PACK_MIN_TOKENS, packed_linears
from minillm.models import decoder_layers, note_path, vocab_size

# The fast path drops ended rows from the batch (their caches, masks, inputs) once they are at least 1/8 of the
# rows it decodes: each drop copies the caches once (about half a decode step) and every later step costs
# per row (a teacher row-step ~6 ms of CPU at 16 and at 32 rows). 0 = never.
COMPACT_AT = 8


@dataclass
class Buffers:
    """Preallocated outputs of the fast path, each [B, N]; step t writes column t."""

    ids: Tensor
    mask: Tensor
    logq: Tensor
    logp: Tensor
    logmix: Tensor


def fast_step(
    s_logits: Tensor,
    t_logits: Tensor | None,
    u: Tensor,
    finished: Tensor,
    s: Sampling,
    banned: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Ban, warp, mix, draw and do the EOS bookkeeping of one step in one function (compilable: no Python
    state, fixed shapes).

    s_logits, t_logits: [B, V] fp32 next-token logits (t_logits None when α = 0)
    u:                  [B, 1] float64 uniforms (drawn by the caller, as `draw` does)
    finished:           [B] bool, rows that emitted EOS at an earlier step
    banned:             [B, V] bool, tokens the n-gram ban forbids (None = no ban)
    returns:            ids, logq, logp, log p̃ of this step ([B]; pad / 0 on finished rows) and the
                        updated finished [B]
    """
    plain = s.temperature == 1.0 and s.top_k == 0 and s.top_p == 1.0
    if t_logits is None and plain:
        # the student's own distribution, unwarped, after the ban: one exp pass, no [B, V] log-softmax
        scores = s_logits if banned is None else s_logits.masked_fill(banned, -math.inf)
        top = scores.amax(-1, keepdim=True)  # [B, 1]; finite, as check_ban leaves every row a token
        tok, total = inverse_cdf(torch.sub(scores, top).exp_(), u)
        lmix = (s_logits.gather(-1, tok) - top - total.log()).squeeze(-1).float()
        lq = lmix  # logq is the raw model's: it differs only where tokens were banned
        if banned is not None:
            lq = (s_logits.gather(-1, tok) - s_logits.logsumexp(-1, keepdim=True)).squeeze(-1)
        lp = torch.zeros_like(lq)
    else:
        tok, lq, lp, lmix = mixed_draw(s_logits, t_logits, u, s, banned)
    tok = tok.squeeze(-1)
    ids = torch.where(finished, s.pad, tok)
    zero = torch.zeros_like(lq)
    return (
        ids,
        torch.where(finished, zero, lq),
        torch.where(finished, zero, lp),
        torch.where(finished, zero, lmix),
        finished | (tok == s.eos),
    )


class Decoder:
    """One model's fast decode state: a KV cache and the attention mask handed to it each step.

    Static cache where the model family supports it (`_can_compile_fullgraph`, which holds for every
    family of tests/test_families.py in transformers 5.24), else DynamicCache (`fast_cache`; the path
    is logged once); a static cache of full-attention layers is prefilled in groups of similar prompt
    length (`prefill`). The decode mask is one preallocated [B, P+N] buffer; step t only flips column
    P+t on. For sdpa / eager attention on full-attention layers it goes to the model as a ready 4D mask
    ([B, 1, 1, K] bool view for sdpa, an additive float copy for eager), which skips HF's per-step mask
    construction; otherwise (sliding-window layers, other attention kernels) as the 2D mask. With the 4D
    mask, a static cache hands attention only its filled slots, P + t + 1 of P + N (`_filled_update`).
    """

    def __init__(
        self,
        model: nn.Module,
        prompt_mask: Tensor,
        max_new_tokens: int,
        layers_out: list[Tensor] | None = None,
        head_in: bool = False,
    ) -> None:
        B, P = prompt_mask.shape
        self.model, self.P, self.L, self.V = model, P, P + max_new_tokens, vocab_size(model)
        # where the running forward's positions go in layers_out: (rows, slots) of [B, P+N], and which row of
        # the forward each of those rows takes (None: the forward's rows in order; a prefill of repeated
        # prompts runs each once)
        self.where: tuple[Tensor | slice, slice] = (slice(None), slice(0, P))
        self.expand: Tensor | None = None
        self.hooks = []
        if layers_out is not None:
            layers = decoder_layers(model)
            if len(layers_out) != len(layers):
                raise ValueError(f"layers_out has {len(layers_out)} buffers for {len(layers)} decoder layers")
            for layer, buf in zip(layers, layers_out, strict=True):
                self.hooks.append(layer.register_forward_hook(functools.partial(self._keep, buf)))
        # with head_in: the head's input at the running forward's last position, [B, H] (the rows of
        # `where`), i.e. the final hidden state behind the logits the forward returns
        self.head_in: Tensor | None = None
        self.head_seen = False
        if head_in:
            head = model.get_output_embeddings()
            self.head_in = head.weight.new_empty(B, head.weight.shape[1])
            self.hooks.append(head.register_forward_pre_hook(self._keep_head_in))
        self.cache, fallback = fast_cache(model, self.L)
        self.static = isinstance(self.cache, StaticCache)
        self.cache_kw = with_cache(model, self.cache)
        self.attn = torch.zeros(B, self.L, dtype=torch.bool, device=prompt_mask.device)  # [B, P+N]
        self.attn[:, :P] = prompt_mask
        impl = getattr(model.config, "_attn_implementation", None)
        self.full = not any(getattr(self.cache, "is_sliding", [False]))
        self.mode = impl if impl in ("sdpa", "eager") and self.full else "2d"
        kind = "a static KV cache" if self.static else "a DynamicCache"
        note_path(model, "fast sampling", f"{kind} with a {self.mode} decode mask", fallback)
        self.filled = self.L  # static cache slots the running decode step attends over
        if self.static and self.mode != "2d":
            # Attention over the filled slots only, not all P + N: on average a quarter less of it per step.
            for layer in self.cache.layers:
                layer.update = functools.partial(self._filled_update, layer.update)
        if self.mode == "eager":
            dtype = next(model.parameters()).dtype  # HF's eager attention adds the mask to its scores
            neg = torch.finfo(dtype).min
            self.additive = torch.full((B, 1, 1, self.L), neg, dtype=dtype, device=prompt_mask.device)
            self.additive[:, 0, 0, :P].masked_fill_(prompt_mask, 0.0)

    def _filled_update(
        self, update: Callable[..., tuple[Tensor, Tensor]], *args, **kwargs
    ) -> tuple[Tensor, Tensor]:
        keys, values = update(*args, **kwargs)  # [B, kv heads, P + N, head_dim] each
        return keys[:, :, : self.filled], values[:, :, : self.filled]

    def _spread(self, x: Tensor) -> Tensor:
        """The running forward's rows [R, ...] as the rows of `where` (repeated prompts)."""
        return x if self.expand is None else x[self.expand]

    def _keep(self, buf: Tensor, module: nn.Module, args: tuple, output: Tensor | tuple) -> None:
        rows, slots = self.where
        buf[rows, slots] = self._spread(output[0] if isinstance(output, tuple) else output)

    def _keep_head_in(self, module: nn.Module, args: tuple) -> None:
        self.head_in[self.where[0]] = self._spread(args[0][:, -1])
        self.head_seen = True

    def close(self) -> None:
        """Remove the layer hooks and the cache's update wrappers (a cycle that would keep the cache alive
        until the next garbage collection)."""
        for hook in self.hooks:
            hook.remove()
        for layer in self.cache.layers:
            layer.__dict__.pop("update", None)

    def keep_rows(self, rows: Tensor) -> None:
        """Keep only the batch rows `rows` [B'] (long) in the cache and the decode masks."""
        for layer in self.cache.layers:
            layer.reorder_cache(rows)
        self.attn = self.attn[rows]
        if self.mode == "eager":
            self.additive = self.additive[rows]

    def prefill(self, ids: Tensor) -> Tensor:
        if not self.static:
            return prefill(self.model, ids, self.attn[:, : self.P].long(), self.cache)
        if not self.full:  # sliding layers attend over all L slots: hand them the full-length mask
            return prefill(self.model, ids, self.attn.long(), self.cache)
        # Static cache: the prompts run in groups of similar length, each unpadded but for ≤ 10 %, through a
        # DynamicCache whose keys / values are then copied into the batch's left-padded slots: a batch of 8
        # Dolly prompts is 60-70 % padding at its longest prompt's width. A prompt held by several rows
        # (several samples of it: evaluation's seeds) runs once and its keys / values go to each of them.
        B, P = ids.shape
        holders = prompt_holders(ids, self.attn[:, :P])
        firsts = list(holders)
        lengths = self.attn[:, :P].sum(-1).tolist()
        logits = None
        for group in length_groups([lengths[f] for f in firsts]):
            run = [firsts[i] for i in group]  # the rows the forward runs
            dest = [b for f in run for b in holders[f]]  # every row holding one of their prompts
            rows = torch.tensor(dest, device=ids.device)
            self.expand = torch.tensor([j for j, f in enumerate(run) for _ in holders[f]], device=ids.device)
            width = max(lengths[f] for f in run)
            part = DynamicCache(config=self.model.config)
            self.where = (rows, slice(P - width, P))
            src_rows = torch.tensor(run, device=ids.device)
            out = prefill(
                self.model, ids[src_rows, P - width :], self.attn[src_rows, P - width : P].long(), part
            )
            if logits is None:
                logits = out.new_empty(B, out.shape[-1])
            logits[rows] = out[self.expand]
            for layer, src in zip(self.cache.layers, part.layers, strict=True):
                if not layer.is_initialized:  # allocates [B, heads, L, head_dim] from src's shape and dtype
                    layer.lazy_initialization(
                        src.keys[:1].expand(B, -1, -1, -1), src.values[:1].expand(B, -1, -1, -1)
                    )
                at = rows.to(layer.keys.device)  # a decoder placed apart from its inputs (teacher_device)
                spread = self.expand.to(src.keys.device)
                layer.keys[at, :, P - width : P] = src.keys[spread]
                layer.values[at, :, P - width : P] = src.values[spread]
        self.expand = None
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(P)  # the next token goes to slot P
        return logits

    def decode(self, tok: Tensor, pos: Tensor, t: int) -> Tensor:
        """Feed response token t ([B, 1] at positions pos [B, 1]) into cache slot P+t; logits [B, V] fp32."""
        slot = self.P + t
        self.where = (slice(None), slice(slot, slot + 1))
        self.attn[:, slot] = True
        # key length the attention sees: the filled slots, or all P + N of a static cache given a 2D mask
        K = self.filled = self.L if self.static and self.mode == "2d" else slot + 1
        if self.mode == "sdpa":
            mask = self.attn[:, None, None, :K]  # [B, 1, 1, K] bool view, True = attend
        elif self.mode == "eager":
            self.additive[:, 0, 0, slot] = 0.0
            mask = self.additive[..., :K]
        else:
            mask = self.attn[:, :K].long()
        out = self.model(
            input_ids=tok, attention_mask=mask, position_ids=pos, use_cache=True, **self.cache_kw
        )
        return out.logits[:, -1, : self.V].float()


def prompt_holders(ids: Tensor, mask: Tensor) -> dict[int, list[int]]:
    """Each distinct prompt's first row → every row holding it (the same ids on the same real slots), in
    row order.

    ids: [B, P] long, left-padded; mask: [B, P] bool, True on real tokens
    """
    _, inverse = torch.unique(ids.masked_fill(~mask, -1), dim=0, return_inverse=True)  # [B]
    by_prompt: dict[int, list[int]] = {}
    for b, k in enumerate(inverse.tolist()):
        by_prompt.setdefault(k, []).append(b)
    return {rows[0]: rows for rows in by_prompt.values()}


# What `Decoder` reads and writes on each layer of a StaticCache (transformers 5.24's StaticLayer)
STATIC_LAYER_FIELDS = ("lazy_initialization", "is_initialized", "cumulative_length", "update")


def fast_cache(model: nn.Module, length: int) -> tuple[StaticCache | DynamicCache, str | None]:
    """A static cache of `length` slots where the family declares `_can_compile_fullgraph` and this
    transformers' StaticCache has the fields `Decoder` uses; else a DynamicCache and the reason."""
    if not getattr(model, "_can_compile_fullgraph", False):
        return DynamicCache(config=model.config), "the family does not declare _can_compile_fullgraph"
    try:
        cache = StaticCache(config=model.config, max_cache_len=length)
    except (TypeError, ValueError, AttributeError) as e:
        return DynamicCache(config=model.config), f"StaticCache(config, max_cache_len) failed: {e}"
    missing = [f for f in STATIC_LAYER_FIELDS if not all(hasattr(layer, f) for layer in cache.layers)]
    if missing:
        return DynamicCache(config=model.config), f"its StaticCache layers lack {', '.join(missing)}"
    return cache, None


def sample_fast(
    student: nn.Module,
    teacher: nn.Module | None,
    input_ids: Tensor,
    prompt_mask: Tensor,
    max_new_tokens: int,
    s: Sampling,
    generator: Generators,
    logits_out: Tensor | None,
    layers_out: list[Tensor] | None,
    teacher_rows_out: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fast loop; the outputs of `sample_eager` (the same tokens under one generator, up to rounding)."""
    (B, P), N = input_ids.shape, max_new_tokens
    device = input_ids.device
    run_teacher = s.alpha > 0.0
    if s.ngram:  # prompt + response so far for the n-gram ban, in the decode mask's layout
        seq = torch.full((B, P + N), s.pad, dtype=torch.long, device=device)  # [B, P+N]
        seq[:, :P] = input_ids
        start = P - prompt_mask.sum(-1)  # [B] first real slot of each row
    buf = Buffers(
        ids=torch.full((B, N), s.pad, dtype=torch.long, device=device),
        mask=torch.zeros(B, N, dtype=torch.bool, device=device),
        logq=torch.zeros(B, N, device=device),
        logp=torch.zeros(B, N, device=device),
        logmix=torch.zeros(B, N, device=device),
    )
    pack = N >= PACK_MIN_TOKENS
    with (
        packed_linears(student, B, pack),
        packed_linears(teacher, B, pack) if run_teacher else contextlib.nullcontext(),
        contextlib.closing(Decoder(student, prompt_mask, N, layers_out)) as s_dec,  # closing drops hooks
        contextlib.ExitStack() as stack,
    ):
        s_logits = s_dec.prefill(input_ids)
        t_dec, t_logits = None, None
        if run_teacher:
            t_dec = stack.enter_context(
                contextlib.closing(Decoder(teacher, prompt_mask, N, head_in=teacher_rows_out is not None))
            )
            t_logits = t_dec.prefill(input_ids)
            if teacher_rows_out is not None and not t_dec.head_seen:  # a head applied as a bare matmul
                raise RuntimeError(
                    "teacher_rows_out: the teacher's forward never called its output embedding"
                )
        base = prompt_mask.sum(-1, keepdim=True)  # [B, 1] position of the first response token
        pos = torch.empty_like(base)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        # ended rows leave the batch only where nothing is written per step at batch positions
        compact = COMPACT_AT > 0 and logits_out is None and layers_out is None
        compact = compact and teacher_rows_out is None
        live: Tensor | slice = slice(None)  # the original row of each row decoded (all, until a drop)
        # one generator: B uniforms a step, row b takes the b-th, ended or not (as `draw`); one per row: only
        # the rows decoded draw, each from its own
        shared = isinstance(generator, torch.Generator)
        T = N
        for t in range(N):
            if logits_out is not None:
                logits_out[:, t] = s_logits
            if teacher_rows_out is not None:
                teacher_rows_out[:, t] = t_dec.head_in
            u = uniforms(generator, B, device)[live] if shared else uniforms(generator, len(finished), device)
            banned = None
            if s.ngram:
                banned = ngram_ban(seq[:, : P + t], start, s.ngram, s_logits.shape[-1])
                banned &= ~finished[:, None]
                check_ban(banned)
            nxt, lq, lp, lmix, done = fast_step(s_logits, t_logits, u, finished, s, banned)
            if s.ngram:
                seq[:, P + t] = nxt
            buf.ids[live, t] = nxt
            buf.mask[live, t] = ~finished
            buf.logq[live, t] = lq
            buf.logp[live, t] = lp
            buf.logmix[live, t] = lmix
            finished = done
            ended = int(finished.sum())
            if ended == len(finished) or t == N - 1:
                T = t + 1
                break
            if compact and ended * COMPACT_AT >= len(finished):  # dropped rows keep pad / False / 0
                keep = (~finished).nonzero().squeeze(1)  # [B']
                live = keep if isinstance(live, slice) else live[keep]
                finished, base, nxt = finished[keep], base[keep], nxt[keep]
                pos = torch.empty_like(base)
                if s.ngram:
                    seq, start = seq[keep], start[keep]
                if not shared:
                    generator = [generator[i] for i in keep.tolist()]
                s_dec.keep_rows(keep)
                if t_dec is not None:
                    t_dec.keep_rows(keep)
            torch.add(base, t, out=pos)
            s_logits = s_dec.decode(nxt[:, None], pos, t)
            if t_dec is not None:
                t_logits = t_dec.decode(nxt[:, None], pos, t)
    return buf.ids[:, :T], buf.mask[:, :T], buf.logq[:, :T], buf.logp[:, :T], buf.logmix[:, :T]
