"""MiniLLM (Gu, Dong, Wei, Huang, ICLR 2024, arXiv 2306.08543): reverse-KL distillation by policy gradient.

The student q_θ minimises KL(q_θ ‖ p) over its own responses. Each collection samples `num_rollouts`
responses from the mixture p̃ = α·p + (1−α)·q_old (section 2.2, "teacher-mixed sampling"), recording
log q_old, log p and the importance weight w = q_old/p̃ per token. Then `ppo_epochs` passes over the store
in mini-batches; each mini-batch takes
  loss = PPO-clipped policy gradient on the length-normalised, discounted return of r_t = log p − log q_old
       + single-step term: the exact full-vocabulary KL(q(·|y<t) ‖ p(·|y<t)) at every sampled position
       + pt_coef · PT loss on a batch of pre-training blocks (section 2.3).
Everything full-vocabulary runs in token chunks from hidden states (never a [B, T, V] fp32 tensor). The
teacher runs once per collection: its log-probabilities at every sampled position are kept when they fit
`teacher_cache_mib` (fp32, exact), else its hidden states are, and each inner epoch recomputes only the
teacher's head on a chunk (`TeacherStore`). With α > 0 the fast sampler has already run the teacher at every
position, so its final hidden states there are kept from sampling and only the head runs over them.

Departures from the paper / the official code (LMOps minillm/, commits cited in objectives/policy.py),
each behind a flag:
- `whiten masked` (default) whitens advantages over valid tokens; the official code counts padding
  (`whiten official`).
- `return_inclusive true` (official) with `single_step true` counts the single-step part twice in
  expectation (tests/test_unbiased.py measures it); `return_inclusive false` is the paper's unbiased Eq. 3.
- `single_step_weight none` (default, official code: a maintainer reports that dropping w_t stabilises
  training) leaves the single-step KL unweighted; `single_step_weight token` weighs it by the rollout-time
  importance weight w_t = q_old(y_t)/p̃(y_t), as the paper's Eq. 7 does. The two agree at α = 0 (w = 1).
- Token losses are divided by the mini-batch's global valid-token count (all micro-batches and ranks);
  the official code divides by each rank's own count.
- `pt_loss ce+kd` uses the forward KL to the teacher as its "kd" half: the same gradient as the official
  soft cross-entropy, whose value differs by the teacher's entropy (a constant).

As the official code: dropout is off in the whole RL phase (sampling, update, PT loss: eval mode), so the
ratio q_new/q_old is 1 at a collection's first step (gradient checkpointing, which HF runs in train mode
only, is refused for a student with dropout). The student's weights are fp32; on a GPU sampling and the
update run under bf16 autocast (`mixed_precision`); log-probabilities, KL terms, rewards and advantages
are fp32 whatever the models' dtypes.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor

from minillm import models, sharding
from minillm.config import MiniLLMConfig
from minillm.data.pretrain import load_pt_blocks
from minillm.data.tokenize import collate_prompts
from minillm.errors import InputError
from minillm.objectives import policy
from minillm.objectives.chunked import chunked_head_loss, take_rows
from minillm.objectives.divergences import reverse_kl
from minillm.objectives.lm import ce_kd_sum, fill_log_probs, head_log_probs_into
from minillm.rollout import Generators, Rollout, response_rows, sample_rollout, score_teacher
from minillm.train import engine
from minillm.train.loop import mean_validation_rouge_l
from minillm.train.sampling_cache import SamplingCache, sampling_buffers
from minillm.train.setup import load_prompts, load_student, load_teacher

ROLLOUT_FIELDS = (
    "prompt_ids",
    "prompt_mask",
    "response_ids",
    "mask",
    "truncated",
    "logq_old",
    "logp",
    "log_w",
)


@dataclass
class TeacherStore:
    """The teacher's side of a collection at its valid response positions, row-major (`x[store.mask]`):
    final hidden rows [N, H_t] (small; what mid-collection checkpoints keep) and, when the collection fits
    `teacher_cache_mib`, the fp32 log-probabilities [N, V] the teacher pass computed anyway, which spares
    every inner epoch the teacher's head (~1.3 s per 1024 positions at V = 49k on one CPU core,
    bench/teacher_cache.py). `index` picks a mini-batch's positions (None: all, in order)."""

    rows: Tensor
    logp: Tensor | None = None
    index: Tensor | None = None

    def select(self, index: Tensor) -> TeacherStore:
        """The positions `index` [M] of this view (a view of the same storage)."""
        return TeacherStore(self.rows, self.logp, index if self.index is None else self.index[index])

    def log_probs_into(
        self, out: Tensor, start: int, end: int, head: tuple[Tensor, Tensor | None], work: Tensor
    ) -> Tensor:
        """log p at this view's positions start:end [C, V] (fp32 or wider), read only; written into `out`
        [C, V] unless the cache holds them contiguously. work: [C, V] scratch."""
        at = slice(start, end) if self.index is None else self.index[start:end]
        if self.logp is None:
            return head_log_probs_into(out, self.rows[at], head, work)
        if self.index is None:
            return self.logp[at]
        return take_rows(self.logp, at, out)


