"""The least time one on-policy distillation step (GKD, λ = 1, reverse KL) can take on this core.

    OMP_NUM_THREADS=1 .venv/bin/python bench/gkd_floor.py          # the embedded pair, the comparison's batches

It reads the pair and the prompt file that `bench/compare_trl.py --pairs embedded` writes under runs/bench/
(`--prepare-only` builds the pair alone).

`bench/compare_trl.py --impls trl-distill,minillm-gkd` times the step; this prices the work no implementation
of that step can skip, each piece at the best speed this core reaches on its exact shape, and prints the
sum next to the step time a throughput ratio over TRL's DistillationTrainer needs. Counted (a lower bound:
everything else, attention, softmax and the KL's elementwise passes over [tokens, V], the optimizer, Python,
is left out, and each GEMM is priced alone, warm, at its best repetition):
- sampling: the student's prefill over the prompts (its layers; the head at one position per row) and the
  decode, whose 8-row products read every student weight once per token (priced at the faster of MKL's
  `F.linear` and oneDNN's packed linear, `decode.packing`, the sampler's kernel);
- teacher: one forward of every prompt + response token through its layers, its head at the response
  positions only;
- student update: backward through its layers (the input and weight gradients of every linear, 2x the
  forward's FLOPs) and the head's two gradients at the response positions. The forward is counted as free
  (sampling computed it; an implementation that kept the decode's activations would not recompute it), and
  so is the head forward (the sampler's logits).

Token counts are the trainer's own: the comparison's prompt file, `engine.step_indices` with its seed, the
prompt template, and responses of exactly --new-tokens (no row of the comparison stopped early).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import trl_worker
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from minillm import models
from minillm.data.instructions import load_records
from minillm.data.tokenize import encode_prompt
from minillm.decode.packing import packed_linears
from minillm.train import engine

BENCH = Path(__file__).resolve().parent
PROMPTS = BENCH.parent / "runs" / "bench" / "compare_trl" / "prompts-embedded.jsonl"


def best_seconds(fn, reps: int) -> float:
    fn()  # warm: weights in cache, kernels chosen
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def gemm_seconds(m: int, k: int, n: int, reps: int) -> float:
    """Best time of [m, k] @ [k, n] into a preallocated output (torch's MKL sgemm)."""
    a, b, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
    return best_seconds(lambda: torch.mm(a, b, out=out), reps)


def layer_linears(model: nn.Module) -> list[tuple[int, int]]:
    """(in, out) features of every linear of every decoder layer."""
    return [
        (m.in_features, m.out_features)
        for layer in models.decoder_layers(model)
        for m in layer.modules()
        if isinstance(m, nn.Linear)
    ]


def decode_seconds(model: nn.Module, rows: int, reps: int) -> tuple[float, float]:
    """(best time, GB/s) of one decode step's linears and head for `rows` rows: the faster of MKL and the
    oneDNN packed kernel the sampler uses, summed over the model's linears (the tied head included)."""
    weights = [
        m for layer in models.decoder_layers(model) for m in layer.modules() if isinstance(m, nn.Linear)
    ]
    head = model.get_output_embeddings()
    mods = [*weights, head]

    def run() -> None:
        with torch.no_grad():
            for m in mods:
                m(torch.ones(rows, m.in_features))

    plain = best_seconds(run, reps)
    with packed_linears(model, rows, enabled=True):
        packed = best_seconds(run, reps)
    seconds = min(plain, packed)
    nbytes = sum(m.weight.numel() * m.weight.element_size() for m in mods)
    return seconds, nbytes / seconds / 1e9


def prompt_lengths(tokenizer, prompts: Path, batch: int, steps: int, seed: int) -> list[list[int]]:
    """Per timed step (1..steps; step 0 is the warm-up), the prompt lengths of its rows, as the trainer draws them."""
    records = [r for r in load_records(str(prompts)) if r["output"].strip()]
    lengths = [len(encode_prompt(r, tokenizer, "alpaca")) for r in records]
    return [
        [lengths[i] for i in engine.step_indices(len(records), batch, seed, s)] for s in range(1, steps + 1)
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", default="embedded")
    p.add_argument("--prompts", type=Path, default=PROMPTS, help="bench/compare_trl.py's prompt file")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=10)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--trl-step", type=float, default=24.7, help="TRL's measured s/step (bench/RESULTS.md)")
    p.add_argument("--ratio", type=float, default=2.5, help="the throughput ratio to price")
    args = p.parse_args()
    torch.manual_seed(0)
    teacher_dir, student_dir = trl_worker.pair_dirs(args.pair)
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    H, V = student.config.hidden_size, student.get_output_embeddings().weight.shape[0]
    t_lin, s_lin = layer_linears(teacher), layer_linears(student)
    decode_step, decode_gbs = decode_seconds(student, args.batch, args.reps)

    memo: dict[tuple[int, int, int], float] = {}

    def gemm(m: int, k: int, n: int) -> float:
        if (m, k, n) not in memo:
            memo[(m, k, n)] = gemm_seconds(m, k, n, args.reps)
        return memo[(m, k, n)]

    rows = []
    for step, lengths in enumerate(
        prompt_lengths(tokenizer, args.prompts, args.batch, args.steps, args.seed), 1
    ):
        P, T, R = sum(lengths), sum(lengths) + args.new_tokens * len(lengths), args.new_tokens * len(lengths)
        parts = {
            "sampling: prefill": sum(gemm(P, i, o) for i, o in s_lin) + gemm(len(lengths), H, V),
            "sampling: decode": (args.new_tokens - 1) * decode_step,
            "teacher: layers": sum(gemm(T, i, o) for i, o in t_lin),
            "teacher: head": gemm(R, H, V),
            # d input = dY @ W ([T, o] @ [o, i]), d W = dYᵀ @ X ([o, T] @ [T, i])
            "student: layer grads": sum(gemm(T, o, i) + gemm(o, T, i) for i, o in s_lin),
            "student: head grads": gemm(R, V, H) + gemm(V, R, H),
        }
        rows.append((step, P, T, parts))
    names = list(rows[0][3])
    print(
        f"# {args.pair} pair, {args.batch} rows x {args.new_tokens} tokens, {torch.get_num_threads()} thread(s), "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; decode reads the student at {decode_gbs:.1f} GB/s\n"
    )
    print("| step | prompt tokens | tokens forwarded | " + " | ".join(names) + " | floor (s) |")
    print("|---" * (len(names) + 4) + "|")
    floors = []
    for step, P, T, parts in rows:
        floors.append(sum(parts.values()))
        cells = " | ".join(f"{v:.2f}" for v in parts.values())
        print(f"| {step} | {P} | {T} | {cells} | **{floors[-1]:.2f}** |")
    need = args.trl_step / args.ratio
    print(
        f"\nfloor {statistics.mean(floors):.2f} s/step (mean of {len(floors)} steps); "
        f"{args.ratio}x TRL's {args.trl_step} s/step needs <= {need:.2f} s/step"
    )


if __name__ == "__main__":
    main()
