"""Word-level KD (docs/design.md §2): loss = kd_ratio·D(p, q) + (1 − kd_ratio)·CE on the gold responses.

At every gold response token the student q matches the frozen teacher's full next-token distribution p
(Hinton et al. 2015; the word-level KD of Kim & Rush 2016 that the MiniLLM paper uses as its "KD"
baseline), mixed with the usual cross-entropy on the gold token. Both terms are summed over response
tokens (prompt masked, first EOS a target) and divided by the optimizer step's global token count. The
teacher's logits are built chunk by chunk from its final hidden states, so no [B, L, V] tensor exists.
The helpers below (teacher loading, the loss sums, held-out forward KL) are shared with SeqKD and GKD.

Departures from the official code (LMOps @ c97f828, minillm/finetune.py `get_distil_loss`,
minillm/scripts/gpt2/kd/kd_base.sh: --type kd --kd-ratio 0.5):
- The official D is the teacher soft-CE −Σ p·log q; ours is forward KL Σ p·(log p − log q) = soft-CE − H(p):
  same gradient, loss values lower by the teacher's entropy, 0 when q = p (`divergence`).
- The official loss averages each micro-batch over its own tokens; ours divides by the step's global
  token count, so gradient accumulation does not reweight micro-batches (docs/design.md §4).
- Any divergence of `minillm.objectives.divergences` (`divergence`, `jsd_beta`, `skew_alpha`) and a
  temperature applied inside D only (`loss_temperature`; official: 1). The teacher runs in `teacher_dtype`
  (official: fp16 teacher; ours bf16 on a GPU, its log-probs upcast to fp32), on `teacher_device`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from minillm import models
from minillm.config import KDConfig, MiniLLMConfig
from minillm.data.tokenize import Example, collate, target_sequences
from minillm.objectives.divergences import LogitGrad, get_logit_grad
from minillm.objectives.lm import ce_kd_sum
from minillm.train import engine
from minillm.train.sampling_cache import SamplingCache
from minillm.train.sft import fit, load_examples, load_student, rouge_validation, validation_loss


def make_divergence(cfg: KDConfig) -> LogitGrad:
    """The configured divergence with its parameters bound, in closed form (`divergences.get_logit_grad`)."""
    params: dict[str, float] = {"temperature": cfg.loss_temperature}
    if cfg.divergence == "jsd":
        params["beta"] = cfg.jsd_beta
    elif cfg.divergence.startswith("skew_"):
        params["alpha"] = cfg.skew_alpha
    return get_logit_grad(cfg.divergence, **params)


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


def kd_loss_sums(
    model: nn.Module,
    teacher: nn.Module,
    batch: dict[str, Tensor],
    divergence: LogitGrad,
    *,
    kd_ratio: float,
    chunk_size: int,
    sampled: SamplingCache | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Σ kd_ratio·D(p_n, q_n) + (1 − kd_ratio)·CE_n over the batch's target tokens (a scalar to divide by the
    global count) and its computed parts, {"loss/kd": Σ D, "loss/ce": Σ CE} (a term whose weight is 0 is
    neither computed nor reported).

    The machinery of MiniLLM's update: both models forward each example once, unpadded, grouped by length
    (`models.grouped_rows`), and one chunked pass with a closed-form logit gradient (`lm.ce_kd_sum`) gives
    both terms. With `sampled` (what sampling computed for these responses at the current weights, the
    student without dropout) the student's logits and layer outputs come from it (`SamplingCache`).

    batch: input_ids [B, L] long, attention_mask [B, L], target_mask [B, L] bool (as `data.tokenize.collate`)
    """
    seqs, first, count = target_sequences(batch)
    rows_at = [f - 1 for f in first]  # row f − 1 + t predicts target t
    replay = None
    if sampled is not None and sampled.layers is not None:
        inner, seq_len = models.unwrap(model), [len(x) for x in seqs]
        replay = lambda group: sampled.replay(inner, group, first, seq_len)  # noqa: E731
    rows = models.grouped_rows(model, seqs, rows_at, count, replay)  # [N, H]
    targets = batch["input_ids"][batch["target_mask"]]  # [N]
    teacher_side = None
    if kd_ratio > 0.0:
        with torch.no_grad():
            teacher_side = (models.grouped_rows(teacher, seqs, rows_at, count), models.output_head(teacher))
    sums: dict[str, float] = {}
    loss = ce_kd_sum(
        rows,
        targets,
        models.output_head(model),
        chunk_size=chunk_size,
        teacher=teacher_side,
        kd_ratio=kd_ratio,
        divergence=divergence,
        parts=sums,
        logits_into=None if sampled is None else sampled.logits_into,
    )
    return loss, {f"loss/{k}": v for k, v in sums.items()}


def kd_loss(
    model: nn.Module,
    teacher: nn.Module,
    batch: dict[str, Tensor],
    divergence: LogitGrad,
    cfg: KDConfig,
    sampled: SamplingCache | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """kd_ratio·Σ D + (1 − kd_ratio)·Σ CE of one micro-batch (a sum: divide by the step's global token
    count) and its computed parts as floats, {"loss/kd": Σ D, "loss/ce": Σ CE}; sampled: `kd_loss_sums`."""
    return kd_loss_sums(
        model, teacher, batch, divergence, kd_ratio=cfg.kd_ratio, chunk_size=cfg.chunk_size, sampled=sampled
    )


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
    out = {"valid/loss": validation_loss(model, examples, pad_id, cfg, acc)}
    if cfg.valid_forward_kl:
        out["valid/forward_kl"] = validation_forward_kl(model, teacher, examples, pad_id, cfg, acc)
    return out


def train_kd(cfg: KDConfig) -> Path:
    """Run word-level KD; returns the folder of the best checkpoint (lowest validation loss by default)."""
    acc, tokenizer, model = load_student(cfg)
    teacher = load_teacher(cfg, tokenizer, model, acc)
    divergence = make_divergence(cfg)
    train, valid = load_examples(cfg, tokenizer, acc)
    pad = tokenizer.pad_token_id

    def loss(m: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        return kd_loss(m, teacher, batch, divergence, cfg)

    rouge = rouge_validation(cfg, tokenizer, acc)

    def validate(m: nn.Module) -> dict[str, float]:
        return validation_metrics(m, teacher, valid, pad, cfg, acc) | rouge(m)

    return fit(acc, cfg, tokenizer, model, train, loss, validate)