def teacher_cache(
    teacher: torch.nn.Module, rollouts: int, cfg: MiniLLMConfig, device: torch.device
) -> Tensor | None:
    """An empty [rollouts x max_new_tokens, V] fp32 store for a collection's teacher log-probs, or None
    when that bound exceeds `teacher_cache_mib` or the single-step term is off. On a CPU `torch.empty`
    touches no page: only the rows a collection writes take memory."""
    V = models.vocab_size(teacher)
    n = rollouts * cfg.max_new_tokens
    if not cfg.single_step or n * V * 4 > cfg.teacher_cache_mib * 2**20:
        return None
    return torch.empty(n, V, device=device)


def refill_teacher_cache(
    teacher: torch.nn.Module, store: Rollout, rows: Tensor, cache: Tensor, cfg: MiniLLMConfig
) -> TeacherStore:
    """The TeacherStore of a collection restored from a checkpoint: its log-probs recomputed from the
    saved rows batch by batch, in `collect`'s chunks, so they are the very values the killed run used."""
    counts = store.mask.sum(-1).tolist()
    head = models.output_head(teacher)
    start = 0
    for i in range(0, len(store), cfg.batch_size):
        end = start + sum(counts[i : i + cfg.batch_size])
        with torch.no_grad():  # a fresh tensor per batch, as score_teacher sees it
            fill_log_probs(cache[start:end], rows[start:end].clone(), head, chunk_size=cfg.chunk_size)
        start = end
    return TeacherStore(rows, cache[:start])


