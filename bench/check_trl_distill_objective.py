"""Check that `minillm gkd --lmbda 1 --divergence reverse_kl --kd_ratio 1` optimises TRL 1.16.0's
DistillationTrainer loss (its default beta 1), on one batch.

    .venv-bench-116/bin/python bench/check_trl_distill_objective.py   # needs the tiny pair (compare_trl.py --prepare-only)

On one fixed batch (8 Dolly prompts, 32 tokens sampled from the tiny student, float64 models; row 0 stops
at an early EOS), TRL's own `DistillationTrainer.compute_loss` (backbones, chunked generalized JSD with
beta 1 over the valid completion positions, divided by their count) is compared with ours: the same
prompts and completions as `minillm.data.tokenize.collate` lays them out (the first EOS a target, what
follows it dropped), through `minillm.train.supervised.kd_loss_sums` with the closed-form reverse KL, divided by the
valid-token count as `engine.supervised_step` does. Loss and every student gradient must agree. TRL's
forwards count positions from the left padding, ours run each sequence unpadded (positions from 0): RoPE
sees only relative positions, so the two differ by rounding alone: our loss path equals float64 autograd
through `divergences.reverse_kl` on TRL's padded forwards to ~1e-9 (gradients ~2e-7), and TRL's value to its float32 kernel's
rounding (~2e-6 relative). Prints one line per check and exits non-zero on a mismatch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_trl_objective import rel_err, tiny_batch  # noqa: E402

from minillm.data.tokenize import Example, collate  # noqa: E402
from minillm.objectives.divergences import get_logit_grad, reverse_kl  # noqa: E402
from minillm.train.supervised import kd_loss_sums  # noqa: E402

# relative: TRL's chunked kernel computes in float32 tiles even for float64 models
# (trl/kernels/chunked_divergence.py `_project`), ~2e-6 on these small KL values
TOL_TRL = 1e-5
# relative: float64 both; the unpadded forwards' positions differ from the padded ones by the left padding,
# and RoPE sees relative positions only, through rotary tables built in float32
TOL_LAYOUT = 1e-6


def main() -> None:
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    tok, prompts, student, teacher, enc, completion = tiny_batch()
    mask = torch.ones_like(completion)
    completion[0, 5:] = tok.eos_token_id  # an early EOS: TRL pads the rest with pad = EOS and masks it
    mask[0, 6:] = 0
    config = DistillationConfig(
        output_dir="/tmp/check-trl-distill-objective",
        per_device_train_batch_size=len(prompts),
        max_completion_length=32,
        gradient_checkpointing=False,
        bf16=False,
        report_to="none",
        use_cpu=True,
        beta=1.0,
        temperature=1.0,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
        processing_class=tok,
    )
    model = trainer.model
    model.train()
    inputs = {
        "prompt_ids": enc["input_ids"],
        "prompt_mask": enc["attention_mask"],
        "completion_ids": completion,
        "completion_mask": mask,
        "num_items_in_batch": mask.sum(),
    }
    model.zero_grad(set_to_none=True)
    l_trl = trainer.compute_loss(model, inputs)
    l_trl.backward()
    g_trl = [p.grad.detach().clone() for p in model.parameters()]

    examples = [
        Example(ids[m.bool()].tolist(), c[k.bool()].tolist())
        for ids, m, c, k in zip(enc["input_ids"], enc["attention_mask"], completion, mask, strict=True)
    ]
    batch = collate(examples, tok.pad_token_id)
    n = int(batch["target_mask"].sum())
    model.zero_grad(set_to_none=True)
    loss, _ = kd_loss_sums(model, teacher, batch, get_logit_grad("reverse_kl"), kd_ratio=1.0, chunk_size=16)
    (loss / n).backward()
    l_ours = float(loss.detach()) / n
    g_ours = [p.grad.detach().clone() for p in model.parameters()]

    # float64 autograd through `divergences.reverse_kl` on TRL's own layout (left padding, positions from it)
    ids = torch.cat([inputs["prompt_ids"], completion], 1)  # [B, P + T]
    attn = torch.cat([inputs["prompt_mask"], mask], 1)
    P = inputs["prompt_ids"].shape[1]
    model.zero_grad(set_to_none=True)
    s_logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, P - 1 : -1]  # [B, T, V]
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, P - 1 : -1]
    l_layout = reverse_kl(s_logits, t_logits, mask.bool()).sum() / mask.sum()
    l_layout.backward()
    g_layout = [p.grad.detach().clone() for p in model.parameters()]

    failures = 0
    for name, (ref_name, ref, ref_grads), tol in (
        ("minillm gkd's loss path", ("TRL", float(l_trl), g_trl), TOL_TRL),
        ("minillm gkd's loss path", ("autograd on TRL's layout", float(l_layout), g_layout), TOL_LAYOUT),
    ):
        loss_err = abs(ref - l_ours) / abs(ref)
        grad_err = rel_err(g_ours, ref_grads)
        ok = loss_err < tol and grad_err < tol and n == int(mask.sum())
        failures += not ok
        print(
            f"{'ok  ' if ok else 'FAIL'} {name} vs {ref_name}, {n} sampled tokens: loss {l_ours:.12f} vs "
            f"{ref:.12f} (relative {loss_err:.1e}); |g_ours - g_ref| / |g_ref| = {grad_err:.1e} (< {tol:g})",
            flush=True,
        )
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
