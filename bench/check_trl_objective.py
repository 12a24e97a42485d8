"""Check that `minillm distill`'s objective, with the flags `compare_trl.py` passes, is TRL's MiniLLMTrainer's.

    .venv-bench/bin/python bench/check_trl_objective.py          # needs the tiny pair (compare_trl.py --prepare-only)

On one fixed batch (8 Dolly prompts, 32 tokens sampled from the tiny student), TRL 1.14.2's own
`MiniLLMTrainer.compute_loss` is compared with the loss built from our objective functions
(`minillm.objectives.policy` and `divergences.reverse_kl`, as `minillm.train.minillm.minibatch_loss` combines
them) under the mapping gamma 0, return_inclusive true, length_norm false, whiten off, reward_scale 1, no
reward clip, clip_eps 0.2, alpha 0, single_step on, pt_loss none:

1. loss values agree for TRL's default gamma 0, where its advantage is the bare reward r_t (our length_norm
   must be off: ours divides r_t by the T − t valid tokens from t even when gamma is 0). For gamma > 0
   TRL normalises by the *discounted* count Σ_{i≥t} γ^(i−t) (its L338-342), ours and the official code by
   the plain count of remaining tokens, so no flag of ours reproduces TRL at gamma > 0 (checked to differ);
2. gradients differ by exactly −(1/N) Σ_t ∇A_t: TRL does not detach its advantage A_t (built from the
   student's differentiable log-probs), so with gamma 0 each token adds ∇log q(y_t), whose expectation under
   the student's own samples is zero (with gamma > 0, the discounted, normalised sum of later tokens' ∇log q);
3. with a completion that stops at an early EOS, TRL's single-step term averages over all B x T completion
   positions (padding after the EOS included) while ours averages over valid tokens: TRL's value is
   reproduced exactly from our functions with that all-positions mask.
Prints one line per check and exits non-zero on a mismatch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trl_worker  # noqa: E402

from minillm.data.template import build_prompt  # noqa: E402
from minillm.data.tokenize import position_ids  # noqa: E402
from minillm.objectives import policy  # noqa: E402
from minillm.objectives.divergences import reverse_kl  # noqa: E402


def trl_loss_and_grads(trainer, inputs: dict) -> tuple[float, list[torch.Tensor]]:
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, {k: v.clone() for k, v in inputs.items()})
    loss.backward()
    return float(loss), [p.grad.detach().clone() for p in model.parameters()]


def our_loss_and_grads(
    student,
    teacher,
    inputs: dict,
    gamma: float,
    length_norm: bool,
    single_step_mask: str,
    exact_positions: bool = True,
) -> tuple[float, list[torch.Tensor], list[torch.Tensor]]:
    """Our objective on TRL's batch: (loss, its gradients, the gradient of −(1/N) Σ_t A_t(log q))."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)  # [B, P+T]
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    P, T = inputs["prompt_ids"].shape[1], inputs["completion_ids"].shape[1]
    mask = inputs["completion_mask"].bool()  # [B, T]
    # TRL's forwards pass no position ids (0..L-1 on every row, left padding counted); ours follow the mask
    # (minillm.data.tokenize.position_ids). RoPE sees only relative positions, so the two agree up to the
    # float32 rounding of the rotary angles (~1e-8 on these logits); TRL's are used here to compare exactly.
    pos = None if exact_positions else position_ids(attn)
    student.zero_grad(set_to_none=True)
    s_logits = student(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).logits
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).logits
    s_logits, t_logits = s_logits[:, P - 1 : -1], t_logits[:, P - 1 : -1]  # [B, T, V], fp64 here
    y = inputs["completion_ids"]
    logq = s_logits.log_softmax(-1).gather(-1, y[..., None])[..., 0]  # [B, T]
    logp = t_logits.log_softmax(-1).gather(-1, y[..., None])[..., 0]
    rewards = policy.token_rewards(logp, logq.detach(), mask)
    adv = policy.advantages(
        rewards,
        mask,
        gamma=gamma,
        inclusive=True,
        length_norm=length_norm,
        reward_scale=1.0,
        reward_clip=None,
        whiten="off",
    )
    pg, _ = policy.ppo_policy_loss(logq, logq.detach(), torch.zeros_like(logq), adv, mask, clip_eps=0.2)
    n = mask.sum()
    if single_step_mask == "valid":
        single = reverse_kl(s_logits, t_logits, mask).sum() / n
    else:  # TRL's: every completion position, padding after an early EOS included
        single = reverse_kl(s_logits, t_logits, torch.ones_like(mask)).sum() / mask.numel()
    loss = pg.sum() / n + single
    loss.backward(retain_graph=True)
    grads = [p.grad.detach().clone() for p in student.parameters()]
    # TRL's advantage kept differentiable in log q (L291-346 of its minillm_trainer.py, padding after an
    # early EOS counted as TRL counts it): A_t = Σ_{i≥t} γ^(i−t) r_i / Σ_{i≥t} γ^(i−t), or r_t when γ = 0
    student.zero_grad(set_to_none=True)
    r = logp - logq  # [B, T], differentiable through logq
    if gamma > 0:
        w = gamma ** torch.arange(T, dtype=r.dtype)  # [T]
        a = (r * w).flip(1).cumsum(1).flip(1) / w.expand_as(r).flip(1).cumsum(1).flip(1)
    else:
        a = r
    (-torch.where(mask, a, 0.0).sum() / n).backward()  # the PG term's extra part, −(1/N) Σ_t ∇A_t
    extra = [p.grad.detach().clone() for p in student.parameters()]
    return float(loss), grads, extra


