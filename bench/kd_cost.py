"""What word-level KD costs over SFT: `minillm kd` against `minillm sft` plus one teacher forward.

    OMP_NUM_THREADS=1 .venv/bin/python bench/kd_cost.py --pair embedded --steps 3 --reps 2

Both commands train the pair's student on the same Dolly examples (the same seeded step order, batch
--batch, fp32, gradient checkpointing off, the step-0 validation on one example outside the timed steps),
each in a fresh process; per timed step the metrics give tokens and seconds. One teacher forward (decoder
as `supervised.kd_loss_sums` runs it, `models.grouped_rows` under no_grad, then the head's logits at the target
positions) is timed here, in one process, on the very batches of those steps. The figure of merit is KD's
seconds per token over SFT's plus the teacher's, per repetition (SFT, KD and the teacher adjacent in time)
and pooled.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trl_worker  # noqa: E402

from minillm import models  # noqa: E402
from minillm.config import KDConfig  # noqa: E402
from minillm.data.tokenize import (
    collate,  # noqa: E402
    target_sequences,  # noqa: E402
)
from minillm.objectives.chunked import head_logits_into  # noqa: E402
from minillm.train import engine  # noqa: E402
from minillm.train.setup import load_examples  # noqa: E402

OUT = trl_worker.ROOT / "runs" / "bench" / "kd_cost"


def flags(args: argparse.Namespace, out_dir: Path) -> dict[str, object]:
    teacher, student = trl_worker.pair_dirs(args.pair)
    return {
        "model": student,
        "dtype": "float32",
        "mixed_precision": "no",
        "max_valid_examples": 1,
        "batch_size": args.batch,
        "grad_accum": 1,
        "max_steps": args.steps + 1,
        "eval_every": 0,
        "save_every": 0,
        "log_every": 1,
        "gradient_checkpointing": False,
        "seed": args.seed,
        "output_dir": out_dir,
    }


def run(args: argparse.Namespace, command: str, extra: dict[str, object]) -> list[dict]:
    out_dir = OUT / command
    shutil.rmtree(out_dir, ignore_errors=True)  # a fresh run, not a resume
    argv = [str(args.minillm_bin), command]
    for key, value in {**flags(args, out_dir), **extra}.items():
        argv += [f"--{key}", str(value)]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ)
    lines = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "time/update" in m][1:]  # the first step is a warm-up


@torch.no_grad()
def teacher_seconds(args: argparse.Namespace) -> list[float]:
    """One teacher forward on each timed step's batch: its decoder as kd_loss_sums runs it, then its head's
    logits at the target positions, chunk by chunk into one [C, V] buffer (what a forward returns; the
    log-softmax and the divergence are KD's own work)."""
    teacher_dir, student_dir = trl_worker.pair_dirs(args.pair)
    cfg = KDConfig(model=str(student_dir), teacher=str(teacher_dir), batch_size=args.batch, seed=args.seed)
    acc = engine.make_accelerator(cfg)
    tokenizer = models.load_tokenizer(cfg.model)
    train, _ = load_examples(cfg, tokenizer, acc)
    teacher = models.load_model(cfg.teacher, dtype=torch.float32).eval()
    out = []
    for step in range(1, args.steps + 1):
        indices = engine.step_indices(len(train), args.batch, cfg.seed, step)
        batch = collate([train[i] for i in indices], tokenizer.pad_token_id)
        t0 = time.perf_counter()
        seqs, first, count = target_sequences(batch)
        rows = models.grouped_rows(teacher, seqs, [f - 1 for f in first], count)  # [N, H]
        head = models.output_head(teacher)
        buf = rows.new_empty(min(cfg.chunk_size, len(rows)), head.weight.shape[0])  # [C, V]
        for start in range(0, len(rows), cfg.chunk_size):
            chunk = rows[start : start + cfg.chunk_size]
            head_logits_into(buf[: len(chunk)], chunk, head)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", choices=["tiny", "embedded"], default="embedded")
    p.add_argument("--steps", type=int, default=3, help="Timed steps (after one warm-up step).")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=10)
    p.add_argument("--minillm-bin", type=Path, default=trl_worker.ROOT / ".venv" / "bin" / "minillm")
    p.add_argument("--reps", type=int, default=2, help="Repetitions of SFT, KD, teacher, in turn.")
    args = p.parse_args()
    ratios, totals = [], {"sft": 0.0, "kd": 0.0, "teacher": 0.0, "tokens": 0.0}
    for rep in range(args.reps):
        load = os.getloadavg()[0]
        sft = run(args, "sft", {})
        kd = run(args, "kd", {"teacher": trl_worker.pair_dirs(args.pair)[0], "valid_forward_kl": False})
        t_teacher = teacher_seconds(args)
        assert [m["tokens"] for m in sft] == [m["tokens"] for m in kd], "the two runs saw different batches"
        tokens = sum(m["tokens"] for m in sft)
        s_sft = sum(m["time/update"] for m in sft)
        s_kd = sum(m["time/update"] for m in kd)
        s_teacher = sum(t_teacher)
        ratios.append(s_kd / (s_sft + s_teacher))
        for key, value in (("sft", s_sft), ("kd", s_kd), ("teacher", s_teacher), ("tokens", tokens)):
            totals[key] += value
        print(
            f"rep {rep}: {args.pair}, {args.steps} steps x {args.batch} examples, {tokens:.0f} tokens (load "
            f"{load:.1f} -> {os.getloadavg()[0]:.1f}): ms/token SFT {1e3 * s_sft / tokens:.2f}, teacher forward "
            f"{1e3 * s_teacher / tokens:.2f}, KD {1e3 * s_kd / tokens:.2f}; KD / (SFT + teacher) = {ratios[-1]:.2f}",
            flush=True,
        )
    pooled = totals["kd"] / (totals["sft"] + totals["teacher"])
    print(f"pooled KD / (SFT + teacher) = {pooled:.2f}; per rep {', '.join(f'{r:.2f}' for r in ratios)}")


if __name__ == "__main__":
    main()
