"""SFT: cross-entropy on response tokens (prompt masked, the first EOS a target).

Used for the teacher's fine-tune on Dolly and for the student's initialisation before distillation
(paper section 3.1: the student starts from the SFT checkpoint with the lowest validation loss, which is
this stage's `best/` folder with the default best_metric valid/loss). The teacher's fine-tune picks its
checkpoint by validation Rouge-L instead (`valid_rouge_l`, best_metric valid/rougeL, best_mode max), with
answers decoded exactly as `minillm eval` decodes them. Loading is `setup.py`'s, the loss
`supervised.ce_loss_sum`, the loop and validation `loop.py`'s, shared with KD and SeqKD, which change only
the loss and the validation metrics.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minillm.config import SFTConfig
from minillm.train.loop import fit, rouge_validation, validation_loss
from minillm.train.setup import load_examples, load_student
from minillm.train.supervised import ce_loss_sum


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
