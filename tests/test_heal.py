"""Healing a derived student: KD towards the teacher on pre-training blocks lowers the held-out KL(p ‖ q)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from minillm import models
from minillm.data.pretrain import load_pt_blocks
from minillm.train import engine
from minillm.train.heal import heal


def forward_kl(student, teacher, ids: torch.Tensor) -> float:
    """Token-averaged KL(p ‖ q) over next-token predictions, from the models' own logits in float64."""
    with torch.no_grad():
        logp = teacher(ids).logits[:, :-1].double().log_softmax(-1)  # [B, L-1, V]
        logq = student(ids).logits[:, :-1].double().log_softmax(-1)
    return float((logp.exp() * (logp - logq)).sum(-1).mean())


def cross_entropy(student, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = student(ids).logits[:, :-1].double()  # [B, L-1, V]
    return float(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()))


@pytest.fixture
def pair(teacher):
    """The tiny teacher with a sharpened head (a random one is near uniform: KL ~1e-3, nothing to heal),
    and the student that keeps its layers 0 and 2."""
    t = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():
        t.get_output_embeddings().weight.mul_(20.0)
    return models.derive_student(t, [0, 2]), t


def first_batch(blocks: torch.Tensor, seed: int, batch_size: int) -> torch.Tensor:
    """The blocks heal draws at step 0 (its seeding contract: a generator seeded by (seed, step))."""
    return blocks[
        torch.randint(len(blocks), (batch_size,), generator=engine.generator(seed, 0, device="cpu"))
    ]


def test_heal_lowers_held_out_kl_and_repeats(pair, tokenizer):
    student, teacher = pair
    blocks = load_pt_blocks("pretrain", tokenizer, 64, max_blocks=48)  # [48, 64]
    train, held_out = blocks[:40], blocks[40:]
    start = copy.deepcopy(student)
    before = forward_kl(student, teacher, held_out)
    expected_first = forward_kl(student, teacher, first_batch(train, 10, 4))
    losses = heal(student, teacher, train, steps=30, batch_size=4, lr=1e-3, seed=10)
    assert losses[0] == pytest.approx(expected_first, rel=1e-4)
    assert forward_kl(student, teacher, held_out) < 0.8 * before  # measured: 0.66 -> 0.36
    assert heal(start, teacher, train, steps=30, batch_size=4, lr=1e-3, seed=10) == losses


def test_heal_with_ce_alone_needs_no_teacher(pair, tokenizer):
    student, _ = pair
    blocks = load_pt_blocks("pretrain", tokenizer, 64, max_blocks=16)
    expected_first = cross_entropy(student, first_batch(blocks, 1, 4))
    losses = heal(student, None, blocks, steps=8, batch_size=4, lr=3e-3, seed=1, kd_ratio=0.0)
    assert losses[0] == pytest.approx(expected_first, rel=1e-4)
    assert cross_entropy(student, blocks) < expected_first


def test_derive_student_cli_heals(teacher, tmp_path, capsys):
    from safetensors.torch import load_file

    from minillm.cli import main

    common = ["derive-student", "--teacher", str(teacher), "--layers", "0,2"]
    main([*common, "--output", str(tmp_path / "cut")])
    main([*common, "--output", str(tmp_path / "healed"), "--heal-steps", "3", "--heal-batch-size", "2"])
    assert "healed 3 steps: KL(teacher ‖ student)" in capsys.readouterr().out
    cut = load_file(tmp_path / "cut" / "model.safetensors")
    healed = load_file(tmp_path / "healed" / "model.safetensors")
    assert cut.keys() == healed.keys()
    assert any(not torch.equal(cut[k], healed[k]) for k in cut)
