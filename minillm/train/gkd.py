"""Token-level on-policy distillation: GKD (Agarwal et al., ICLR 2024, arXiv 2306.13649) and DistiLLM's
on-policy baseline (Ko et al., ICML 2024, arXiv 2402.03898).

Each optimizer step tosses one coin: with probability `lmbda` (GKD's λ, the "student data fraction") the
step's responses are sampled from the current student for the step's prompts; otherwise the step uses
train_data's responses (gold, or teacher responses when train_data is a SeqKD cache file
`teacher_data_cache/<key>/responses.jsonl`, whose decoded answers are re-tokenised). On those responses
the loss is the KD loss of `kd.py` (`supervised.kd_loss`):
kd_ratio·D(p, q) + (1 − kd_ratio)·CE, summed over response tokens and divided by the step's global token
count, with the full-vocabulary D of `minillm.objectives.divergences` (default: generalised JSD, β = 0.5)
differentiated through the student's logits only (no gradient through the sampling, GKD §3).
Sampling reuses MiniLLM's rollout code with α = 0 (student only, same seeded sampler and EOS rules), and
the update reuses MiniLLM's machinery (`supervised.kd_loss_sums`): unpadded forwards grouped by length, a
closed-form chunked logit gradient and, for a student without dropout, what sampling computed at the same
weights (its logits and decoder-layer outputs, `sampling_cache.py`; `sampling_cache_mib`).

Where this matches and departs from the references:
- TRL GKDTrainer (trl/experimental/gkd/gkd_trainer.py): loss = generalized_jsd_loss only (kd_ratio 1),
  coin with probability lmbda, student sampled at temperature 0.9, 128 new tokens. TRL tosses its coin
  with Python's `random.random()` once per micro-batch and per rank; ours is one coin per optimizer step,
  drawn from generator(seed, step, 0, stream 1), the same on every rank, so the step's global token count
  is known before its micro-batches and a resumed run repeats the coin. TRL's `seq_kd` (teacher responses
  generated every step) is replaced by the cached SeqKD responses as train_data.
- DistiLLM gkd scripts (scripts/gpt2/gkd/gkd_base.sh: --type mixed-jsd --student-gen --mixed-alpha 0.5
  --kd-ratio 1.0, temperature 1, top_k 0, top_p 1, max-length 512): the same coin (numpy, per iteration),
  but on-policy batches there pass through a replay buffer; here a sampled batch is trained on at once.
  DistiLLM's js_distance(lam=0.9) is our jsd with β = 0.1. Its adaptive schedule is not implemented.
- Samples are drawn with dropout off (eval mode), as DistiLLM's sampler does; TRL turns dropout off for
  training too (disable_dropout=True), we keep the model's own dropout for the update, as KD does.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor

from minillm import models, sharding
from minillm.config import GKDConfig
from minillm.data.tokenize import Example, collate
from minillm.rollout import sample_responses
from minillm.train import engine
from minillm.train.loop import rouge_validation, validation_metrics
from minillm.train.sampling_cache import SamplingCache, sampling_buffers
from minillm.train.setup import load_examples, load_student, load_teacher
from minillm.train.supervised import kd_loss, make_divergence

# Streams of engine.generator(seed, step, place, stream): the coin (place 0 on every rank) and the
# samples (one per example, by its place in the step).
COIN_STREAM, SAMPLE_STREAM = 1, 2


def on_policy_coin(cfg: GKDConfig, step: int) -> bool:
    """Whether optimizer step `step` trains on student samples: True with probability cfg.lmbda, seeded."""
    u = torch.rand(
        (), generator=engine.generator(cfg.seed, step, 0, COIN_STREAM, device="cpu"), dtype=torch.float64
    )
    return bool(u < cfg.lmbda)


def step_cache(
    sampling: tuple[Tensor, list[Tensor] | None], lengths: list[int], cfg: GKDConfig
) -> SamplingCache:
    """The `SamplingCache` of one sampled micro-batch (`sampling_buffers`' stores, filled by
    `sample_responses`) for its responses of `lengths` tokens (after any cut to max_length)."""
    logits, layers = sampling
    N = cfg.max_new_tokens
    index = torch.cat([b * N + torch.arange(n) for b, n in enumerate(lengths)]).to(logits.device)  # [M]
    return SamplingCache(logits, index, layers, torch.arange(len(lengths)), cfg.max_prompt_length)


def train_gkd(cfg: GKDConfig) -> Path:
    """Run on-policy distillation; returns the folder of the best checkpoint (lowest validation loss by default)."""
    acc, tokenizer, model = load_student(cfg)
    teacher = load_teacher(cfg, tokenizer, model, acc)
    divergence = make_divergence(cfg)
    train, valid = load_examples(cfg, tokenizer, acc)
    rouge = rouge_validation(cfg, tokenizer, acc)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    optimizer = engine.make_optimizer(model, cfg)
    total = engine.total_steps(len(train), cfg, acc.num_processes)
    scheduler = engine.make_scheduler(optimizer, cfg, total)
    model, optimizer = acc.prepare(model, optimizer)
    state, _ = engine.resume(acc, cfg, model, optimizer, scheduler)
    log = engine.MetricsLog(acc, cfg, total, state.step)
    if state.step == 0:
        log.log(0, validation_metrics(model, teacher, valid, pad, cfg, acc) | rouge(model))
    per_step = cfg.batch_size * cfg.grad_accum * acc.num_processes
    nonfinite = engine.NonFiniteSteps()
    # What sampling computed is the update's own computation only without dropout (the sampler runs in eval
    # mode, the update in train mode); layer replay also needs no autocast and no gradient sync around it
    reuse = not models.has_dropout(acc.unwrap_model(model))
    keep_layers = acc.num_processes == 1 and acc.mixed_precision == "no"
    model.train()
    while state.step < total:
        t0 = time.perf_counter()
        indices = engine.step_indices(len(train), per_step, cfg.seed, state.step)
        examples = [[train[i] for i in mb] for mb in engine.rank_micro_batches(indices, acc, cfg)]
        on_policy = on_policy_coin(cfg, state.step)
        sampled: list[SamplingCache | None] = [None] * len(examples)
        if on_policy:  # replace the responses by the student's own, for the same prompts
            student = acc.unwrap_model(model)
            # one stream per example, by its place in the step (rank_micro_batches' order): the same
            # samples on any number of processes
            places = iter(range(acc.process_index, per_step, acc.num_processes))
            for k, mb in enumerate(examples):
                prompts = [e.prompt_ids for e in mb]
                g = [
                    engine.generator(cfg.seed, state.step, next(places), SAMPLE_STREAM, device=acc.device)
                    for _ in mb
                ]
                buffers = sampling_buffers(student, len(prompts), cfg, layers=keep_layers) if reuse else None
                # sample_responses runs the student in eval mode (no dropout); under FSDP each rank
                # samples until its own responses end (`sharding.gathered`)
                with acc.autocast(), sharding.gathered(model):
                    responses, _ = sample_responses(
                        student,
                        prompts,
                        eos_id=eos,
                        pad_id=pad,
                        generator=g,
                        **engine.sampling_settings(cfg),
                        sampling=buffers,
                    )
                mb[:] = [
                    Example(p, r[: cfg.max_length - len(p)]) for p, r in zip(prompts, responses, strict=True)
                ]
                if buffers is not None:
                    sampled[k] = step_cache(buffers, [len(e.response_ids) for e in mb], cfg)
                buffers = None  # the caches own them now: freed as the update consumes them (below)
            engine.release_freed_memory()  # what the decode freed (packed weights, caches), before the update
        t_sample = time.perf_counter() - t0
        micro = [collate(mb, pad) for mb in examples]
        metrics = engine.supervised_step(
            acc,
            cfg,
            model,
            optimizer,
            scheduler,
            state.step,
            micro,
            # supervised_step calls the loss once per micro-batch, in order; popping drops each cache
            # after its backward, so none is held through the optimizer step (AdamW's state comes then)
            lambda m, batch, pending=sampled: kd_loss(m, teacher, batch, divergence, cfg, pending.pop(0)),
        )
        state.step += 1
        dt = time.perf_counter() - t0
        metrics |= {
            "tokens/s": metrics["tokens"] / dt,
            "on_policy": float(on_policy),
            "tokens/sampled": metrics["tokens"]
            if on_policy
            else 0.0,  # on-policy: trained on what it sampled
            "time/sample": t_sample,
            "time/update": dt - t_sample,
            "skipped": nonfinite.update(state.step, metrics["grad_norm"]),
        }
        evaluate = engine.is_eval_step(cfg, state.step, total)
        if evaluate:
            metrics.update(validation_metrics(model, teacher, valid, pad, cfg, acc) | rouge(model))
        if state.step % cfg.log_every == 0 or evaluate:
            log.log(state.step, metrics)
        log.advance()
        engine.checkpoint_if_due(acc, cfg, state, metrics, evaluate, model, tokenizer, optimizer, scheduler)
    log.close()
    return Path(cfg.output_dir) / "best"
