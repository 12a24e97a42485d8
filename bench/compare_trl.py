"""Side by side: TRL's MiniLLMTrainer, GKDTrainer (1.14.2) and DistillationTrainer (1.16.0) against
`minillm distill` and `minillm gkd`, same workload.

    .venv/bin/python bench/compare_trl.py --pairs tiny,embedded --reps 3          # MiniLLM side by side
    .venv/bin/python bench/compare_trl.py --pairs embedded --impls trl-distill,minillm-gkd --baseline trl-distill
    .venv/bin/python bench/compare_trl.py --pairs tiny --impls trl-minillm --reps 1
    .venv/bin/python bench/compare_trl.py --prepare-only                          # build the model pairs

TRL lives in its own venvs so it cannot disturb ours: 1.14.2 (the `bench` extra pins it; its
MiniLLMTrainer was removed in 1.15.0) in `.venv-bench`, 1.16.0 (the stable `DistillationTrainer`) in
`.venv-bench-116`. Set each up once (torch first and pinned, or pip pulls a multi-GB CUDA build):

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0
    .venv-bench/bin/pip install -c constraints.txt trl==1.14.2
    .venv-bench/bin/pip install --no-deps -e .        # the worker reads prompts through minillm.data
    python3 -m venv .venv-bench-116
    .venv-bench-116/bin/pip install torch==2.13.0
    .venv-bench-116/bin/pip install -c constraints.txt trl==1.16.0
    .venv-bench-116/bin/pip install --no-deps -e .

Pairs (built once under runs/bench/pairs by this script, in our venv): `tiny`, a random Llama teacher
(hidden 64, 4 layers) and student (hidden 64, 2 layers) with the SmolLM2 vocabulary (49152); `embedded`,
SmolLM2-135M-Instruct and the student of its layers 0,5,10,15,20,25. Prompts: the first batch x (steps + 1)
Dolly training instructions whose Alpaca prompt fits in --prompt-tokens, written to one JSONL that both
sides read. Each repetition runs every implementation once, in turn, as a fresh process; each process runs
a warm-up step and --steps timed steps. Per configuration the table gives seconds per timed step (median,
min, max over all repetitions), completion tokens per second (all timed tokens / all timed seconds), the
process's peak RSS (from wait4: its own maximum resident set, loading included), and ratios to TRL's
MiniLLMTrainer.

Same objective. `minillm distill` gets the flags that reproduce what TRL's MiniLLMTrainer optimises with
alpha 0 (it has no teacher mixing), one inner epoch and the single-step term on: for TRL's default gamma 0
the advantage is the bare reward r_t = log p − log q (our gamma 0, return_inclusive true, length_norm false,
whiten off, reward_scale 1, no reward clip), the PG loss averaged over valid tokens, the full-vocabulary
KL(q‖p) at every sampled position, no PT loss. `bench/check_trl_objective.py` checks this on one batch
against TRL's own `compute_loss`: equal loss, and gradients that differ only by TRL's undetached advantage
(a zero-mean ∇log q(y_t) per token). Also different, neither changing the timing: TRL averages the
single-step term over all completion positions, padding after an early EOS included (ours: valid tokens;
the same when no completion stops early, which `eos_ended` in the raw results shows), and its lr decays
linearly (ours: constant). At gamma > 0 TRL divides by a discounted token count, which no flag of ours
reproduces; the driver then passes length_norm true and warns. bench/trl_worker.py's docstring reads TRL's
source line by line.

On-policy distillation. `minillm gkd` gets `--lmbda 1 --divergence reverse_kl --kd_ratio 1`: every step
samples from the student and trains on the full-vocabulary KL(q‖p) of its samples, summed over valid tokens
and divided by their count, which is what TRL 1.16.0's DistillationTrainer optimises with its default
beta 1 (`bench/check_trl_distill_objective.py` checks it on one batch). Both sides: lr 5e-6, AdamW betas
(0.9, 0.999), no weight decay, no warm-up (TRL then decays linearly, ours is constant).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
import trl_worker  # noqa: E402  (pair and prompt preparation, shared with the worker)

OUT = ROOT / "runs" / "bench" / "compare_trl"
IMPLS = ("trl-minillm", "trl-gkd", "trl-distill", "minillm", "minillm-gkd")
# which `minillm` command each of ours runs, and TRL's trainers by the venv that holds them
OURS = {"minillm": "distill", "minillm-gkd": "gkd"}
TRL_116 = ("trl-distill",)


def ours_available(minillm_bin: Path, command: str) -> str | None:
    """None if `minillm <command>` can run, else why not."""
    if not minillm_bin.is_file():
        return f"{minillm_bin} does not exist"
    proc = subprocess.run([str(minillm_bin), command, "--help"], capture_output=True, text=True)
    field = {"distill": "teacher_mix_alpha", "gkd": "lmbda"}[command]
    if proc.returncode != 0 or field not in proc.stdout:
        return f"`minillm {command} --help` failed or lists no {field}: {(proc.stdout + proc.stderr)[-300:]}"
    return None


def workload_flags(args: argparse.Namespace, pair: str, records: Path, out_dir: Path) -> dict[str, Any]:
    """The flags every `minillm` command of this comparison shares: models, prompts, lengths, one sample per
    prompt per step, sampling settings, AdamW as TRL's defaults (betas (0.9, 0.999), no weight decay, no
    warm-up), logging."""
    teacher, student = trl_worker.pair_dirs(pair)
    return {
        "model": student,
        "teacher": teacher,
        "dtype": "float32",
        "mixed_precision": "no",
        "train_data": records,
        "valid_data": "dolly_valid",
        "max_valid_examples": 1,  # validation runs at step 0 and at the end, outside the timed steps
        "max_prompt_length": args.prompt_tokens,
        "max_length": args.prompt_tokens + args.new_tokens,
        "max_new_tokens": args.new_tokens,
        "batch_size": args.batch,
        "grad_accum": 1,
        "max_steps": args.steps + 1,
        "epochs": 1,
        "sample_temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "weight_decay": 0.0,
        "warmup_steps": 0,
        "max_grad_norm": 1.0,
        "gradient_checkpointing": args.gradient_checkpointing == "on",
        "seed": args.seed,
        "output_dir": out_dir,
        "eval_every": 0,
        "save_every": 0,
        "log_every": 1,
    }


def ours_argv(args: argparse.Namespace, pair: str, records: Path, out_dir: Path) -> list[str]:
    """`minillm distill` flags for the workload and objective of TRL's MiniLLMTrainer (module docstring)."""
    flags = {
        **workload_flags(args, pair, records, out_dir),
        "valid_max_new_tokens": 1,
        "num_rollouts": args.batch,
        "ppo_epochs": 1,
        "teacher_mix_alpha": 0.0,
        "gamma": args.gamma,
        "return_inclusive": True,
        # TRL at gamma 0: A_t = r_t, no normalisation (ours would divide r_t by the T - t tokens left)
        "length_norm": args.gamma > 0,
        "whiten": "off",
        "reward_scale": 1.0,
        "reward_clip": 1e30,  # TRL does not clip rewards
        "clip_eps": 0.2,
        "single_step": True,
        "pt_loss": "none",
        "lr": 1e-6,  # TRL GRPO default
    }
    return as_argv(flags) + args.ours_extra.split()


