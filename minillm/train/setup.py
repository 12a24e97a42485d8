"""What every training stage loads first: the accelerator with the student, the frozen teacher, and the
tokenised training / validation data (examples with responses, or prompts alone), each under the official
length rule with what was dropped reported."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from minillm import models
from minillm.config import KDConfig, MiniLLMConfig, TrainConfig
from minillm.data.instructions import load_records
from minillm.data.tokenize import Example, encode_prompt, encode_records
from minillm.errors import InputError
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
        # The adapters' random init (LoRA A) is the seed's, the same in every process and every run: DDP would
        # broadcast rank 0's, but FSDP keeps each rank's slice of that rank's own init
        torch.manual_seed(cfg.seed)
        model = models.add_lora(
            model,
            r=cfg.lora_r,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules,
        )
    return acc, tokenizer, model


def load_teacher(
    cfg: KDConfig | MiniLLMConfig, tokenizer: Any, student: nn.Module, acc: Accelerator
) -> nn.Module:
    """The frozen teacher in `teacher_dtype` on `teacher_device` (default: the student's), after checking it
    shares the student's tokenizer and vocabulary. On another device its head is placed beside the student
    (`models.place_apart`), so every caller hands it inputs and gets its outputs on the student's device."""
    kw = dict(trust_remote_code=cfg.trust_remote_code)
    teacher_tokenizer = models.load_tokenizer(cfg.teacher, **kw)
    models.check_same_tokenizer(
        tokenizer, teacher_tokenizer, (f"student {cfg.model}", f"teacher {cfg.teacher}")
    )
    device = _indexed(torch.device(cfg.teacher_device) if cfg.teacher_device else acc.device)
    teacher = models.load_model(cfg.teacher, dtype=models.torch_dtype(cfg.teacher_dtype, device), **kw)
    models.use_vocab(teacher, len(tokenizer))  # as the student's (`load_student`): padding rows differ
    models.check_same_vocab(student, teacher)
    teacher.requires_grad_(False).eval()
    if device != _indexed(acc.device):
        return models.place_apart(teacher, device, acc.device)
    return teacher.to(device)


def _indexed(device: torch.device) -> torch.device:
    """`cuda` as the `cuda:N` it means now, so equal devices compare equal."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


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


def load_examples(cfg: TrainConfig, tokenizer: Any, acc: Accelerator) -> tuple[list[Example], list[Example]]:
    """Tokenised train and validation examples."""
    return (
        load_split(cfg.train_data, cfg.max_train_examples, cfg, tokenizer, acc),
        load_split(cfg.valid_data, cfg.max_valid_examples, cfg, tokenizer, acc),
    )
