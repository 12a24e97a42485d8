"""One MiniLLM iteration at the docs/design.md §5 shape, timed part by part (meant for one GPU).

GPT-2-XL-shaped teacher (1.56B) and GPT-2-shaped student (124M), random weights, bf16, B = 64 prompts of
128 tokens, 256 sampled tokens, alpha 0.2. Prints a markdown table: HF `generate` of the student alone, our
teacher-mixed sampling (fast and eager), the teacher scoring forward, one update step (PG + single-step on
a mini-batch, chunked), and the peak memory of each part.

    python bench/gpu_step.py                       # the full shape (needs a GPU)
    python bench/gpu_step.py --small --device cpu  # a tiny shape to check the script here
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from gpu_check import DESIGN, TINY, gpt2_config
from transformers import AutoModelForCausalLM

from minillm.config import MiniLLMConfig
from minillm.objectives import policy
from minillm.rollout import Rollout, sample_rollout, score_teacher
from minillm.train.minillm import TeacherStore, minibatch_loss, teacher_cache


def build(dims: tuple[int, int, int], vocab: int, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """A random GPT-2 of (layers, width, heads) `dims`, in eval mode."""
    return AutoModelForCausalLM.from_config(gpt2_config(*dims, vocab), dtype=dtype).to(device).eval()


def timed(fn: Callable[[], object], device: str, reps: int) -> tuple[float, float, object]:
    """Median seconds over `reps` (after one warm-up) and the peak memory in GiB."""
    out = fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return sorted(times)[len(times) // 2], peak, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="Tiny shapes, to check the script on a CPU.")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--alpha", type=float, default=0.2)
    args = p.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    shape = TINY if args.small else DESIGN
    V, B, P, T = shape.vocab, shape.prompts, shape.prompt_tokens, shape.new_tokens
    teacher, student = (
        build(shape.teacher, V, dtype, args.device),
        build(shape.student, V, dtype, args.device),
    )
    g = torch.Generator(device=args.device)
    ids = torch.randint(1, V, (B, P), device=args.device, generator=g.manual_seed(0))
    attn = torch.ones_like(ids)
    rows = []

    def sample(fast: bool) -> Rollout:
        return sample_rollout(
            student,
            teacher,
            ids,
            attn,
            alpha=args.alpha,
            max_new_tokens=T,
            eos_token_id=-1,
            pad_token_id=0,
            generator=g.manual_seed(1),
            fast=fast,
        )

    def hf_generate() -> torch.Tensor:
        torch.manual_seed(1)
        return student.generate(
            input_ids=ids,
            attention_mask=attn,
            do_sample=True,
            top_k=0,
            top_p=1.0,
            max_new_tokens=T,
            min_new_tokens=T,
            pad_token_id=0,
        )

    t, m, _ = timed(hf_generate, args.device, args.reps)
    rows.append(("HF generate, student alone", t, m))
    t, m, r = timed(lambda: sample(True), args.device, args.reps)
    rows.append((f"teacher-mixed sampling, fast (alpha {args.alpha})", t, m))
    t, m, _ = timed(lambda: sample(False), args.device, max(1, args.reps - 2))
    rows.append(("teacher-mixed sampling, eager", t, m))
    cfg = MiniLLMConfig(chunk_size=4096, max_new_tokens=T)
    cache = teacher_cache(teacher, B, cfg, torch.device(args.device))  # the trainer's choice (None here)
    t, m, (t_rows, _) = timed(
        lambda: score_teacher(teacher, r, chunk_size=4096, logp_out=cache), args.device, args.reps
    )
    rows.append(("teacher scoring forward (hidden rows + log p)", t, m))
    t_store = TeacherStore(t_rows, None if cache is None else cache[: len(t_rows)])
    student.train()
    adv = policy.advantages(
        policy.token_rewards(r.logp, r.logq_old, r.mask),
        r.mask,
        gamma=0.95,
        inclusive=True,
        length_norm=True,
        reward_scale=2.0,
        reward_clip=100.0,
        whiten="masked",
    )

    def update() -> None:
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            loss, _ = minibatch_loss(student, teacher, r, t_store, adv, float(r.mask.sum()), cfg)
        loss.backward()
        student.zero_grad(set_to_none=True)

    t, m, _ = timed(update, args.device, args.reps)
    rows.append(("student update (PG + single-step, chunked, B x T tokens)", t, m))
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\ndevice {name}, V={V}, B={B}, prompt {P}, sampled {T}, dtype {dtype}\n")
    print("| part | seconds (median) | peak GiB |\n|---|---:|---:|")
    for label, sec, peak in rows:
        print(f"| {label} | {sec:.3f} | {peak:.2f} |")


if __name__ == "__main__":
    main()
