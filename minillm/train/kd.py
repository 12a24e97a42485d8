"""Word-level KD (docs/design.md §2): loss = kd_ratio·D(p, q) + (1 − kd_ratio)·CE on the gold responses.

At every gold response token the student q matches the frozen teacher's full next-token distribution p
(Hinton et al. 2015; the word-level KD of Kim & Rush 2016 that the MiniLLM paper uses as its "KD"
baseline), mixed with the usual cross-entropy on the gold token. Both terms are summed over response
tokens (prompt masked, first EOS a target) and divided by the optimizer step's global token count. The
teacher's logits are built chunk by chunk from its final hidden states, so no [B, L, V] tensor exists.
Teacher loading (`setup.load_teacher`), the loss sums (`supervised.py`) and the held-out forward KL
(`loop.validation_forward_kl`) are shared with SeqKD, GKD and MiniLLM.

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

from torch import Tensor, nn

from minillm.config import KDConfig
from minillm.train.loop import fit, rouge_validation, validation_metrics
from minillm.train.setup import load_examples, load_student, load_teacher
from minillm.train.supervised import kd_loss, make_divergence


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