def collect(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    prompts: list[list[int]],
    pad: int,
    eos: int,
    cfg: MiniLLMConfig,
    acc: Accelerator,
    g: Generators,
    cache: Tensor | None = None,
    sampling: tuple[Tensor, list[Tensor] | None] | None = None,
) -> tuple[Rollout, TeacherStore, SamplingCache | None, float]:
    """Sample this rank's rollouts in batches (g: one generator, or one per prompt); returns the store, the
    teacher's side of it (its log-probs in `cache`, from `teacher_cache`, when given), what the sampler
    computed (in `sampling`, from `sampling_buffers`, when given) and the seconds spent in teacher passes."""
    inner = acc.unwrap_model(student)
    N, width = cfg.max_new_tokens, cfg.max_prompt_length
    logits, layers = sampling if sampling is not None else (None, None)
    parts, rows, filled, teacher_s = [], [], 0, 0.0
    head = models.output_head(teacher)
    # With teacher mixing the fast sampler runs the teacher at every position anyway: its final hidden
    # states there replace the teacher pass's forward (only the head pass over them remains)
    keep_rows = cfg.teacher_mix_alpha > 0.0 and cfg.fast_rollout
    for batch_prompts in engine.chunks(prompts, cfg.batch_size):
        enc = collate_prompts(batch_prompts, pad)
        done = sum(len(r) for r in parts)
        at = slice(done, done + len(batch_prompts))
        P = enc["input_ids"].shape[1]  # this batch's prompt width, right-aligned in the cache's
        t_hidden = head.weight.new_empty(len(batch_prompts), N, head.weight.shape[1]) if keep_rows else None
        with acc.autocast():  # fp32 master weights, bf16 compute on a GPU; log-probs come out fp32
            r = sample_rollout(
                inner,
                teacher,
                enc["input_ids"],
                enc["attention_mask"],
                alpha=cfg.teacher_mix_alpha,
                eos_token_id=eos,
                pad_token_id=pad,
                generator=g[at] if isinstance(g, list) else g,
                **engine.sampling_settings(cfg),  # N = cfg.max_new_tokens new tokens at most
                score=False,  # log p: the sampler with alpha > 0, else the teacher pass below
                logits_out=None if logits is None else logits.view(-1, N, logits.shape[-1])[at],
                layers_out=None if layers is None else [x[at, width - P :] for x in layers],
                teacher_rows_out=t_hidden,
            )
        t0 = time.perf_counter()
        if t_hidden is None:
            t_rows, logp = score_teacher(
                teacher, r, chunk_size=cfg.chunk_size, logp_out=None if cache is None else cache[filled:]
            )
        else:  # a fresh [N, H_t] tensor, as the teacher pass gives (`refill_teacher_cache` relies on it)
            t_rows = t_hidden[:, : r.mask.shape[1]][r.mask]
            if cache is not None:
                with torch.no_grad():
                    fill_log_probs(
                        cache[filled : filled + len(t_rows)], t_rows, head, chunk_size=cfg.chunk_size
                    )
        teacher_s += time.perf_counter() - t0
        filled += len(t_rows)
        if cfg.teacher_mix_alpha == 0.0:
            r.logp = logp
        parts.append(r)
        rows.append(t_rows)
    # Rollout.cat right-pads responses, so each row keeps its valid positions in place and the parts'
    # row-major teacher rows concatenate into the store's row-major order
    store = Rollout.cat(parts)
    t_store = TeacherStore(torch.cat(rows), None if cache is None else cache[:filled])
    sampled = None
    if logits is not None:
        R, T = store.mask.shape
        grid = torch.arange(R * N, device=store.mask.device).view(R, N)[:, :T]  # flat place of (r, t)
        sampled = SamplingCache(logits, grid[store.mask], layers, torch.arange(R), width)
    return store, t_store, sampled, teacher_s


def rewards_and_advantages(
    mb: Rollout, cfg: MiniLLMConfig, all_reduce: policy.AllReduce | None = None
) -> tuple[Tensor, Tensor]:
    """Per-token rewards r = log p − log q_old and the advantages the config asks for, each [B, T]."""
    rewards = policy.token_rewards(mb.logp, mb.logq_old, mb.mask)
    adv = policy.advantages(
        rewards,
        mb.mask,
        gamma=cfg.gamma,
        inclusive=cfg.return_inclusive,
        length_norm=cfg.length_norm,
        reward_scale=cfg.reward_scale,
        reward_clip=cfg.reward_clip,
        whiten=cfg.whiten,
        all_reduce=all_reduce,
    )
    return rewards, adv


