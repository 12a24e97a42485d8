"""Teacher-mixed sampling (docs/design.md §1): responses drawn token by token from p̃ = α·p + (1 − α)·q_old.

MiniLLM (Gu et al., ICLR 2024, §2.2) samples its policy-gradient rollouts from a mixture of the frozen
teacher p and the student q_old being trained (α = 0.2), both decoding with their own KV cache, and
corrects for it with the importance weight w_t = q_old(y_t) / p̃(y_t), computed once here.

How temperature / top-k / top-p meet the mixture. Each model's next-token logits are turned into a
sampling distribution the same way: divide by `temperature`, keep the `top_k` largest logits (ties with
the k-th kept, as in HF), then keep the smallest most-probable set whose mass reaches `top_p` (a token is
kept when the mass strictly above it, in descending order, is < top_p). The two distributions p_s, q_s
are then mixed in probability space, p̃ = α·p_s + (1 − α)·q_s. At the paper defaults (1, 0, 1) p_s, q_s
are the raw model distributions. The official code does exactly this mixing (microsoft/LMOps,
minillm/transformers/src/transformers/generation/utils.py @ 2986035, `sample()`: logits processors and
warpers on each model's logits, softmax, `(1 - mix_in_alpha) * probs + mix_in_alpha * m_probs`, then
`torch.multinomial`). Temperature 0 is greedy: the distribution is the point mass on the top token.

The same sampler serves SeqKD, GKD and evaluation (`evaluate/generate.py`, with α = 0). For the latter
`no_repeat_ngram_size` n bans, before any warping (HF applies logits processors before warpers), every
token x such that the row's last n − 1 tokens followed by x already occur in its prompt + response: HF's
`NoRepeatNGramLogitsProcessor` on the unpadded row. (HF's `generate` runs it on the left-padded batch, where
an n-gram through padding could match too; here padding never takes part.) A row whose every token is
banned raises (HF's draw would fail on it).

What is recorded, and where we depart from the official code:
- `logq_old`, `logp` are log-probs of the sampled token under the RAW models (temperature 1, nothing
  filtered): the objective is KL(q_θ ‖ p) of the raw models, so w = q_old(y) / p̃(y) (raw numerator over
  the distribution the token was actually drawn from) is the weight with E_p̃[w·f] = E_q_old[f]. The
  official code recomputes both after sampling with `logits / temperature` and the student's top-k/top-p
  −inf mask applied to both models, and mixes those (LMOps minillm/minillm/trainer.py @ 0b335e4
  `compute_logits_and_log_probs`, minillm/minillm/sampler.py @ 19f288d `run_sample`). Identical at the
  paper defaults.
- The draw is an inverse-CDF draw with one uniform per row per step from the caller's generator, or
  from the row's own generator when given one per row (float64 cumsum, searchsorted), not
  `torch.multinomial`, which draws V exponentials per row (12 ms a step at V = 49152 on 2 CPU cores).
  Same distribution, different random stream: HF `generate` under the same seed gives other tokens.
- With α = 0 the teacher is not run while sampling; `logp` comes from one scoring forward afterwards
  (`score_teacher`). With α > 0 it comes from the sampling loop and equals that forward to fp tolerance.
- Masks come from lengths, never from ids (pad may equal EOS): True up to and including the first EOS.

Two implementations behind `sample_rollout(fast=...)`, giving the same tokens under one generator up to
rounding (packed weights, below); both stop once every row has ended:
- eager reference: HF DynamicCache, 2D attention masks grown by `cat` (HF rebuilds the 4D mask every
  step), full-vocabulary sort for top-p, lists of per-step columns;
- fast path: static KV cache (HF `StaticCache`; DynamicCache for families without
  `_can_compile_fullgraph`) prefilled in groups of similar prompt length instead of all prompts padded to
  the longest (65 % of a Dolly batch's prefill was padding), one preallocated decode mask given to
  attention as a ready 4D view over the filled cache slots only, output buffers allocated once,
  warping / mixing / draw / EOS bookkeeping in one function per step, no work for warping at the
  defaults and a 256-candidate top-p that sorts only rows with a wider nucleus. Rows that have ended
  leave the batch (cache rows, masks, inputs) once they are 1/8 of it (`_COMPACT_AT`), unless a per-step
  output is asked for (`logits_out`, `layers_out`, `teacher_rows_out`): decode is compute-bound on CPU,
  and a batch runs until its longest response ends (teacher, 32 Dolly prompts, ≤ 128 tokens: 13 % less
  CPU, the same tokens; bench/RESULTS.md).
- On CPU in fp32 the fast path runs every `nn.Linear` of the sampled models on a weight reordered once
  per call for oneDNN (`_packed_linears`, what inductor's freezing does): MKL's sgemm reads weights at
  ~4 GB/s for an 8-row input here, the packed kernel ~6 GB/s; sampling 9–26 % faster (bench/RESULTS.md).
  Same maths in fp32, another summation order: tokens can differ from the eager path where a draw falls within
  rounding of a CDF boundary.
- The step function is not compiled: `torch.compile` of it (measured once, bench/RESULTS.md) gained on
  the step at the defaults but lost with top_p < 1 and cost ~25 s of compilation per setting.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from transformers import DynamicCache, StaticCache
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

from minillm.data.tokenize import collate_prompts, length_groups, position_ids
from minillm.models import (
    check_same_vocab,
    decoder_layers,
    grouped_rows,
    note_path,
    output_head,
    unwrap,
    vocab_size,
)
from minillm.objectives.lm import fill_log_probs, token_logprobs

if TYPE_CHECKING:  # the trainer's type, for annotations only: the sampler does not depend on train/
    from minillm.train.sampling_cache import SamplingCache

# Fast top-p looks for the nucleus among this many most probable tokens first and sorts the whole
# vocabulary only when the nucleus is larger (flat distributions); 20-40 ms a step saved at V = 49152.
_TOP_P_CANDIDATES = 256
# The fast step's inverse CDF sums blocks of this many probabilities, then scans one block: a float64
# cumsum over the whole [B, V] row was 1.4 of the step's 3.4 ms at V = 49152 on one core.
_CDF_BLOCK = 1024
# Response tokens per head chunk of `score_teacher` when no chunk_size is given (the configs' default).
_SCORE_ROWS = 256
# Reordering costs about one decode step's weight reads; shorter generations keep the plain kernels.
_PACK_MIN_TOKENS = 8
# The sampler's randomness: one generator for the batch, or one per row
Generators = torch.Generator | list[torch.Generator]
# The fast path drops ended rows from the batch (their caches, masks, inputs) once they are at least 1/8 of the
# rows it decodes: each drop copies the caches once (about half a decode step) and every later step costs
# per row (a teacher row-step ~6 ms of CPU at 16 and at 32 rows). 0 = never.
_COMPACT_AT = 8


@dataclass
class Rollout:
    """A batch of sampled responses with what the policy-gradient update needs, one row per prompt.

    prompt_ids:   [B, P] long, left-padded prompts as given to the sampler
    prompt_mask:  [B, P] bool, True on real prompt tokens
    response_ids: [B, T] long, sampled ids; `pad_token_id` after the end (may equal EOS: use `mask`)
    mask:         [B, T] bool, True up to and including the first EOS, False after it
    truncated:    [B] bool, True where no EOS came within max_new_tokens (then `mask` is all True)
    logq_old:     [B, T] fp32, log q_old(y_t | y_<t, x) of the raw student; 0 where ~mask
    logp:         [B, T] fp32, log p(y_t | y_<t, x) of the raw teacher; 0 where ~mask
    log_w:        [B, T] fp32, log q_old(y_t) − log p̃(y_t), p̃ the sampling mixture; 0 where ~mask
    pad_token_id: id written after the end of a response (and used by `cat` to pad)
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    mask: Tensor
    truncated: Tensor
    logq_old: Tensor
    logp: Tensor
    log_w: Tensor
    pad_token_id: int

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def __getitem__(self, idx: int | slice | Tensor | list[int]) -> Rollout:
        """Rows `idx` (mini-batch slicing); an int keeps the batch dimension."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return Rollout(**{f.name: _rows(getattr(self, f.name), idx) for f in fields(self)})

    def full_inputs(self) -> tuple[Tensor, Tensor]:
        """Prompt + response for a forward pass: ids [B, P+T] long, attention mask [B, P+T] bool.

        Response positions after the end stay attended: they come after every trained position, so
        causality hides them, and no row is ever fully masked.
        """
        ids = torch.cat([self.prompt_ids, self.response_ids], dim=1)  # [B, P+T]
        attn = torch.cat([self.prompt_mask, torch.ones_like(self.mask)], dim=1)  # [B, P+T]
        return ids, attn

    @staticmethod
    def cat(rollouts: list[Rollout]) -> Rollout:
        """Stack rollouts of different prompt / response widths: prompts are left-padded, responses
        right-padded (ids with pad, masks False, log-probs 0)."""
        pad = rollouts[0].pad_token_id
        if any(r.pad_token_id != pad for r in rollouts):
            raise ValueError("cannot cat rollouts with different pad_token_id")
        P = max(r.prompt_ids.shape[1] for r in rollouts)
        T = max(r.response_ids.shape[1] for r in rollouts)

        def left(x: Tensor, width: int, value: int | bool) -> Tensor:
            return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

        def right(x: Tensor, width: int, value: int | bool | float) -> Tensor:
            return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

        return Rollout(
            prompt_ids=torch.cat([left(r.prompt_ids, P, pad) for r in rollouts]),
            prompt_mask=torch.cat([left(r.prompt_mask, P, False) for r in rollouts]),
            response_ids=torch.cat([right(r.response_ids, T, pad) for r in rollouts]),
            mask=torch.cat([right(r.mask, T, False) for r in rollouts]),
            truncated=torch.cat([r.truncated for r in rollouts]),
            logq_old=torch.cat([right(r.logq_old, T, 0.0) for r in rollouts]),
            logp=torch.cat([right(r.logp, T, 0.0) for r in rollouts]),
            log_w=torch.cat([right(r.log_w, T, 0.0) for r in rollouts]),
            pad_token_id=pad,
        )


def _rows(x: Tensor | int, idx: slice | Tensor | list[int]) -> Tensor | int:
    return x[idx] if isinstance(x, Tensor) else x


def _copy(x: Tensor | int) -> Tensor | int:
    return x.clone() if isinstance(x, Tensor) else x


# ----------------------------------------------------------------------------------------------------
# Public entry points


def sample_rollout(
    student: nn.Module,
    teacher: nn.Module | None,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    alpha: float,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    generator: Generators,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    no_repeat_ngram_size: int = 0,
    fast: bool = True,
    score: bool = True,
    logits_out: Tensor | None = None,
    layers_out: list[Tensor] | None = None,
    teacher_rows_out: Tensor | None = None,
) -> Rollout:
    """Sample one response per prompt from p̃ = α·p + (1 − α)·q and record log-probs and weights.

    student:        q_old, the model being trained (sampled with dropout off; its train mode is restored)
    teacher:        p, frozen, same vocabulary; not run while sampling when alpha == 0; None (no teacher at
                    all: the student samples alone and `logp` stays 0) only with alpha == 0 and score=False
    input_ids:      [B, P] long, LEFT-padded prompts (every row needs at least one real token)
    attention_mask: [B, P] bool or 0/1, True on real tokens
    alpha:          teacher weight α in [0, 1]; 0 = student-only sampling, 1 = teacher-only
    generator:      the only randomness (one uniform per row per step); seed it from (seed, step, rank).
                    A list gives each row its own stream: a row's tokens then do not depend on the rows
                    sampled beside it, so any split of the prompts over batches or processes samples the
                    same responses
    temperature, top_k, top_p: applied to each model's distribution before mixing (module docstring);
                    temperature 0 is greedy (the most probable token after the n-gram ban)
    no_repeat_ngram_size: n > 0 bans, in each row, every token that would repeat an n-gram of the prompt +
                    response so far (HF's NoRepeatNGramLogitsProcessor; module docstring); 0 = off
    fast:           the static-cache fast path (default) or the eager reference; same tokens either way
                    up to rounding at CDF boundaries (module docstring)
    score:          with alpha == 0, fill `logp` by one teacher forward; False leaves it 0 for a caller that
                    runs its own teacher pass over the responses anyway (the MiniLLM trainer)
    logits_out:     optional [B, max_new_tokens, V] buffer: step t's raw student logits (the distribution
                    the policy-gradient update reads while the weights are unchanged) go to
                    logits_out[:, t]; positions after a row's end hold logits of pad inputs
    layers_out:     fast path only: per decoder layer of the student, a [B, P + max_new_tokens, H] buffer
                    (a view will do) receiving that layer's output at every position fed to the student,
                    at its place in the left-padded layout (response token t at P + t; the last sampled
                    token is never fed, left-padding slots are not written)
    teacher_rows_out: fast path, alpha > 0 only: a [B, max_new_tokens, H_t] buffer; the teacher's final
                    hidden state behind p(·|y<t) (its head's input, what a teacher forward over prompt +
                    response would give at that position) goes to teacher_rows_out[:, t]
    returns:        a `Rollout` on the models' device, T = steps taken (≤ max_new_tokens; all rows end early)
    """
    B, P = input_ids.shape
    if attention_mask.shape != (B, P):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {(B, P)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be >= 0 (0 = off), got {no_repeat_ngram_size}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    prompt_mask = attention_mask.bool()
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded: attention_mask[:, -1] must be all True")
    if teacher is None and (alpha != 0.0 or score):
        raise ValueError(
            f"teacher=None samples the student alone: it needs alpha == 0 and score=False, got alpha={alpha}, "
            f"score={score}"
        )
    student = unwrap(student)  # a PeftModel's forward hides the cache keywords
    if teacher is not None:
        teacher = unwrap(teacher)
        check_same_vocab(student, teacher)
    if logits_out is not None:
        V = vocab_size(student)
        if logits_out.shape != (B, max_new_tokens, V):
            raise ValueError(f"logits_out shape {tuple(logits_out.shape)} != {(B, max_new_tokens, V)}")
    if layers_out is not None and not fast:
        raise ValueError("layers_out is filled by the fast path only; pass fast=True")
    if teacher_rows_out is not None and not (fast and alpha > 0.0):
        raise ValueError("teacher_rows_out is filled by the fast path with alpha > 0 only")

    # where the logits land: the head's device (a teacher placed apart keeps its head beside the student)
    device = student.get_output_embeddings().weight.device
    for g in [generator] if isinstance(generator, torch.Generator) else generator:
        if g.device.type != device.type:  # torch's own error on CUDA names neither
            raise ValueError(
                f"the generator is on {g.device} but the sampled model's head on {device}: the sampler "
                "draws its uniforms where the logits are, so create the generator there"
            )
    input_ids, prompt_mask = input_ids.to(device), prompt_mask.to(device)
    sampling = _Sampling(alpha, temperature, top_k, top_p, no_repeat_ngram_size, eos_token_id, pad_token_id)
    run = [student] if teacher is None else [student, teacher]
    modes = [m.training for m in run]
    for m in run:
        m.eval()  # dropout off while sampling (official code: PPOModel sets eval() for RL)
    try:
        with torch.inference_mode():
            args = (student, teacher, input_ids, prompt_mask, max_new_tokens, sampling, generator)
            if fast:
                cols = _sample_fast(*args, logits_out, layers_out, teacher_rows_out)
            else:
                cols = _sample_eager(*args, logits_out)
            response_ids, mask, logq, logp, logmix = cols
            rollout = Rollout(
                prompt_ids=input_ids,
                prompt_mask=prompt_mask,
                response_ids=response_ids,
                mask=mask,
                truncated=~(mask & (response_ids == eos_token_id)).any(-1),
                logq_old=logq,
                logp=logp,
                log_w=(logq - logmix).masked_fill(~mask, 0.0),
                pad_token_id=pad_token_id,
            )
            if teacher is not None and alpha == 0.0 and score:
                rollout.logp = score_teacher(teacher, rollout)[1].to(device)
    finally:
        for m, mode in zip(run, modes, strict=True):
            m.train(mode)
    # Copies made outside inference mode: the trainer's autograd may save these tensors for backward,
    # which inference tensors forbid.
    return Rollout(**{f.name: _copy(getattr(rollout, f.name)) for f in fields(rollout)})


def response_rows(model: nn.Module, batch: Rollout, replay: SamplingCache | None = None) -> Tensor:
    """Final hidden states of the positions that predict each valid response token, row-major: [N, H],
    N = batch.mask.sum(), rows in the order of `x[batch.mask]`.

    Each sequence is its prompt's real tokens and its response up to the last valid token, forwarded
    unpadded in `length_groups`, right-padded within a group: causality keeps the pads out of every row
    used, so no attention mask is needed. A wrapped (DDP) model gets all sequences in one forward: DDP
    broadcasts buffers in every forward, so each rank must run as many as the others, whatever its
    lengths. With `replay` (batch's rows of a collection sampled at the current weights) the decoder
    layers' outputs come from sampling (`SamplingCache.replay`).
    """
    prompt_len = batch.prompt_mask.sum(-1).tolist()  # [B]
    resp_len = batch.mask.sum(-1).tolist()  # [B]
    P = batch.prompt_ids.shape[1]
    seqs = [
        torch.cat(
            [batch.prompt_ids[i, P - prompt_len[i] :], batch.response_ids[i, : max(resp_len[i] - 1, 0)]]
        )
        for i in range(len(batch))
    ]
    seq_len = [len(x) for x in seqs]
    inner = unwrap(model)
    # row prompt_len − 1 + t predicts response token t
    return grouped_rows(
        model,
        seqs,
        [n - 1 for n in prompt_len],
        resp_len,
        None if replay is None else lambda group: replay.replay(inner, group, prompt_len, seq_len),
    )


@torch.no_grad()
def score_teacher(
    teacher: nn.Module, batch: Rollout, *, chunk_size: int = _SCORE_ROWS, logp_out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The teacher's side of sampled responses, from one forward over prompt + response: its hidden rows
    at the valid response positions and log p(y_t | y_<t, x) of the raw teacher. The one place teacher
    scores are computed (`sample_rollout`'s score, the MiniLLM trainer's teacher pass).

    teacher:  p, any causal LM of the same vocabulary (run in eval mode; mode restored)
    batch:    a `Rollout` (its logp field is not read)
    logp_out: optional [≥ N, V] fp32; its first N rows receive the full log-probabilities at those
              positions (the same head pass, `lm.fill_log_probs`)
    returns:  rows [N, H_t] (N = batch.mask.sum(), in the order of `x[batch.mask]`) and logp [B, T] fp32,
              0 where ~batch.mask
    """
    was_training = teacher.training
    teacher.eval()
    try:
        rows = response_rows(teacher, batch)  # [N, H_t]
    finally:
        teacher.train(was_training)
    head = output_head(teacher)
    targets = batch.response_ids.to(rows.device)[batch.mask.to(rows.device)]  # [N]
    logp = torch.zeros(batch.mask.shape, device=rows.device)
    if logp_out is None:
        logp[batch.mask.to(rows.device)] = token_logprobs(rows, targets, head, chunk_size=chunk_size)
    else:
        full = fill_log_probs(logp_out[: len(rows)], rows, head, chunk_size=chunk_size)
        logp[batch.mask.to(rows.device)] = full.gather(-1, targets[:, None])[:, 0]
    return rows, logp


# ----------------------------------------------------------------------------------------------------
# Shared pieces: settings, distributions, the draw, model calls


def sample_responses(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    eos_id: int,
    pad_id: int,
    generator: Generators,
    temperature: float,
    top_k: int,
    top_p: float,
    max_new_tokens: int,
    no_repeat_ngram_size: int = 0,
    fast: bool = True,
    sampling: tuple[Tensor, list[Tensor] | None] | None = None,
) -> tuple[list[list[int]], list[bool]]:
    """One sampled response per prompt from `model` alone (an α = 0 rollout without a teacher, not scored):
    SeqKD's teacher, GKD's student and evaluation (`evaluate.generate.sample`).

    prompts: B lists of token ids (no padding), left-padded together here
    generator: one, or one per prompt; the sampling settings as `sample_rollout`'s
    sampling: optional stores from `sampling_cache.sampling_buffers` for these prompts, which receive the
             student's logits [B x max_new_tokens, V] and layer outputs [B, P_max + max_new_tokens, H]
             (`sample_rollout`'s logits_out, layers_out), laid out as `SamplingCache` reads them
    returns: the response ids per prompt, up to and including the first EOS, and whether each was cut at
             max_new_tokens (no EOS).
    """
    device = next(model.parameters()).device
    batch = collate_prompts(prompts, pad_id)  # left-padded [B, P]
    logits, layers = sampling if sampling is not None else (None, None)
    width = batch["input_ids"].shape[1]
    rollout = sample_rollout(
        model,
        None,  # the model alone: α = 0, nothing scored
        batch["input_ids"].to(device),
        batch["attention_mask"].to(device),
        alpha=0.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        generator=generator,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        no_repeat_ngram_size=no_repeat_ngram_size,
        fast=fast,
        score=False,
        logits_out=None if logits is None else logits.view(len(prompts), max_new_tokens, -1),
        # each layer store is [B, P_max + max_new_tokens, H]: this batch's prompts end at P_max
        layers_out=None if layers is None else [x[:, x.shape[1] - max_new_tokens - width :] for x in layers],
    )
    ids, mask = rollout.response_ids.cpu(), rollout.mask.cpu()
    return [ids[b][mask[b]].tolist() for b in range(len(prompts))], rollout.truncated.cpu().tolist()


@dataclass(frozen=True)
class _Sampling:
    alpha: float
    temperature: float
    top_k: int
    top_p: float
    ngram: int
    eos: int
    pad: int


def _uniforms(generator: Generators, B: int, device: torch.device) -> Tensor:
    """One float64 uniform per row, [B, 1]: B from the one generator, or one from each row's own."""
    if isinstance(generator, torch.Generator):
        return torch.rand(B, 1, generator=generator, dtype=torch.float64, device=device)
    if len(generator) != B:
        raise ValueError(f"{len(generator)} generators for {B} rows")
    return torch.cat([torch.rand(1, 1, generator=g, dtype=torch.float64, device=device) for g in generator])


def _draw(probs: Tensor, generator: Generators) -> Tensor:
    """One token per row by inverse CDF: probs [B, V] (unnormalised, ≥ 0) → [B] long.

    One float64 uniform per row; float64 cumsum so tokens of probability ~1e-9 keep their share.
    Zero-probability tokens are never picked: the CDF is flat there and searchsorted(right) skips them.
    """
    B, V = probs.shape
    cdf = probs.double().cumsum(-1)  # [B, V]
    u = _uniforms(generator, B, probs.device)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # [B, 1]
    return idx.squeeze(1).clamp_(max=V - 1)


def _inverse_cdf(probs: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """`_draw`'s token for the uniforms u [B, 1] float64, found in two levels: probs [B, V] (unnormalised,
    ≥ 0) → tokens [B, 1] long and the row totals [B, 1] float64.

    Block sums and their cumsum in float64 pick the block holding u·total; a float64 cumsum of that block
    alone picks the token. The same token as one cumsum over the row unless u·total falls within float64
    rounding of a boundary; zero-probability tokens are never picked.
    """
    B, V = probs.shape
    bs = min(_CDF_BLOCK, V)
    full = V // bs * bs
    sums = probs[:, :full].reshape(B, -1, bs).sum(-1, dtype=torch.float64)  # [B, nb]
    if full < V:
        sums = torch.cat([sums, probs[:, full:].sum(-1, keepdim=True, dtype=torch.float64)], -1)
    cdf = sums.cumsum(-1)  # [B, nb]
    total = cdf[:, -1:]
    target = u * total  # [B, 1]
    blk = torch.searchsorted(cdf, target, right=True).clamp_(max=sums.shape[1] - 1)  # [B, 1]
    before = torch.nn.functional.pad(cdf, (1, 0)).gather(-1, blk)  # [B, 1] mass before the block
    # the block's tokens (indices past V, in a short last block, read as probability 0)
    idx = blk * bs + torch.arange(bs, device=probs.device)  # [B, bs]
    vals = probs.gather(-1, idx.clamp(max=V - 1)).double().masked_fill_(idx >= V, 0.0)
    inner = vals.cumsum(-1).add_(before)  # [B, bs]
    pos = torch.searchsorted(inner, target, right=True)
    # rounding can put target past the block's last cumsum: take its last token of nonzero probability
    last = torch.where(vals > 0, torch.arange(bs, device=probs.device), -1).amax(-1, keepdim=True)
    return blk * bs + torch.minimum(pos, last), total


def _ngram_ban(seq: Tensor, start: Tensor, n: int, V: int) -> Tensor:
    """The tokens HF's NoRepeatNGramLogitsProcessor(n) bans next in each row, the row taken unpadded: x is
    banned when the row's last n − 1 tokens followed by x already occur in it (prompt included).

    seq:     [B, L] long, left-padded rows (prompt + response so far); row b is seq[b, start[b]:]
    start:   [B] long, first real slot of each row
    returns: [B, V] bool, True = banned; nothing in a row shorter than n
    """
    B, L = seq.shape
    k = n - 1
    # n-token windows, starts 0 .. L − n: window j's prefix is seq[j : j + k], its follower seq[j + k]
    W = L - k
    if W <= 0:
        return torch.zeros(B, V, dtype=torch.bool, device=seq.device)
    match = torch.arange(W, device=seq.device)[None, :] >= start[:, None]  # [B, W] windows inside the row
    for i in range(k):  # window j's i-th token equals the row's i-th of its last k
        match &= seq[:, i : i + W] == seq[:, L - k + i, None]
    banned = torch.zeros(B, V + 1, dtype=torch.bool, device=seq.device)
    banned.scatter_(1, torch.where(match, seq[:, k:], V), True)  # windows that do not match write column V
    return banned[:, :V]


def _check_ban(banned: Tensor) -> None:
    if bool(banned.all(-1).any()):
        raise RuntimeError("no_repeat_ngram_size bans every token of a row; use a larger n")


def _greedy(scores: Tensor) -> Tensor:
    """The point mass on each row's most probable token (the first on ties, as HF's greedy search), as
    log-probs [B, V]: 0 there, −inf elsewhere."""
    return torch.full_like(scores, -math.inf).scatter_(-1, scores.argmax(-1, keepdim=True), 0.0)


def _log_mix(logp_s: Tensor, logq_s: Tensor, alpha: float) -> Tensor:
    """log(α·e^logp_s + (1 − α)·e^logq_s) per element, exact at α ∈ {0, 1} (no log(exp(x)) roundoff)."""
    if alpha == 0.0:
        return logq_s
    if alpha == 1.0:
        return logp_s
    return torch.logaddexp(logp_s + math.log(alpha), logq_s + math.log1p(-alpha))


def _mix_probs(logp_s: Tensor | None, logq_s: Tensor, alpha: float) -> Tensor:
    """p̃ = α·p_s + (1 − α)·q_s: [B, V] fp32 from the two sampling log-distributions."""
    if alpha == 0.0:
        return logq_s.exp()
    if alpha == 1.0:
        return logp_s.exp()
    return logq_s.exp().mul_(1.0 - alpha).add_(logp_s.exp(), alpha=alpha)  # in place: 2 passes fewer


@functools.cache
def _forward_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def _accepts(model: nn.Module, name: str) -> bool:
    return name in _forward_params(type(model))


def _with_cache(model: nn.Module, cache: DynamicCache | StaticCache) -> dict[str, object]:
    """The KV-cache keyword: `cache` since transformers renamed `past_key_values` (5.x; the old name is
    accepted until 5.40). Passing the wrong one would be swallowed by **kwargs and decode without context."""
    if _accepts(model, "cache"):
        return {"cache": cache}
    if _accepts(model, "past_key_values"):
        return {"past_key_values": cache}
    raise TypeError(f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values`")


def _prefill(model: nn.Module, ids: Tensor, attn: Tensor, cache: DynamicCache | StaticCache) -> Tensor:
    """Run the prompt through `model`, filling `cache`; next-token logits [B, V] fp32.

    ids [B, P] long; attn [B, K] 0/1 with K ≥ P (K = cache length for a static cache, tail zeros).
    """
    P = ids.shape[1]
    kwargs = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out = model(
        input_ids=ids,
        attention_mask=attn,
        position_ids=position_ids(attn[:, :P]),
        use_cache=True,
        **_with_cache(model, cache),
        **kwargs,
    )
    return out.logits[:, -1, : vocab_size(model)].float()  # never a padding id past the tokenizer's


# ----------------------------------------------------------------------------------------------------
# Eager reference: DynamicCache, the obvious code


def _warp_reference(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Sampling log-distribution of one model, the plain way: logits [B, V] → log-probs [B, V] (−inf = cut)."""
    if temperature == 0.0:
        return _greedy(logits)
    scores = logits / temperature
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[:, -1:]  # [B, 1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p < 1.0:
        probs = scores.softmax(-1)
        sorted_probs, order = probs.sort(-1, descending=True)  # [B, V]
        mass_above = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly above each token
        keep_sorted = mass_above < top_p  # the top token always stays (mass above it is 0)
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        scores = scores.masked_fill(~keep, -math.inf)
    return scores.log_softmax(-1)


def _ban_reference(rows: list[list[int]], n: int, V: int) -> Tensor:
    """HF's NoRepeatNGramLogitsProcessor(n) itself, applied to each unpadded row alone: [B, V] bool, True = banned."""
    proc = NoRepeatNGramLogitsProcessor(n)
    return torch.cat([proc(torch.tensor([row]), torch.zeros(1, V)).isinf() for row in rows])


def _decode_eager(model: nn.Module, ids: Tensor, attn: Tensor, pos: Tensor, cache: DynamicCache) -> Tensor:
    """One cached step: ids [B, 1] at positions pos [B, 1], attn [B, K] 0/1 over cache + ids → [B, V] fp32."""
    out = model(
        input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **_with_cache(model, cache)
    )
    return out.logits[:, -1, : vocab_size(model)].float()


def _sample_eager(
    student: nn.Module,
    teacher: nn.Module | None,
    input_ids: Tensor,
    prompt_mask: Tensor,
    max_new_tokens: int,
    s: _Sampling,
    generator: Generators,
    logits_out: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Reference loop; returns response_ids, mask, logq, logp, log p̃, each [B, T]."""
    B = input_ids.shape[0]
    run_teacher = s.alpha > 0.0
    attn = prompt_mask.long()
    s_cache = DynamicCache(config=student.config)
    s_logits = _prefill(student, input_ids, attn, s_cache)
    if run_teacher:
        t_cache = DynamicCache(config=teacher.config)
        t_logits = _prefill(teacher, input_ids, attn, t_cache)
    pos = attn.sum(-1, keepdim=True)  # [B, 1] position of the first response token
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    rows = [row[keep].tolist() for row, keep in zip(input_ids, prompt_mask, strict=True)]  # unpadded
    ids, masks, logqs, logps, logmixes = [], [], [], [], []
    for t in range(max_new_tokens):
        if logits_out is not None:
            logits_out[:, t] = s_logits
        logq = s_logits.log_softmax(-1)  # [B, V] raw student
        logp = t_logits.log_softmax(-1) if run_teacher else None
        s_in, t_in = s_logits, t_logits if run_teacher else None
        if s.ngram:  # the ban comes first, as in HF's generate (logits processors before warpers)
            banned = _ban_reference(rows, s.ngram, s_logits.shape[-1]).to(s_logits.device)
            banned[finished] = False
            _check_ban(banned)
            s_in = s_in.masked_fill(banned, -math.inf)
            t_in = t_in.masked_fill(banned, -math.inf) if run_teacher else None
        logq_s = _warp_reference(s_in, s.temperature, s.top_k, s.top_p)
        logp_s = _warp_reference(t_in, s.temperature, s.top_k, s.top_p) if run_teacher else None
        tok = _draw(_mix_probs(logp_s, logq_s, s.alpha), generator)  # [B]

        alive = ~finished
        pick = tok[:, None]
        lq = logq.gather(-1, pick).squeeze(-1)
        lmix = _log_mix(
            logp_s.gather(-1, pick).squeeze(-1) if run_teacher else lq,
            logq_s.gather(-1, pick).squeeze(-1),
            s.alpha,
        )
        lp = logp.gather(-1, pick).squeeze(-1) if run_teacher else torch.zeros_like(lq)
        ids.append(torch.where(alive, tok, s.pad))
        for row, x in zip(rows, ids[-1].tolist(), strict=True):
            row.append(x)
        masks.append(alive)
        logqs.append(lq.masked_fill(finished, 0.0))
        logps.append(lp.masked_fill(finished, 0.0))
        logmixes.append(lmix.masked_fill(finished, 0.0))
        finished = finished | (tok == s.eos)
        if bool(finished.all()) or t == max_new_tokens - 1:
            break

        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        nxt = ids[-1][:, None]  # [B, 1]
        s_logits = _decode_eager(student, nxt, attn, pos, s_cache)
        if run_teacher:
            t_logits = _decode_eager(teacher, nxt, attn, pos, t_cache)
        pos = pos + 1
    stack = torch.stack
    return stack(ids, 1), stack(masks, 1), stack(logqs, 1), stack(logps, 1), stack(logmixes, 1)


# ----------------------------------------------------------------------------------------------------
# Fast path: static cache, preallocated buffers, fused step


def _warp_fast(logits: Tensor, raw: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Same distribution as `_warp_reference`, cheaper: logits [B, V] fp32, raw = logits.log_softmax(-1).

    No work at all at the defaults; top-p looks for the nucleus among the top `_TOP_P_CANDIDATES`
    tokens and sorts the whole vocabulary only for the rows whose nucleus is larger.
    """
    if temperature == 1.0 and top_k == 0 and top_p == 1.0:
        return raw
    if temperature == 0.0:
        return _greedy(logits)
    scores = logits if temperature == 1.0 else logits / temperature
    V = scores.shape[-1]
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, V)).values[:, -1:]  # [B, 1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p < 1.0:
        probs = scores.softmax(-1)  # [B, V]
        C = min(V, _TOP_P_CANDIDATES)
        top_probs, order = probs.topk(C)  # [B, C], descending, as a full sort's first C
        cum = top_probs.cumsum(-1)
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, cum - top_probs < top_p)
        wide = cum[:, -1] < top_p  # [B] rows whose nucleus is larger than the candidates
        if bool(wide.any()):
            sorted_probs, order = probs[wide].sort(-1, descending=True)
            keep_sorted = sorted_probs.cumsum(-1) - sorted_probs < top_p
            keep[wide] = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        scores = scores.masked_fill(~keep, -math.inf)
    return scores.log_softmax(-1)


@dataclass
class _Buffers:
    """Preallocated outputs of the fast path, each [B, N]; step t writes column t."""

    ids: Tensor
    mask: Tensor
    logq: Tensor
    logp: Tensor
    logmix: Tensor


def _fast_step(
    s_logits: Tensor,
    t_logits: Tensor | None,
    u: Tensor,
    finished: Tensor,
    s: _Sampling,
    banned: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Ban, warp, mix, draw and do the EOS bookkeeping of one step in one function (compilable: no Python
    state, fixed shapes).

    s_logits, t_logits: [B, V] fp32 next-token logits (t_logits None when α = 0)
    u:                  [B, 1] float64 uniforms (drawn by the caller, as `_draw` does)
    finished:           [B] bool, rows that emitted EOS at an earlier step
    banned:             [B, V] bool, tokens the n-gram ban forbids (None = no ban)
    returns:            ids, logq, logp, log p̃ of this step ([B]; pad / 0 on finished rows) and the
                        updated finished [B]
    """
    plain = banned is None and s.temperature == 1.0 and s.top_k == 0 and s.top_p == 1.0
    if t_logits is None and plain:
        # the student's own distribution, unwarped: one exp pass, no [B, V] log-softmax
        top = s_logits.amax(-1, keepdim=True)  # [B, 1]
        tok, total = _inverse_cdf(torch.sub(s_logits, top).exp_(), u)
        lq = (s_logits.gather(-1, tok) - top - total.log()).squeeze(-1).float()
        lp, lmix = torch.zeros_like(lq), lq
    else:
        tok, lq, lp, lmix = _mixed_draw(s_logits, t_logits, u, s, banned)
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


def _mixed_draw(
    s_logits: Tensor, t_logits: Tensor | None, u: Tensor, s: _Sampling, banned: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`_fast_step`'s draw from the warped mixture: token [B, 1], log q, log p (0 without a teacher) and
    log p̃ of it, each [B]."""
    logq = s_logits.log_softmax(-1)  # [B, V] raw student
    logq_s = _sampling_dist(s_logits, logq, s, banned)
    logp = logp_s = None
    if t_logits is not None:
        logp = t_logits.log_softmax(-1)
        logp_s = _sampling_dist(t_logits, logp, s, banned)
    tok, _ = _inverse_cdf(_mix_probs(logp_s, logq_s, s.alpha), u)  # [B, 1]
    lq = logq.gather(-1, tok).squeeze(-1)
    lq_s = logq_s.gather(-1, tok).squeeze(-1)
    lp = logp.gather(-1, tok).squeeze(-1) if logp is not None else torch.zeros_like(lq)
    lmix = _log_mix(logp_s.gather(-1, tok).squeeze(-1) if logp_s is not None else lq_s, lq_s, s.alpha)
    return tok, lq, lp, lmix


def _sampling_dist(logits: Tensor, raw: Tensor, s: _Sampling, banned: Tensor | None) -> Tensor:
    """One model's sampling log-distribution [B, V]: the n-gram ban first (as HF's generate applies its
    logits processors before its warpers), then `_warp_fast`. raw = logits.log_softmax(-1)."""
    if banned is not None:
        logits = logits.masked_fill(banned, -math.inf)
        raw = logits.log_softmax(-1)
    return _warp_fast(logits, raw, s.temperature, s.top_k, s.top_p)


@contextlib.contextmanager
def _packed_linears(model: nn.Module, rows: int, enabled: bool) -> Iterator[None]:
    """While inside, every `nn.Linear` of an fp32 CPU model runs oneDNN's linear on a copy of its weight
    reordered for `rows`-row inputs (the packed copies live only this long). A no-op elsewhere, or where
    this torch build lacks the ops."""
    ops = torch.ops.mkldnn
    param = next(model.parameters())
    if not (
        enabled
        and param.device.type == "cpu"
        and param.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    ):
        yield
        return
    # Plain CPU Linears only (a teacher's head may sit on the student's GPU); one whose forward is already
    # patched (accelerate's offload hooks) keeps it.
    linears = [
        m
        for m in model.modules()
        if type(m) is nn.Linear and "forward" not in m.__dict__ and m.weight.device.type == "cpu"
    ]

    def packed_forward(weight: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
        return ops._linear_pointwise(x, weight, bias, "none", [], "")

    for m in linears:
        packed = ops._reorder_linear_weight(m.weight.detach(), rows)
        bias = None if m.bias is None else m.bias.detach()
        m.forward = functools.partial(packed_forward, packed, bias)  # instance attribute over the class's
    try:
        yield
    finally:
        for m in linears:
            del m.forward


class _Decoder:
    """One model's fast decode state: a KV cache and the attention mask handed to it each step.

    Static cache where the model family supports it (`_can_compile_fullgraph`, which holds for every
    family of tests/test_families.py in transformers 5.24), else DynamicCache (`_fast_cache`; the path
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
        # where the running forward's positions go in layers_out: (rows, slots) of [B, P+N]
        self.where: tuple[Tensor | slice, slice] = (slice(None), slice(0, P))
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
        self.cache, fallback = _fast_cache(model, self.L)
        self.static = isinstance(self.cache, StaticCache)
        self.cache_kw = _with_cache(model, self.cache)
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

    def _keep(self, buf: Tensor, module: nn.Module, args: tuple, output: Tensor | tuple) -> None:
        rows, slots = self.where
        buf[rows, slots] = output[0] if isinstance(output, tuple) else output

    def _keep_head_in(self, module: nn.Module, args: tuple) -> None:
        self.head_in[self.where[0]] = args[0][:, -1]
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
            return _prefill(self.model, ids, self.attn[:, : self.P].long(), self.cache)
        if not self.full:  # sliding layers attend over all L slots: hand them the full-length mask
            return _prefill(self.model, ids, self.attn.long(), self.cache)
        # Static cache: the prompts run in groups of similar length, each unpadded but for ≤ 10 %, through a
        # DynamicCache whose keys / values are then copied into the batch's left-padded slots: a batch of 8
        # Dolly prompts is 60-70 % padding at its longest prompt's width.
        B, P = ids.shape
        lengths = self.attn[:, :P].sum(-1).tolist()
        logits = None
        for group in length_groups(lengths):
            rows = torch.tensor(group, device=ids.device)
            width = max(lengths[i] for i in group)
            part = DynamicCache(config=self.model.config)
            self.where = (rows, slice(P - width, P))
            out = _prefill(self.model, ids[rows, P - width :], self.attn[rows, P - width : P].long(), part)
            if logits is None:
                logits = out.new_empty(B, out.shape[-1])
            logits[rows] = out
            for layer, src in zip(self.cache.layers, part.layers, strict=True):
                if not layer.is_initialized:  # allocates [B, heads, L, head_dim] from src's shape and dtype
                    layer.lazy_initialization(
                        src.keys[:1].expand(B, -1, -1, -1), src.values[:1].expand(B, -1, -1, -1)
                    )
                at = rows.to(layer.keys.device)  # a decoder placed apart from its inputs (teacher_device)
                layer.keys[at, :, P - width : P] = src.keys
                layer.values[at, :, P - width : P] = src.values
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


# What `_Decoder` reads and writes on each layer of a StaticCache (transformers 5.24's StaticLayer)
_STATIC_LAYER_FIELDS = ("lazy_initialization", "is_initialized", "cumulative_length", "update")


def _fast_cache(model: nn.Module, length: int) -> tuple[StaticCache | DynamicCache, str | None]:
    """A static cache of `length` slots where the family declares `_can_compile_fullgraph` and this
    transformers' StaticCache has the fields `_Decoder` uses; else a DynamicCache and the reason."""
    if not getattr(model, "_can_compile_fullgraph", False):
        return DynamicCache(config=model.config), "the family does not declare _can_compile_fullgraph"
    try:
        cache = StaticCache(config=model.config, max_cache_len=length)
    except (TypeError, ValueError, AttributeError) as e:
        return DynamicCache(config=model.config), f"StaticCache(config, max_cache_len) failed: {e}"
    missing = [f for f in _STATIC_LAYER_FIELDS if not all(hasattr(layer, f) for layer in cache.layers)]
    if missing:
        return DynamicCache(config=model.config), f"its StaticCache layers lack {', '.join(missing)}"
    return cache, None


def _sample_fast(
    student: nn.Module,
    teacher: nn.Module | None,
    input_ids: Tensor,
    prompt_mask: Tensor,
    max_new_tokens: int,
    s: _Sampling,
    generator: Generators,
    logits_out: Tensor | None,
    layers_out: list[Tensor] | None,
    teacher_rows_out: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fast loop; the outputs of `_sample_eager` (the same tokens under one generator, up to rounding)."""
    (B, P), N = input_ids.shape, max_new_tokens
    device = input_ids.device
    run_teacher = s.alpha > 0.0
    if s.ngram:  # prompt + response so far for the n-gram ban, in the decode mask's layout
        seq = torch.full((B, P + N), s.pad, dtype=torch.long, device=device)  # [B, P+N]
        seq[:, :P] = input_ids
        start = P - prompt_mask.sum(-1)  # [B] first real slot of each row
    buf = _Buffers(
        ids=torch.full((B, N), s.pad, dtype=torch.long, device=device),
        mask=torch.zeros(B, N, dtype=torch.bool, device=device),
        logq=torch.zeros(B, N, device=device),
        logp=torch.zeros(B, N, device=device),
        logmix=torch.zeros(B, N, device=device),
    )
    pack = N >= _PACK_MIN_TOKENS
    with (
        _packed_linears(student, B, pack),
        _packed_linears(teacher, B, pack) if run_teacher else contextlib.nullcontext(),
        contextlib.closing(_Decoder(student, prompt_mask, N, layers_out)) as s_dec,  # closing drops hooks
        contextlib.ExitStack() as stack,
    ):
        s_logits = s_dec.prefill(input_ids)
        t_dec, t_logits = None, None
        if run_teacher:
            t_dec = stack.enter_context(
                contextlib.closing(_Decoder(teacher, prompt_mask, N, head_in=teacher_rows_out is not None))
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
        compact = _COMPACT_AT > 0 and logits_out is None and layers_out is None
        compact = compact and teacher_rows_out is None
        live: Tensor | slice = slice(None)  # the original row of each row decoded (all, until a drop)
        T = N
        for t in range(N):
            if logits_out is not None:
                logits_out[:, t] = s_logits
            if teacher_rows_out is not None:
                teacher_rows_out[:, t] = t_dec.head_in
            u = _uniforms(generator, B, device)[live]  # as `_draw`; every row draws, ended or not
            banned = None
            if s.ngram:
                banned = _ngram_ban(seq[:, : P + t], start, s.ngram, s_logits.shape[-1])
                banned &= ~finished[:, None]
                _check_ban(banned)
            nxt, lq, lp, lmix, done = _fast_step(s_logits, t_logits, u, finished, s, banned)
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
            if compact and ended * _COMPACT_AT >= len(finished):  # dropped rows keep pad / False / 0
                keep = (~finished).nonzero().squeeze(1)  # [B']
                live = keep if isinstance(live, slice) else live[keep]
                finished, base, nxt = finished[keep], base[keep], nxt[keep]
                pos = torch.empty_like(base)
                if s.ngram:
                    seq, start = seq[keep], start[keep]
                s_dec.keep_rows(keep)
                if t_dec is not None:
                    t_dec.keep_rows(keep)
            torch.add(base, t, out=pos)
            s_logits = s_dec.decode(nxt[:, None], pos, t)
            if t_dec is not None:
                t_logits = t_dec.decode(nxt[:, None], pos, t)
    return buf.ids[:, :T], buf.mask[:, :T], buf.logq[:, :T], buf.logp[:, :T], buf.logmix[:, :T]