def as_argv(flags: dict[str, Any]) -> list[str]:
    argv = []
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]
    return argv


def ours_gkd_argv(args: argparse.Namespace, pair: str, records: Path, out_dir: Path) -> list[str]:
    """`minillm gkd` flags for the workload and objective of TRL 1.16.0's DistillationTrainer (docstring)."""
    flags = {
        **workload_flags(args, pair, records, out_dir),
        "valid_forward_kl": False,
        "lmbda": 1.0,
        "divergence": "reverse_kl",
        "kd_ratio": 1.0,
        "loss_temperature": 1.0,
        "lr": args.lr,
    }
    return as_argv(flags) + args.ours_extra.split()


def run_process(cmd: list[str], log_path: Path, env: dict[str, str]) -> tuple[int, int, float]:
    """Run `cmd` with output to `log_path`; return (exit code, peak RSS in KiB of that process, seconds)."""
    t0 = time.perf_counter()
    with log_path.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, unlike RUSAGE_CHILDREN's max
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss, time.perf_counter() - t0


def thread_env(args: argparse.Namespace) -> dict[str, str]:
    """Both sides get the same intra-op thread count. On a shared 2-core box torch's default (2 threads)
    decodes 7-14x slower than 1 thread once other processes load the cores (bench/RESULTS.md)."""
    if args.threads <= 0:
        return {}
    n = str(args.threads)
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def steps_of(args: argparse.Namespace, impl: str) -> int:
    return args.steps_gkd if impl == "trl-gkd" and args.steps_gkd else args.steps