def rel_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b, strict=True)) ** 0.5
    den = sum(float(y.pow(2).sum()) for y in b) ** 0.5
    return num / max(den, 1e-30)


def tiny_batch() -> tuple[Any, list[str], Any, Any, dict, torch.Tensor]:
    """The fixed batch of these checks: tokenizer, 8 Dolly prompts, the tiny pair in float64, the left-padded
    prompts and 32 tokens sampled from the student after each (no EOS stop)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_dir, student_dir = trl_worker.pair_dirs("tiny")
    tok = AutoTokenizer.from_pretrained(student_dir, padding_side="left")
    records, _ = trl_worker.select_records(tok, 8, 256)
    prompts = [build_prompt(r["instruction"], r["input"], "alpaca") for r in records]
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float64)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float64)
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = student.generate(
            **enc, do_sample=True, max_new_tokens=32, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=2
        )
    return tok, prompts, student, teacher, enc, out[:, enc["input_ids"].shape[1] :]


def main() -> None:
    from datasets import Dataset
    from trl.experimental.minillm import MiniLLMConfig, MiniLLMTrainer

    tok, prompts, student, teacher, enc, completion = tiny_batch()
    base = {
        "prompt_ids": enc["input_ids"],
        "prompt_mask": enc["attention_mask"],
        "completion_ids": completion,
        "completion_mask": torch.ones_like(completion),
        "advantages": torch.zeros(
            len(prompts), dtype=torch.float64
        ),  # GRPO's: 0 for the constant dummy reward
    }
    # an early EOS in row 0 at position 5: TRL pads the rest with pad = EOS and masks it out of the PG term
    early = {k: v.clone() for k, v in base.items()}
    early["completion_ids"][0, 5:] = tok.eos_token_id
    early["completion_mask"][0, 6:] = 0

    failures = 0
    # (gamma, batch, description, our length_norm, single-step mask, whether the losses must agree)
    cases = (
        (0.0, base, "gamma 0, no early EOS, ours with length_norm false", False, "valid", True),
        (
            0.0,
            early,
            "gamma 0, early EOS, our functions with TRL's all-positions single-step mask",
            False,
            "all",
            True,
        ),
        (
            0.0,
            early,
            "gamma 0, early EOS, ours (valid-token single-step mask): differs as expected",
            False,
            "valid",
            False,
        ),
        (0.95, base, "gamma 0.95, ours with length_norm true: differs as expected", True, "valid", False),
    )
    for gamma, batch, name, length_norm, single_mask, expect_same in cases:
        config = MiniLLMConfig(
            output_dir="/tmp/check-trl-objective",
            per_device_train_batch_size=len(prompts),
            num_generations=1,
            max_completion_length=32,
            gradient_checkpointing=False,
            bf16=False,
            report_to="none",
            use_cpu=True,
            gamma=gamma,
        )
        trainer = MiniLLMTrainer(
            model=student,
            teacher_model=teacher,
            args=config,
            train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
            processing_class=tok,
        )
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; one micro-batch here
        trainer.model.train()
        inputs = {**batch, "num_items_in_batch": batch["completion_mask"].sum()}
        l_trl, g_trl = trl_loss_and_grads(trainer, inputs)
        l_ours, g_ours, g_extra = our_loss_and_grads(
            trainer.model, teacher, batch, gamma, length_norm, single_mask
        )
        g_diff = [a - b for a, b in zip(g_trl, g_ours, strict=True)]
        same_loss = abs(l_trl - l_ours) <= 1e-9 * max(1.0, abs(l_trl))
        grad_err = rel_err(g_diff, g_extra)
        ok = (same_loss and grad_err < 1e-6) if expect_same else not same_loss
        failures += not ok
        print(
            f"{'ok  ' if ok else 'FAIL'} {name}: TRL loss {l_trl:.10f}, ours {l_ours:.10f}; "
            f"|(g_TRL - g_ours) - (-1/N)Σ∇A_t| / |(-1/N)Σ∇A_t| = {grad_err:.2e}",
            flush=True,
        )
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
