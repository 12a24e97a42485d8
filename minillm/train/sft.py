"""SFT: cross-entropy on response tokens (prompt masked, the first EOS a target).

Used for the teacher's fine-tune on Dolly and for the student's initialisation before distillation
(paper section 3.1: the student starts from the SFT checkpoint with the lowest validation loss, which is
this stage's `best/` folder with the default best_metric valid/loss). The teacher's fine-tune picks its
checkpoint by validation Rouge-L instead (`valid_rouge_l`, best_metric valid/rougeL, best_mode max), with
answers decoded exactly as `minillm eval` decodes them. The loop, `fit`, is KD's and SeqKD's
too: they change only the loss and the validation metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from minillm import models
from minillm.config import SFTConfig, TrainConfig
from minillm.data.instructions import load_records
from minillm.data.tokenize import Example, collate, encode_prompt, encode_records, target_sequences
from minillm.errors import InputError
from minillm.evaluate import protocol
from minillm.objectives.lm import ce_kd_sum
from minillm.train import engine


def load_student(cfg: TrainConfig) -> tuple[Accelerator, Any, torch.nn.Module]:
    """The run's accelerator (the resolved config printed), the student's tokenizer and the student (a peft
    `PeftModel` with LoRA adapters when `lora_r` > 0)."""
    acc = engine.make_accelerator(cfg)
    acc.print(f"config: {cfg}")
    tokenizer = models.load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    # fp32 master weights whatever the device (the config refuses bf16 ones): on a GPU bf16 comes from
    # autocast, and AdamW's small updates are not rounded away
    model = models.load_model(cfg.model, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
    models.use_vocab(model, len(tokenizer))
    if cfg.gradient_checkpointing:  # non-reentrant: works whether or not the inputs require grad
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_r > 0:
        model = models.add_lora(
            model,
            r=cfg.lora_r,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules,
        )
    return acc, tokenizer, model


def _records(spec: str, limit: int | None, cfg: TrainConfig) -> list[dict[str, Any]]:
    return load_records(
        spec,
        field_instruction=cfg.field_instruction,
        field_input=cfg.field_input,
        field_output=cfg.field_output,
        limit=limit,
    )


def load_split(
    spec: str, limit: int | None, cfg: TrainConfig, tokenizer: Any, acc: Accelerator
) -> list[Example]:
    """Tokenised examples of one data spec: records with an empty response are dropped (nothing to learn
    but EOS), then the official length rule; both counts are reported."""
    records = _records(spec, limit, cfg)
    answered = [r for r in records if r["output"].strip()]
    examples, dropped = encode_records(
        answered,
        tokenizer,
        template=cfg.template,
        max_prompt_length=cfg.max_prompt_length,
        max_length=cfg.max_length,
    )
    empty = len(records) - len(answered)
    acc.print(
        f"{spec}: {len(examples)} examples, {dropped} dropped (prompt > {cfg.max_prompt_length} tokens), "
        f"{empty} dropped (empty {cfg.field_output!r})"
    )
    if not examples:
        raise InputError(
            f"{spec}: no example left of {len(records)} records: {dropped} have a prompt over "
            f"max_prompt_length={cfg.max_prompt_length} tokens, {empty} an empty {cfg.field_output!r}; "
            "raise max_prompt_length (and max_length) or fix the data"
        )
    return examples


def load_prompts(
    spec: str, limit: int | None, tokenizer: Any, cfg: TrainConfig, acc: Accelerator
) -> tuple[list[list[int]], list[dict[str, Any]]]:
    """Prompt ids under the official length rule (long prompts dropped and counted), and their records."""
    records = _records(spec, limit, cfg)
    kept = [(encode_prompt(r, tokenizer, cfg.template), r) for r in records]
    kept = [(ids, r) for ids, r in kept if len(ids) <= cfg.max_prompt_length]
    acc.print(
        f"{spec}: {len(kept)} prompts, {len(records) - len(kept)} dropped (> {cfg.max_prompt_length} tokens)"
    )
    if not kept:
        raise InputError(
            f"{spec}: all {len(records)} prompts are longer than max_prompt_length={cfg.max_prompt_length} "
            "tokens; raise max_prompt_length (and max_length) or shorten them"
        )
    return [ids for ids, _ in kept], [r for _, r in kept]


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


def load_examples(cfg: TrainConfig, tokenizer: Any, acc: Accelerator) -> tuple[list[Example], list[Example]]:
    """Tokenised train and validation examples."""
    return (
        load_split(cfg.train_data, cfg.max_train_examples, cfg, tokenizer, acc),
        load_split(cfg.valid_data, cfg.max_valid_examples, cfg, tokenizer, acc),
    )


def ce_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    """Σ of the response tokens' cross-entropy of one batch (divide by the global token count), through KD's
    machinery (`kd.kd_loss_sums` without a teacher): unpadded forwards grouped by length, one chunked pass
    with the closed-form logit gradient q − onehot(y)."""
    seqs, first, count = target_sequences(batch)
    rows = models.grouped_rows(model, seqs, [f - 1 for f in first], count)  # [N, H]
    targets = batch["input_ids"][batch["target_mask"]]  # [N]
    return ce_kd_sum(rows, targets, models.output_head(model), chunk_size=chunk_size)


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


def train_sft(cfg: SFTConfig) -> Path:
    """Run SFT; returns the folder of the best checkpoint (lowest validation loss by default)."""
    acc, tokenizer, model = load_student(cfg)
    train, valid = load_examples(cfg, tokenizer, acc)
    pad = tokenizer.pad_token_id

    def loss(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return ce_loss_sum(m, batch, cfg.chunk_size), {}

    rouge = rouge_validation(cfg, tokenizer, acc)

    def validate(m: torch.nn.Module) -> dict[str, float]:
        return {"valid/loss": validation_loss(m, valid, pad, cfg, acc), **rouge(m)}

    return fit(acc, cfg, tokenizer, model, train, loss, validate)