def run_trl(args: argparse.Namespace, impl: str, pair: str, records: Path, log_path: Path) -> dict[str, Any]:
    cmd = [
        str(args.bench_python_116 if impl in TRL_116 else args.bench_python),
        str(BENCH / "trl_worker.py"),
        *("--pair", pair, "--trainer", impl.removeprefix("trl-"), "--records", str(records)),
        *("--batch", str(args.batch), "--prompt-tokens", str(args.prompt_tokens)),
        *("--new-tokens", str(args.new_tokens), "--steps", str(steps_of(args, impl))),
        *("--gamma", str(args.gamma)),
        *("--gradient-checkpointing", args.gradient_checkpointing, "--seed", str(args.seed)),
        *(("--lr", str(args.lr)) if impl in TRL_116 else ()),
    ]
    env = {**os.environ, **thread_env(args), "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONUNBUFFERED": "1"}
    code, rss, wall = run_process(cmd, log_path, env)
    lines = [ln for ln in log_path.read_text().splitlines() if ln.startswith("RESULT ")]
    if code != 0 or not lines:
        raise RuntimeError(f"{impl} on {pair} failed (exit {code}); see {log_path}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result.update(peak_rss_kb=rss, wall_s=wall, cmd=" ".join(cmd))
    return result


def run_ours(args: argparse.Namespace, impl: str, pair: str, records: Path, log_path: Path) -> dict[str, Any]:
    out_dir = OUT / "ours-out" / pair
    shutil.rmtree(out_dir, ignore_errors=True)
    command = OURS[impl]
    argv = (ours_argv if command == "distill" else ours_gkd_argv)(args, pair, records, out_dir)
    cmd = [str(args.minillm_bin), command, *argv]
    code, rss, wall = run_process(cmd, log_path, {**os.environ, **thread_env(args), "PYTHONUNBUFFERED": "1"})
    metrics_path = out_dir / "metrics.jsonl"
    if code != 0 or not metrics_path.is_file():
        raise RuntimeError(f"minillm {command} on {pair} failed (exit {code}); see {log_path}")
    steps = [m for m in map(json.loads, metrics_path.read_text().splitlines()) if "time/update" in m]
    if len(steps) != args.steps + 1:
        raise RuntimeError(f"expected {args.steps + 1} step lines in {metrics_path}, got {len(steps)}")
    times = [m["time/sample"] + m["time/update"] for m in steps]  # every step samples
    shutil.rmtree(out_dir, ignore_errors=True)  # the final checkpoint
    return {
        "impl": impl,
        "pair": pair,
        "warmup_s": times[:1],
        "step_s": times[1:],
        "sample_s": [m["time/sample"] for m in steps[1:]],
        "teacher_s": [m.get("time/teacher", 0.0) for m in steps[1:]],  # inside sample_s
        "update_s": [m["time/update"] for m in steps[1:]],
        "tokens": [int(m["tokens"]) for m in steps[1:]],
        "peak_rss_kb": rss,
        "wall_s": wall,
        "cmd": " ".join(cmd),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, float]:
    times = [t for r in runs for t in r["step_s"]]
    tokens = sum(sum(r["tokens"]) for r in runs)
    rss = [r["peak_rss_kb"] / 2**20 for r in runs]  # GiB
    return {
        "reps": len(runs),
        "steps": len(times),
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "tok_s": tokens / sum(times),
        "tokens_per_step": tokens / len(times),
        "rss": statistics.median(rss),
        "rss_max": max(rss),
    }


def table(pair: str, results: list[dict[str, Any]], baseline: str = "trl-minillm") -> str:
    present = [impl for impl in IMPLS if any(r["impl"] == impl for r in results)]
    rows = {impl: summarise([r for r in results if r["impl"] == impl]) for impl in present}
    base = rows.get(baseline)
    out = [
        f"**{pair}** pair",
        "",
        "| implementation | reps x steps | s/step median | min | max | tokens/step | tokens/s | peak RSS GiB "
        f"| throughput vs {baseline}: pooled; per rep median (range) | RSS vs {baseline} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def per_rep(impl: str, key: str) -> str:
        """The ratio to the baseline within each repetition (adjacent in time, so under similar load)."""
        ratios = []
        for b in (r for r in results if r["impl"] == baseline):
            same = [r for r in results if r["impl"] == impl and r["rep"] == b["rep"] and r["run"] == b["run"]]
            if same:
                ratios.append(summarise(same)[key] / summarise([b])[key])
        if not ratios:
            return "-"
        if len(ratios) == 1:
            return f"{ratios[0]:.2f}x"
        return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"

    for impl, s in rows.items():
        thr = f"{s['tok_s'] / base['tok_s']:.2f}x; per rep {per_rep(impl, 'tok_s')}" if base else "-"
        mem = f"{s['rss'] / base['rss']:.2f}x; per rep {per_rep(impl, 'rss')}" if base else "-"
        out.append(
            f"| {impl} | {s['reps']} x {s['steps'] // s['reps']} | {s['median']:.2f} | {s['min']:.2f} "
            f"| {s['max']:.2f} | {s['tokens_per_step']:.0f} | {s['tok_s']:.1f} | {s['rss']:.2f} "
            f"(max {s['rss_max']:.2f}) | {thr} | {mem} |"
        )
    return "\n".join(out)


def _summed(r: dict[str, Any]) -> str:
    return f"median {statistics.median(r['step_s']):.2f} s/step, {r['peak_rss_kb'] / 2**20:.2f} GiB"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", default="tiny,embedded", help="Comma-separated: tiny, embedded.")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"Comma-separated subset of {', '.join(IMPLS)}.")
    p.add_argument("--reps", type=int, default=3, help="Repetitions; each runs every implementation once.")
    p.add_argument("--batch", type=int, default=8, help="Prompts per optimizer step (one sample each).")
    p.add_argument("--prompt-tokens", type=int, default=256, help="Longer Dolly prompts are skipped.")
    p.add_argument("--new-tokens", type=int, default=128, help="Sampled tokens per response at most.")
    p.add_argument("--steps", type=int, default=5, help="Timed optimizer steps per process (+1 warm-up).")
    p.add_argument(
        "--steps-gkd",
        type=int,
        default=0,
        help="Timed steps of TRL's GKDTrainer if not --steps: with gradient checkpointing on (TRL's "
        "default) it samples without a KV cache, so each step is slow.",
    )
    p.add_argument("--gamma", type=float, default=0.0, help="Discount on both sides (TRL default 0).")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS of both sides (0 = torch's default, all cores). 1 keeps timings stable on a "
        "shared machine.",
    )
    p.add_argument("--seed", type=int, default=10)
    p.add_argument(
        "--gradient-checkpointing",
        choices=["on", "off"],
        default="on",
        help="Activation recomputation on both sides (TRL's default: on).",
    )
    p.add_argument(
        "--ours-extra", default="", help="Extra flags of our command: --ours-extra='--chunk_size 512'."
    )
    p.add_argument("--baseline", default="trl-minillm", help="The implementation the ratios refer to.")
    p.add_argument(
        "--lr", type=float, default=5e-6, help="Learning rate of minillm gkd and TRL's DistillationTrainer."
    )
    p.add_argument("--bench-python", type=Path, default=ROOT / ".venv-bench" / "bin" / "python")
    p.add_argument("--bench-python-116", type=Path, default=ROOT / ".venv-bench-116" / "bin" / "python")
    p.add_argument("--minillm-bin", type=Path, default=ROOT / ".venv" / "bin" / "minillm")
    p.add_argument("--prepare-only", action="store_true", help="Build the model pairs and stop.")
    p.add_argument(
        "--tabulate",
        nargs="+",
        type=Path,
        default=None,
        help="Print the tables of saved raw results (results-*.json files, pooled) and stop.",
    )
    args = p.parse_args(argv)
    if args.tabulate:
        pooled = []
        for f in args.tabulate:
            raw = json.loads(f.read_text())
            pooled += [{"run": raw["date"], **r} for r in raw["results"]]
        for pair in dict.fromkeys(r["pair"] for r in pooled):
            print(table(pair, [r for r in pooled if r["pair"] == pair], args.baseline) + "\n")
        return

    pairs = [x for x in args.pairs.split(",") if x]
    impls = [x for x in args.impls.split(",") if x]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        sys.exit(f"unknown implementation(s) {unknown}; valid: {', '.join(IMPLS)}")
    for pair in pairs:
        trl_worker.prepare_pair(pair)
    if args.prepare_only:
        return
    if args.gamma > 0 and "minillm" in impls:
        print(
            "warning: at gamma > 0 TRL normalises the return by a discounted token count and ours by the plain "
            "count: the two objectives differ (bench/check_trl_objective.py)",
            flush=True,
        )
    for impl in (i for i in impls if i.startswith("trl-")):
        python = args.bench_python_116 if impl in TRL_116 else args.bench_python
        if not python.is_file():
            sys.exit(f"{python} is missing; set up the TRL venv as this script's docstring says")
    for impl in [i for i in impls if i in OURS]:
        why = ours_available(args.minillm_bin, OURS[impl])
        if why:
            print(f"skipping {impl}: {why}", flush=True)
            impls.remove(impl)

    from transformers import AutoTokenizer

    OUT.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    raw_path = OUT / f"results-{stamp}.json"
    meta = {
        "date": stamp,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    results: list[dict[str, Any]] = []
    for pair in pairs:
        tokenizer = AutoTokenizer.from_pretrained(trl_worker.pair_dirs(pair)[1])
        records, skipped = trl_worker.select_records(
            tokenizer, args.batch * (max(args.steps, args.steps_gkd) + 1), args.prompt_tokens
        )
        records_path = OUT / f"prompts-{pair}.jsonl"
        records_path.write_text("".join(json.dumps(r) + "\n" for r in records))
        print(
            f"{pair}: {len(records)} prompts ({skipped} longer than {args.prompt_tokens} skipped)", flush=True
        )
        for rep in range(args.reps):
            for impl in impls:
                log_path = OUT / f"{stamp}-{pair}-{impl}-rep{rep}.log"
                load_before = os.getloadavg()[0]
                try:
                    if impl in OURS:
                        r = run_ours(args, impl, pair, records_path, log_path)
                    else:
                        r = run_trl(args, impl, pair, records_path, log_path)
                except RuntimeError as e:
                    print(f"  {impl} rep {rep}: {e}", flush=True)
                    continue
                r.update(run=stamp, rep=rep, load_before=load_before, load_after=os.getloadavg()[0])
                results.append(r)
                raw_path.write_text(json.dumps({**meta, "results": results}, indent=1))
                print(
                    f"  {pair} {impl} rep {rep}: {_summed(r)} (load {load_before:.1f} -> "
                    f"{r['load_after']:.1f})",
                    flush=True,
                )
    print(f"\n{meta['command']}\n{meta['machine']}\n{stamp}; raw results: {raw_path}\n")
    for pair in pairs:
        print(table(pair, [r for r in results if r["pair"] == pair], args.baseline) + "\n")


if __name__ == "__main__":
    main()