def minibatch_loss(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    mb: Rollout,
    t_store: TeacherStore,
    adv: Tensor,
    n_tokens: float,
    cfg: MiniLLMConfig,
    sampled: SamplingCache | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """(Σ PG loss + Σ single-step KL) / n_tokens for one micro-batch (n_tokens: 1 / `engine.loss_scale`
    in training, which folds in the number of processes), in one chunked head pass whose gradient w.r.t.
    the logits is closed-form (`policy.policy_logit_grad`). t_store: the teacher's side of
    mb's valid positions, in mb's row-major order; sampled: what sampling computed for mb, read instead of
    the student's head (and layer) forwards, only while the weights are the sampling weights."""
    mask = mb.mask
    replay = sampled if sampled is not None and sampled.layers is not None else None
    rows = response_rows(student, mb, replay)  # [N, H]
    targets = mb.response_ids[mask]  # [N]
    logq_old, log_w, a = mb.logq_old[mask], mb.log_w[mask], adv[mask]  # [N] each
    t_head = models.output_head(teacher)
    C, V = min(cfg.chunk_size, len(rows)), t_head.weight.shape[0]
    # Buffers shared by every chunk: the teacher's log-probs and a scratch (the student's are the chunker's)
    work = torch.empty(C, V, dtype=torch.promote_types(rows.dtype, torch.float32), device=rows.device)
    t_buf = torch.empty_like(work) if cfg.single_step else None
    stats = {"pg": 0.0, "single": 0.0, "clipped": 0.0}

    def token_fn(logits: Tensor, start: int, end: int) -> tuple[Tensor, Tensor]:
        n = end - start
        t_logp = None
        if t_buf is not None:
            t_logp = t_store.log_probs_into(t_buf[:n], start, end, t_head, work[:n])
        pg, single, clipped, grad = policy.policy_logit_grad(
            logits,
            t_logp,
            work[:n],
            targets[start:end],
            logq_old[start:end],
            log_w[start:end],
            a[start:end],
            clip_eps=cfg.clip_eps,
            single_weight=log_w[start:end].exp() if cfg.single_step_weight == "token" else None,
        )
        stats["pg"] += float(pg.sum())
        stats["single"] += float(single.sum())
        stats["clipped"] += float(clipped.sum())
        return pg.sum() + single.sum(), grad

    loss = chunked_head_loss(
        rows,
        models.output_head(student),
        token_fn,
        chunk_size=cfg.chunk_size,
        closed_form=True,
        logits_into=None if sampled is None else sampled.logits_into,
        scale=1.0 / n_tokens,
    )
    return loss, stats


def pt_loss_sum(
    student: torch.nn.Module, teacher: torch.nn.Module, blocks: Tensor, cfg: MiniLLMConfig
) -> Tensor:
    """Σ over block tokens of the PT loss: CE (paper) or (1−kd_ratio)·CE + kd_ratio·KL(p‖q) (official)."""
    attn = torch.ones_like(blocks)
    hidden = models.final_hidden(student, blocks, attn)  # [B, L, H]
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # [N, H]
    targets = blocks[:, 1:].reshape(-1)  # [N]
    head = models.output_head(student)
    if cfg.pt_loss == "ce":
        return ce_kd_sum(rows, targets, head, chunk_size=cfg.chunk_size)
    with torch.no_grad():
        t_rows = models.final_hidden(teacher, blocks, attn)[:, :-1].reshape(rows.shape[0], -1)  # [N, H_t]
    teacher_side = (t_rows, models.output_head(teacher))
    return ce_kd_sum(
        rows, targets, head, chunk_size=cfg.chunk_size, teacher=teacher_side, kd_ratio=cfg.kd_ratio
    )


@torch.no_grad()
def validate(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    prompts: list[list[int]],
    records: list[dict[str, Any]],
    tokenizer: Any,
    cfg: MiniLLMConfig,
    acc: Accelerator,
) -> dict[str, float]:
    """Rouge-L of answers decoded exactly as `minillm eval` decodes (`mean_validation_rouge_l`), and the
    reverse KL of the student on its own pure samples (no n-gram ban: they must come from q itself):
    Σ_t KL(q(·|y<t) ‖ p(·|y<t)) per response, an unbiased estimate of the sequence-level KL(q‖p)."""
    inner = acc.unwrap_model(student)
    kls, tokens = [], 0
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    mine = list(range(acc.process_index, len(prompts), acc.num_processes))
    was_training = student.training
    student.eval()
    rouge = (
        {"valid/rougeL": mean_validation_rouge_l(student, tokenizer, prompts, records, cfg, acc)}
        if cfg.valid_rouge_l
        else {}
    )
    for idx in engine.chunks(mine, cfg.batch_size):
        enc = collate_prompts([prompts[i] for i in idx], pad)
        with acc.autocast():
            r = sample_rollout(
                inner,
                teacher,
                enc["input_ids"],
                enc["attention_mask"],
                alpha=0.0,
                max_new_tokens=cfg.valid_max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
                # one stream per prompt: the same samples at every evaluation, on any number of processes
                generator=[engine.generator(cfg.seed, 0, i, device=acc.device) for i in idx],
                fast=cfg.fast_rollout,
                score=False,
            )
        s_rows = response_rows(inner, r)  # [N, H]
        t_rows = response_rows(teacher, r)  # [N, H_t]; log p of the samples is not needed here
        s_head, t_head = models.output_head(inner), models.output_head(teacher)
        per_token = torch.zeros(r.mask.shape, device=s_rows.device)  # [B, T]
        per_token[r.mask] = torch.cat(
            [
                reverse_kl(
                    s_head.logits(s_rows[i : i + cfg.chunk_size])[None],
                    t_head.logits(t_rows[i : i + cfg.chunk_size])[None],
                    torch.ones(
                        1, len(s_rows[i : i + cfg.chunk_size]), dtype=torch.bool, device=s_rows.device
                    ),
                )[0]
                for i in range(0, s_rows.shape[0], cfg.chunk_size)
            ]
        )
        kls += per_token.sum(-1).tolist()
        tokens += int(r.mask.sum())
    student.train(was_training)
    n = engine.global_count(acc, len(kls))
    return {
        **rouge,
        "valid/reverse_kl": engine.global_count(acc, sum(kls)) / n,
        "valid/reverse_kl_per_token": engine.global_count(acc, sum(kls)) / engine.global_count(acc, tokens),
        "valid/length": engine.global_count(acc, tokens) / n,
    }


def train_minillm(cfg: MiniLLMConfig) -> Path:
    """Run MiniLLM; returns the folder of the best checkpoint (highest validation Rouge-L by default)."""
    acc, tokenizer, student = load_student(cfg)
    if cfg.gradient_checkpointing and models.has_dropout(student):
        raise ValueError(
            "gradient_checkpointing needs train mode (HF checkpoints layers only then), which would draw "
            "the student's dropout in the RL update; MiniLLM keeps dropout off: turn gradient_checkpointing "
            "off or use a student without dropout"
        )
    teacher = load_teacher(cfg, tokenizer, student, acc)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompts, _ = load_prompts(cfg.train_data, cfg.max_train_examples, tokenizer, cfg, acc)
    valid_prompts, valid_records = load_prompts(cfg.valid_data, cfg.max_valid_examples, tokenizer, cfg, acc)
    pt_blocks = load_pt_blocks(cfg.pt_data, tokenizer, cfg.pt_block_length) if cfg.pt_loss != "none" else None

    per_rank, rest = divmod(cfg.num_rollouts, acc.num_processes)
    mini = cfg.batch_size * cfg.grad_accum  # sequences per rank per optimizer step
    if rest or per_rank % mini:
        raise InputError(
            f"num_rollouts ({cfg.num_rollouts}) must be a multiple of processes ({acc.num_processes}) x "
            f"batch_size ({cfg.batch_size}) x grad_accum ({cfg.grad_accum})"
        )
    steps_per_collection = cfg.ppo_epochs * (per_rank // mini)
    total = min(cfg.max_steps, cfg.epochs * (len(prompts) // cfg.num_rollouts) * steps_per_collection)
    if total == 0:
        raise InputError(
            f"{len(prompts)} prompts cannot fill one collection of num_rollouts={cfg.num_rollouts}"
        )
    optimizer = engine.make_optimizer(student, cfg)
    scheduler = engine.make_scheduler(optimizer, cfg, total)
    student, optimizer = acc.prepare(student, optimizer)
    state, ckpt = engine.resume(acc, cfg, student, optimizer, scheduler)
    cache = teacher_cache(teacher, per_rank, cfg, acc.device)
    store: Rollout | None = None
    t_store: TeacherStore | None = None
    # What sampling computed: allocated per collection and freed once the first step's forwards have read
    # it, so backward does not hold it (backward's RSS is the run's peak on a CPU)
    sampled: SamplingCache | None = None
    keep_layers = acc.num_processes == 1 and acc.mixed_precision == "no"  # see sampling_buffers
    extra = engine.load_extra(ckpt, acc) if ckpt is not None else {}
    if extra:  # resumed mid-collection: the very rollouts the killed run was training on
        store = Rollout(**{f: extra[f].to(acc.device) for f in ROLLOUT_FIELDS}, pad_token_id=pad)
        t_store = TeacherStore(extra["teacher_rows"].to(acc.device))
        if cache is not None:
            t_store = refill_teacher_cache(teacher, store, t_store.rows, cache, cfg)
    log = engine.MetricsLog(acc, cfg, total, state.step)
    if state.step == 0:
        with sharding.gathered(student):  # each rank samples until its own responses end
            log.log(0, validate(student, teacher, valid_prompts, valid_records, tokenizer, cfg, acc))
    all_reduce = (lambda t: acc.reduce(t, reduction="sum")) if acc.num_processes > 1 else None
    # Dropout off in the whole RL phase, sampling and update alike (official code: eval mode), so q_new/q_old
    # is 1 at a collection's first step; train mode only for gradient checkpointing (no dropout, see above)
    student.train(cfg.gradient_checkpointing)
    nonfinite = engine.NonFiniteSteps()
    time_sample = time_teacher = 0.0
    while state.step < total:
        collection, k = divmod(state.step, steps_per_collection)
        epoch, b = divmod(k, per_rank // mini)
        if k == 0 or store is None:
            engine.release_freed_memory()
            t0 = time.perf_counter()
            idx = engine.step_indices(len(prompts), cfg.num_rollouts, cfg.seed, collection)
            mine = range(acc.process_index, cfg.num_rollouts, acc.num_processes)  # places in idx
            with sharding.gathered(student):  # each rank samples until its own responses end
                store, t_store, sampled, time_teacher = collect(
                    student,
                    teacher,
                    [prompts[idx[i]] for i in mine],
                    pad,
                    eos,
                    cfg,
                    acc,
                    # one stream per rollout, by its place in the collection: the same rollouts on any
                    # number of processes
                    [engine.generator(cfg.seed, collection, i, device=acc.device) for i in mine],
                    cache,
                    sampling_buffers(acc.unwrap_model(student), per_rank, cfg, layers=keep_layers),
                )
            time_sample = time.perf_counter() - t0
        # --- one optimizer step on mini-batch b of inner epoch `epoch` ---
        t0 = time.perf_counter()
        order = torch.randperm(
            per_rank, generator=engine.generator(cfg.seed, collection, epoch, 1, device="cpu")
        )
        # in store order: the mini-batch's loss is a sum over its rows, and rows in order make the cached
        # teacher log-probs and sampling logits of a chunk consecutive, read in place (`take_rows`)
        mb_idx = order[b * mini : (b + 1) * mini].sort().values
        mb = store[mb_idx]
        # each store row's valid positions in the teacher store, located by a cumulative count
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), store.mask.sum(-1).cumsum(0)]).tolist()
        rewards, adv = rewards_and_advantages(mb, cfg, all_reduce)
        n_tokens = engine.global_count(acc, int(mb.mask.sum()))
        scale = engine.loss_scale(acc, n_tokens)
        engine.seed_step(cfg.seed, state.step, acc.process_index)
        sums = {"pg": 0.0, "single": 0.0, "clipped": 0.0, "pt": 0.0}
        if (
            pt_blocks is not None
        ):  # the step's blocks for all ranks, so any number of processes takes the same
            pt_picks = torch.randint(
                len(pt_blocks),
                (mini * acc.num_processes,),
                generator=engine.generator(cfg.seed, state.step, device="cpu"),
            )[acc.process_index :: acc.num_processes]
        for j in range(cfg.grad_accum):
            sel = list(range(j * cfg.batch_size, (j + 1) * cfg.batch_size))
            micro = mb[sel]
            at = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in mb_idx[sel].tolist()])
            t_micro = t_store.select(at.to(store.mask.device))
            s_micro = None if sampled is None else sampled.select(at.to(store.mask.device), mb_idx[sel])
            last = j == cfg.grad_accum - 1
            pt_part = {}
            # The PT loss gets its own forward and backward, never synced (the mini-batch's backward below
            # syncs both): one student forward per backward, which accelerate's FSDP2 layout needs (two
            # forwards whose head outputs go unused, then one backward, crash it: docs/distributed.md)
            if pt_blocks is not None:
                pick = pt_picks[j * cfg.batch_size : (j + 1) * cfg.batch_size]
                with acc.no_sync(student), acc.autocast():
                    pt = pt_loss_sum(student, teacher, pt_blocks[pick].to(acc.device), cfg)
                pt_tokens = len(pt_picks) * acc.num_processes * (cfg.pt_block_length - 1)
                engine.backward(
                    acc, student, cfg.pt_coef * pt * engine.loss_scale(acc, pt_tokens), sync=False
                )
                pt_part = {"pt": float(pt.detach()) / pt_tokens}
            if last:
                sampled = None  # this step's last forward is its last reader: the weights move next
            with acc.no_sync(student) if not last else nullcontext(), acc.autocast():
                loss, stats = minibatch_loss(
                    student, teacher, micro, t_micro, adv[sel], 1.0 / scale, cfg, s_micro
                )
                s_micro = None  # frees the sampling cache before backward
            engine.backward(acc, student, loss, sync=last)
            for key, value in (stats | pt_part).items():
                sums[key] += value
        lr = scheduler.get_last_lr()[0]
        grad_norm = engine.clip_and_step(acc, student, optimizer, scheduler, cfg)
        state.step += 1
        time_update = time.perf_counter() - t0
        valid = mb.mask
        metrics = {
            "loss/pg": engine.global_count(acc, sums["pg"]) / n_tokens,
            "loss/single": engine.global_count(acc, sums["single"]) / n_tokens,
            "loss/pt": engine.global_count(acc, sums["pt"]),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": n_tokens,
            "reward": engine.global_count(acc, float(rewards[valid].sum())) / n_tokens,
            "adv/mean": float(adv[valid].mean()),
            "adv/std": float(adv[valid].std()) if valid.sum() > 1 else 0.0,
            "clipfrac": engine.global_count(acc, sums["clipped"]) / n_tokens,
            "importance_weight": float(mb.log_w[valid].exp().mean()),
            "length": float(valid.sum(-1).float().mean()),
            "truncated": float(mb.truncated.float().mean()),
            "time/sample": time_sample if k == 0 else 0.0,  # sampling and teacher passes
            "time/teacher": time_teacher if k == 0 else 0.0,
            "time/update": time_update,
            "tokens/s": n_tokens / time_update,
            "skipped": nonfinite.update(state.step, grad_norm),
        }
        metrics["loss"] = metrics["loss/pg"] + metrics["loss/single"] + cfg.pt_coef * metrics["loss/pt"]
        if k == 0:  # the collection's sampled tokens, counted once (the cost account reads them)
            metrics["tokens/sampled"] = engine.global_count(acc, int(store.mask.sum()))
            metrics["tokens/s_sample"] = metrics["tokens/sampled"] / max(time_sample, 1e-9)
        evaluate = engine.is_eval_step(cfg, state.step, total)
        if evaluate:
            with sharding.gathered(student):
                metrics.update(validate(student, teacher, valid_prompts, valid_records, tokenizer, cfg, acc))
        if state.step % cfg.log_every == 0 or evaluate:
            log.log(state.step, metrics)
        log.advance()
        mid = state.step % steps_per_collection != 0  # a checkpoint taken now must carry the rollouts
        extra = (
            {**{f: getattr(store, f) for f in ROLLOUT_FIELDS}, "teacher_rows": t_store.rows} if mid else None
        )
        engine.checkpoint_if_due(
            acc, cfg, state, metrics, evaluate, student, tokenizer, optimizer, scheduler, extra
        )
    log.close()
    return Path(cfg.output_dir) / "best"
