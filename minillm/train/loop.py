"""The training loop of every stage on fixed (prompt, response) examples (`fit`: SFT, KD, SeqKD) and the
validation all stages report: gold-response cross-entropy (valid/loss), forward KL to the teacher
(valid/forward_kl) and Rouge-L of answers decoded as `minillm eval` decodes them (valid/rougeL)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from minillm import sharding
from minillm.config import KDConfig, TrainConfig
from minillm.data.tokenize import Example, collate
from minillm.evaluate import protocol
from minillm.objectives.divergences import get_logit_grad
from minillm.train import engine
from minillm.train.setup import load_prompts
from minillm.train.supervised import ce_loss_sum, kd_loss_sums


def fit(
    acc: Accelerator,
    cfg: TrainConfig,
    tokenizer: Any,
    model: torch.nn.Module,
    train: list[Example],
    loss: engine.LossFn,
    validate: Callable[[torch.nn.Module], dict[str, float]],
    start_metrics: dict[str, float] | None = None,
) -> Path:
    """The training loop of SFT, KD and SeqKD: fixed (prompt, response) examples, `loss` as in
    `engine.supervised_step`, `validate(model)` at step 0 (with `start_metrics`) and at each evaluation.
    Returns the folder of the best checkpoint."""
    pad = tokenizer.pad_token_id
    optimizer = engine.make_optimizer(model, cfg)
    total = engine.total_steps(len(train), cfg, acc.num_processes)
    scheduler = engine.make_scheduler(optimizer, cfg, total)
    model, optimizer = acc.prepare(model, optimizer)
    state, _ = engine.resume(acc, cfg, model, optimizer, scheduler)
    log = engine.MetricsLog(acc, cfg, total, state.step)
    if state.step == 0:
        log.log(0, {**(start_metrics or {}), **validate(model)})
    per_step = cfg.batch_size * cfg.grad_accum * acc.num_processes
    nonfinite = engine.NonFiniteSteps()
    model.train()
    while state.step < total:
        t0 = time.perf_counter()
        indices = engine.step_indices(len(train), per_step, cfg.seed, state.step)
        micro = [collate([train[i] for i in mb], pad) for mb in engine.rank_micro_batches(indices, acc, cfg)]
        metrics = engine.supervised_step(acc, cfg, model, optimizer, scheduler, state.step, micro, loss)
        state.step += 1
        dt = time.perf_counter() - t0
        metrics |= {"tokens/s": metrics["tokens"] / dt, "time/update": dt}
        metrics["skipped"] = nonfinite.update(state.step, metrics["grad_norm"])
        evaluate = engine.is_eval_step(cfg, state.step, total)
        if evaluate:
            metrics.update(validate(model))
        if state.step % cfg.log_every == 0 or evaluate:
            log.log(state.step, metrics)
        log.advance()
        engine.checkpoint_if_due(acc, cfg, state, metrics, evaluate, model, tokenizer, optimizer, scheduler)
    log.close()
    return Path(cfg.output_dir) / "best"


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module, examples: list[Example], pad_id: int, cfg: TrainConfig, acc: Accelerator
) -> float:
    """Token-averaged response cross-entropy over `examples`, shared across ranks."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch_examples in engine.chunks(examples[acc.process_index :: acc.num_processes], cfg.batch_size):
        batch = {k: v.to(acc.device) for k, v in collate(batch_examples, pad_id).items()}
        with acc.autocast():
            total += float(ce_loss_sum(model, batch, cfg.chunk_size))
        count += int(batch["target_mask"].sum())
    model.train(was_training)
    return engine.global_count(acc, total) / max(1.0, engine.global_count(acc, count))


@torch.no_grad()
def validation_forward_kl(
    model: nn.Module,
    teacher: nn.Module,
    examples: list[Example],
    pad_id: int,
    cfg: KDConfig,
    acc: Accelerator,
) -> float:
    """Token-averaged KL(teacher ‖ student) at temperature 1 over the examples' response tokens, all ranks."""
    was_training = model.training
    model.eval()
    fkl = get_logit_grad("forward_kl")
    total, count = 0.0, 0
    for batch_examples in engine.chunks(examples[acc.process_index :: acc.num_processes], cfg.batch_size):
        batch = {k: v.to(acc.device) for k, v in collate(batch_examples, pad_id).items()}
        with acc.autocast():
            kd, _ = kd_loss_sums(model, teacher, batch, fkl, kd_ratio=1.0, chunk_size=cfg.chunk_size)
        total += float(kd)
        count += int(batch["target_mask"].sum())
    model.train(was_training)
    return engine.global_count(acc, total) / max(1.0, engine.global_count(acc, count))


def validation_metrics(
    model: nn.Module,
    teacher: nn.Module | None,
    examples: list[Example],
    pad_id: int,
    cfg: KDConfig,
    acc: Accelerator,
) -> dict[str, float]:
    """valid/loss (gold CE) and, if cfg.valid_forward_kl, valid/forward_kl on the validation examples
    (`teacher` may be None without it)."""
    with sharding.gathered(model):  # ranks run different numbers of batches (`minillm.sharding`)
        out = {"valid/loss": validation_loss(model, examples, pad_id, cfg, acc)}
        if cfg.valid_forward_kl:
            out["valid/forward_kl"] = validation_forward_kl(model, teacher, examples, pad_id, cfg, acc)
    return out


def mean_validation_rouge_l(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    records: list[dict[str, Any]],
    cfg: TrainConfig,
    acc: Accelerator,
) -> float:
    """valid/rougeL: Rouge-L of answers to the validation prompts decoded as `minillm eval` decodes them
    (`protocol.validation_rouge_l`), averaged over all prompts; each rank answers every num_processes-th."""
    mine = list(range(acc.process_index, len(prompts), acc.num_processes))
    with sharding.gathered(model):  # each rank decodes until its own answers end
        scores = protocol.validation_rouge_l(
            acc.unwrap_model(model),
            tokenizer,
            [prompts[i] for i in mine],
            [records[i]["output"] for i in mine],
            seed=cfg.seed,
            rank=acc.process_index,
            batch_size=cfg.batch_size,
            max_new_tokens=cfg.valid_max_new_tokens,
        )
    return engine.global_count(acc, sum(scores)) / engine.global_count(acc, len(scores))


def rouge_validation(
    cfg: TrainConfig, tokenizer: Any, acc: Accelerator
) -> Callable[[torch.nn.Module], dict[str, float]]:
    """model -> {"valid/rougeL": ...} on cfg.valid_data's prompts when cfg.valid_rouge_l, else -> {}."""
    if not cfg.valid_rouge_l:
        return lambda m: {}
    prompts, records = load_prompts(cfg.valid_data, cfg.max_valid_examples, tokenizer, cfg, acc)
    return lambda m: {"valid/rougeL": mean_validation_rouge_l(m, tokenizer, prompts, records, cfg, acc)}
