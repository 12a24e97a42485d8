"""The losses of training on fixed (prompt, response) token sequences, shared by SFT, KD, SeqKD and GKD:
response-token cross-entropy and kd_ratio·D(p, q) + (1 − kd_ratio)·CE, each a sum over the batch's target
tokens (divide by the optimizer step's global token count), computed by MiniLLM's update machinery:
unpadded forwards grouped by length and one chunked pass with a closed-form logit gradient."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from minillm import models
from minillm.config import KDConfig
from minillm.data.tokenize import target_sequences
from minillm.objectives.divergences import LogitGrad, get_logit_grad
from minillm.objectives.lm import ce_kd_sum
from minillm.train import engine
from minillm.train.sampling_cache import SamplingCache


def make_divergence(cfg: KDConfig) -> LogitGrad:
    """The configured divergence with its parameters bound, in closed form (`divergences.get_logit_grad`)."""
    params: dict[str, float] = {"temperature": cfg.loss_temperature}
    if cfg.divergence == "jsd":
        params["beta"] = cfg.jsd_beta
    elif cfg.divergence.startswith("skew_"):
        params["alpha"] = cfg.skew_alpha
    return get_logit_grad(cfg.divergence, **params)


def ce_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    """Σ of the response tokens' cross-entropy of one batch (divide by the global token count), through KD's
    machinery (`kd_loss_sums` without a teacher): unpadded forwards grouped by length, one chunked pass
    with the closed-form logit gradient q − onehot(y)."""
    seqs, first, count = target_sequences(batch)
    rows = models.grouped_rows(model, seqs, [f - 1 for f in first], count)  # [N, H]
    targets = batch["input_ids"][batch["target_mask"]]  # [N]
    return ce_kd_sum(rows, targets, models.output_head(model), chunk_size=chunk_size)


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
        # the teacher's freed activations would otherwise stay mapped under the chunked pass, the step's peak
        engine.release_freed_memory()
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
