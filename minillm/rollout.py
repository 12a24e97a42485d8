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

Warping, mixing, the n-gram ban and the inverse-CDF draw live in `minillm/decode/draw.py`.

Two implementations behind `sample_rollout(fast=...)`, giving the same tokens under one generator up to
rounding (packed weights, below); both stop once every row has ended:
- eager reference (`minillm/decode/eager.py`): HF DynamicCache, 2D attention masks grown by `cat` (HF rebuilds the 4D mask every
  step), full-vocabulary sort for top-p, lists of per-step columns;
- fast path (`minillm/decode/fast.py`): static KV cache (HF `StaticCache`; DynamicCache for families without
  `_can_compile_fullgraph`) prefilled in groups of similar prompt length instead of all prompts padded to
  the longest (65 % of a Dolly batch's prefill was padding), each distinct prompt once (rows holding the
  same prompt, such as evaluation's seeds of it, get copies of its keys / values), one preallocated decode
  mask given to attention as a ready 4D view over the filled cache slots only, output buffers allocated once,
  warping / mixing / draw / EOS bookkeeping in one function per step, no work for warping at the
  defaults and a 256-candidate top-p that sorts only rows with a wider nucleus. Rows that have ended
  leave the batch (cache rows, masks, inputs) once they are 1/8 of it (`fast.COMPACT_AT`), unless a per-step
  output is asked for (`logits_out`, `layers_out`, `teacher_rows_out`): decode is compute-bound on CPU,
  and a batch runs until its longest response ends (teacher, 32 Dolly prompts, ≤ 128 tokens: 13 % less
  CPU, the same tokens; bench/RESULTS.md).
- On CPU in fp32 the fast path runs every `nn.Linear` of the sampled models on a weight reordered once
  per call for oneDNN (`decode/packing.py`, what inductor's freezing does): MKL's sgemm reads weights at
  ~4 GB/s for an 8-row input here, the packed kernel ~6 GB/s; sampling 9–26 % faster (bench/RESULTS.md).
  Same maths in fp32, another summation order: tokens can differ from the eager path where a draw falls within
  rounding of a CDF boundary.
- The step function is not compiled: `torch.compile` of it (measured once, bench/RESULTS.md) gained on
  the step at the defaults but lost with top_p < 1 and cost ~25 s of compilation per setting.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from minillm.data.tokenize import collate_prompts
from minillm.decode.draw import Generators, Sampling
from minillm.decode.eager import sample_eager
from minillm.decode.fast import sample_fast
from minillm.models import (
    check_same_vocab,
    grouped_rows,
    output_head,
    unwrap,
    vocab_size,
)
from minillm.objectives.lm import fill_log_probs, token_logprobs

if TYPE_CHECKING:  # the trainer's type, for annotations only: the sampler does not depend on train/
    from minillm.train.sampling_cache import SamplingCache

# Response tokens per head chunk of `score_teacher` when no chunk_size is given (the configs' default).
_SCORE_ROWS = 256


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
    sampling = Sampling(alpha, temperature, top_k, top_p, no_repeat_ngram_size, eos_token_id, pad_token_id)
    run = [student] if teacher is None else [student, teacher]
    modes = [m.training for m in run]
    for m in run:
        m.eval()  # dropout off while sampling (official code: PPOModel sets eval() for RL)
    try:
        with torch.inference_mode():
            args = (student, teacher, input_ids, prompt_mask, max_new_tokens, sampling, generator)
            if fast:
                cols = sample_fast(*args, logits_out, layers_out, teacher_rows_out)
            else:
                cols = sample_eager(*args, logits_out)
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
