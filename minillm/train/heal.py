"""Healing a student cut from its teacher: a short pass of forward KL(p ‖ q) towards the teacher on
pre-training text, before any fine-tuning.

A student that keeps a few of the teacher's layers (`models.derive_student`) inherits its embeddings, final
norm and head, but each kept layer now reads hidden states it was never trained on: the 6-of-30-layer student
of SmolLM2-135M-Instruct starts at 11-24 nats/token on Dolly validation, worse than a uniform guess (ln 49152 =
10.8). A few dozen steps matching the teacher's whole next-token distribution on plain text (every position a
target) re-align the layers with more signal per token than cross-entropy on the one observed token; the
figures are in bench/RESULTS.md, "Cutting a student" (`bench/student_init.py`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from minillm import models
from minillm.data.pretrain import load_pt_blocks
from minillm.objectives.lm import ce_kd_sum
from minillm.train import engine

DERIVATION = "minillm_derivation.json"  # beside a cut student's weights: teacher, layers, healing


def heal(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    blocks: Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    kd_ratio: float = 1.0,
    chunk_size: int = 256,
) -> list[float]:
    """`steps` AdamW steps of the token-averaged (1 − r)·CE + r·KL(p ‖ q), r = kd_ratio (1: the teacher's
    distribution alone; 0: plain CE on the text), on `batch_size` blocks drawn per step.

    blocks:  [N, L] long pre-training token blocks (`data.pretrain.load_pt_blocks`); position i predicts i + 1
    returns: the steps' loss values, nats/token (at r = 1 the KL: 0 means q = p on the batch)
    Blocks are drawn with a generator seeded by (seed, step); dropout is whatever mode the caller left.
    """
    N, L = blocks.shape
    device = next(student.parameters()).device
    # AdamW as every stage (betas of the official MiniLLM schedule); no weight decay for a few dozen steps
    optimizer = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95), weight_decay=0.0
    )
    attn = torch.ones(batch_size, L, dtype=torch.long, device=device)  # [B, L]: blocks have no padding
    out = []
    for step in range(steps):
        pick = torch.randint(N, (batch_size,), generator=engine.generator(seed, step, device="cpu"))
        ids = blocks[pick].to(device)  # [B, L]
        teacher_side = None
        if kd_ratio > 0:
            with torch.no_grad():
                t_rows = models.final_hidden(teacher, ids, attn)[:, :-1].flatten(0, 1)  # [B(L-1), H_t]
            teacher_side = (t_rows, models.output_head(teacher))
        rows = models.final_hidden(student, ids, attn)[:, :-1].flatten(0, 1)  # [B(L-1), H]
        loss = ce_kd_sum(
            rows,
            ids[:, 1:].flatten(),
            models.output_head(student),
            chunk_size=chunk_size,
            teacher=teacher_side,
            kd_ratio=kd_ratio,
        ) / len(rows)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.append(float(loss.detach()))
    return out


def cut_student(
    teacher_spec: str,
    output: str | Path,
    *,
    layers: list[int] | None = None,
    num_layers: int | None = None,
    heal_steps: int = 0,
    heal_lr: float = 5e-4,
    heal_batch_size: int = 8,
    heal_block_length: int = 256,
    heal_data: str = "pretrain",
    seed: int = 10,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Derive a student keeping `layers` of the teacher (or `num_layers` spread from layer 0), heal it for
    `heal_steps` steps, and save it with the teacher's tokenizer to `output`, with how it was made in
    `DERIVATION` (returned too)."""
    teacher = models.load_model(teacher_spec, trust_remote_code=trust_remote_code)
    tokenizer = models.load_tokenizer(teacher_spec, trust_remote_code=trust_remote_code)
    n = teacher.config.num_hidden_layers
    layers = layers if layers is not None else models.spread_layers(n, num_layers or 0)
    student = models.derive_student(teacher, layers)
    made: dict[str, Any] = {
        "teacher": teacher_spec,
        "teacher_layers": n,
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "layers": layers,
        "parameters": sum(p.numel() for p in student.parameters()),
        "heal_steps": heal_steps,
    }
    if heal_steps > 0:
        blocks = load_pt_blocks(
            heal_data, tokenizer, heal_block_length, max_blocks=heal_steps * heal_batch_size
        )
        student.eval()  # no dropout: the student is matched to the teacher's deterministic outputs
        t0 = time.perf_counter()
        losses = heal(
            student, teacher, blocks, steps=heal_steps, batch_size=heal_batch_size, lr=heal_lr, seed=seed
        )
        made |= {
            "heal": {"lr": heal_lr, "batch_size": heal_batch_size, "block_length": heal_block_length},
            "heal_data": heal_data,
            "heal_kl": losses,
            "heal_seconds": time.perf_counter() - t0,
        }
    student.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    (Path(output) / DERIVATION).write_text(json.dumps(made, indent=2))
    return made


def describe(made: dict[str, Any]) -> str:
    """One line for a `cut_student` result."""
    line = f"kept layers {made['layers']} of {made['teacher_layers']}: {made['parameters'] / 1e6:.1f}M parameters"
    if made["heal_steps"]:
        kl = made["heal_kl"]
        line += f"; healed {made['heal_steps']} steps: KL(teacher ‖ student) {kl[0]:.2f} → {kl[-1]:.2f} nats/token"
    return line
