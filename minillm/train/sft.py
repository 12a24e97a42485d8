"""SFT: cross-entropy on response tokens (prompt masked, the first EOS a target).

Used for the teacher's fine-tune on Dolly and for the student's initialisation before distillation
(paper section 3.1: the student starts from the SFT checkpoint with the lowest validation loss, which is
this stage's `best/` folder with the default best_metric valid/loss).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from minillm import models
from minillm.config import SFTConfig, TrainConfig
from minillm.data.instructions import load_records
from minillm.data.tokenize import Example, collate, encode_records
from minillm.objectives.lm import ce_sum, target_rows
from minillm.train import engine


def load_examples(cfg: TrainConfig, tokenizer: Any, acc: Accelerator) -> tuple[list[Example], list[Example]]:
    """Tokenised train and validation examples, with the official length rule applied and reported."""
    out = []
    for spec, limit in ((cfg.train_data, cfg.max_train_examples), (cfg.valid_data, cfg.max_valid_examples)):
        records = load_records(
            spec,
            field_instruction=cfg.field_instruction,
            field_input=cfg.field_input,
            field_output=cfg.field_output,
            limit=limit,
        )
        examples, dropped = encode_records(
            records,
            tokenizer,
            template=cfg.template,
            max_prompt_length=cfg.max_prompt_length,
            max_length=cfg.max_length,
        )
        acc.print(
            f"{spec}: {len(examples)} examples, {dropped} dropped (prompt > {cfg.max_prompt_length} tokens)"
        )
        if not examples:
            raise ValueError(f"{spec}: no example left after the length rule")
        out.append(examples)
    return out[0], out[1]


def ce_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    """Σ of the response tokens' cross-entropy of one batch (divide by the global token count)."""
    inner = getattr(model, "module", model)
    hidden = models.final_hidden(model, batch["input_ids"], batch["attention_mask"])  # [B, L, H]
    rows, targets = target_rows(hidden, batch["input_ids"], batch["target_mask"])  # [N, H], [N]
    weight, bias = models.output_head(inner)
    return ce_sum(rows, targets, weight, bias, chunk_size=chunk_size)


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


def train_sft(cfg: SFTConfig) -> Path:
    """Run SFT; returns the folder of the best checkpoint (lowest validation loss by default)."""
    acc = engine.make_accelerator(cfg)
    acc.print(f"config: {cfg}")
    tokenizer = models.load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    model = models.load_model(
        cfg.model, dtype=models.torch_dtype(cfg.dtype, acc.device), trust_remote_code=cfg.trust_remote_code
    )
    train, valid = load_examples(cfg, tokenizer, acc)
    pad = tokenizer.pad_token_id
    optimizer = engine.make_optimizer(model, cfg)
    total = engine.total_steps(len(train), cfg, acc.num_processes)
    scheduler = engine.make_scheduler(optimizer, cfg, total)
    model, optimizer = acc.prepare(model, optimizer)
    state, _ = engine.resume(acc, cfg, model, optimizer, scheduler)
    log = engine.MetricsLog(acc, cfg, total, state.step)
    if state.step == 0:
        log.log(0, {"valid/loss": validation_loss(model, valid, pad, cfg, acc)})
    per_step = cfg.batch_size * cfg.grad_accum * acc.num_processes
    model.train()
    while state.step < total:
        t0 = time.perf_counter()
        indices = engine.step_indices(len(train), per_step, cfg.seed, state.step)
        micro = [collate([train[i] for i in mb], pad) for mb in engine.rank_micro_batches(indices, acc, cfg)]
        n_tokens = engine.global_count(acc, sum(int(b["target_mask"].sum()) for b in micro))
        engine.seed_step(cfg.seed, state.step, acc.process_index)
        loss = 0.0
        for k, batch in enumerate(micro):
            batch = {key: v.to(acc.device) for key, v in batch.items()}
            with acc.no_sync(model) if k < len(micro) - 1 else nullcontext(), acc.autocast():
                micro_loss = ce_loss_sum(model, batch, cfg.chunk_size) / n_tokens
            acc.backward(micro_loss)
            loss += float(micro_loss.detach())
        lr = scheduler.get_last_lr()[0]
        grad_norm = engine.clip_and_step(acc, model, optimizer, scheduler, cfg)
        state.step += 1
        dt = time.perf_counter() - t0
        metrics = {
            "loss": engine.global_count(acc, loss),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": n_tokens,
            "tokens/s": n_tokens / dt,
            "time/update": dt,
        }
        evaluate = engine.is_eval_step(cfg, state.step, total)
        if evaluate:
            metrics["valid/loss"] = validation_loss(model, valid, pad, cfg, acc)
        if state.step % cfg.log_every == 0 or evaluate:
            log.log(state.step, metrics)
        log.advance()
        engine.checkpoint_if_due(acc, cfg, state, metrics, evaluate, model, tokenizer, optimizer, scheduler)
    log.close()
    return Path(cfg.output_dir) / "best"
