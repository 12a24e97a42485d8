"""How one MiniLLM training step scales with the prompt length P and the sampled-token count T.

    .venv/bin/python bench/scaling.py                                   # embedded pair, both sweeps
    .venv/bin/python bench/scaling.py --pair tiny --prompts 16,32 --tokens 8,16 --reps 1   # a quick check

Runs our implementation in-process, one step per batch, as the trainer's first step of a collection, split
into the trainer's phases (all called from `train_step`):
- sample:  `train.minillm.collect` (the fast sampler, student alone: teacher_mix_alpha 0) minus its teacher
           passes; it also keeps the student's logits and layer outputs when `sampling_cache_mib` allows
- teacher: the teacher passes `collect` times (one teacher forward: hidden rows of the response + log p,
           the full log-probs into the teacher cache when `teacher_cache_mib` allows)
- update:  `objectives.policy.token_rewards` + `advantages`, `train.minillm.minibatch_loss` (PG + the
           single-step KL, chunked; reading the sampling cache when kept), `accelerator.backward`, and
           `train.engine.clip_and_step` (clip + AdamW)
The objective, optimizer and dtype are `MiniLLMConfig`'s defaults (fp32 on CPU), except alpha 0 and
`--chunk-size`. Left out: the PT loss (pt_batch_size blocks of pt_block_length tokens, a cost that does not
depend on P or T), validation, logging and the store bookkeeping (row gathers). In training, sampling and the
teacher pass run once per collection and are shared by ppo_epochs x (num_rollouts / batch) updates; here
each timed step is one batch through all three phases, un-amortised.

Workload: B = --batch prompts of EXACTLY P tokens, no padding: row b joins consecutive Dolly training
prompts (Alpaca template, `minillm.data` loaders) and keeps the last P token ids, so every row ends on a
whole prompt's "### Response:" line. Responses are EXACTLY T tokens by default (`--eos off`): the sampler
gets EOS id -1, which no token has, so no row stops early; the tokens drawn are the model's own, and an EOS
drawn mid-row just does not end it. A token's compute does not depend on its value (top-p is off), so the
cost is that of T real tokens, and the sizes on each sweep's axis are exact. `--eos real` samples with the
tokenizer's EOS instead: rows may end early, the "rows ended" and "tokens" columns say by how much, and the
verdict flags the sweep (its sizes are then nominal upper bounds).

Each distinct (P, T) runs one untimed warm-up step, then `--reps` timed steps; repetitions are interleaved
over the configurations (c1, c2, ..., c1, c2, ...) so load from other processes hits all of them alike, and
the table gives medians. "peak dRSS" comes from one more, untimed step per configuration (so neither the
polling thread nor re-faulted pages touch the timings): glibc's malloc_trim hands freed memory back, then
the most the resident set grows above its value at the step's start (/proc/self/statm polled every
--rss-interval-ms). What the allocator still holds from earlier steps is not counted, so it is a lower
bound on the step's working set.

Linearity, per sweep and phase: cost ratios between neighbouring sizes next to the size ratios; the exponent
k of a least-squares fit cost ~ size^k (cost(2x)/cost(x) = 2^k); for three or more sizes, the ratio of the
last to the first marginal cost (delta cost / delta size; 1 = a straight line, > 1 bends up, e.g.
attention's P^2) and the fixed share a / cost(smallest) of the affine fit a + b*size. Verdict: linear for k
in 0.85-1.15, super-linear above, sub-linear below ("flat" below 0.15, "affine" when the marginal ratio is
within 0.8-1.25: fixed overhead plus a linear part); a marginal ratio outside 0.8-1.25 adds "bends up/down".
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate import Accelerator

from minillm import models
from minillm.config import MiniLLMConfig
from minillm.data.instructions import load_records
from minillm.data.tokenize import encode_prompt
from minillm.train import engine
from minillm.train.minillm import collect, minibatch_loss, rewards_and_advantages, teacher_cache
from minillm.train.sampling_cache import sampling_buffers

ROOT = Path(__file__).resolve().parents[1]
PAIRS_DIR = ROOT / "runs" / "bench" / "pairs"
PHASES = ("sample", "teacher", "update", "total")
LINEAR_K = (0.85, 1.15)  # exponent band called linear
STRAIGHT = (0.8, 1.25)  # last / first marginal-cost band called a straight line


# ------------------------------------------------------------------------------------------------
# the step: every call into the library is here, so a signature change is fixed in one place


def train_step(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    acc: Accelerator,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ids: torch.Tensor,
    tokens: int,
    eos: int,
    pad: int,
    cfg: MiniLLMConfig,
    g: torch.Generator,
) -> tuple[dict[str, float], dict[str, int]]:
    """One MiniLLM step on prompts ids [B, P] (no padding), as the trainer's first step of a collection:
    seconds per phase, and the response's shape."""
    cfg = replace(cfg, max_new_tokens=tokens, num_rollouts=len(ids))
    B = len(ids)
    t0 = time.perf_counter()
    store, t_store, sampled, teacher_s = collect(  # the trainer's caches, chosen as the trainer does
        student,
        teacher,
        ids.tolist(),
        pad,
        eos,
        cfg,
        acc,
        g,
        teacher_cache(teacher, B, cfg, ids.device),
        sampling_buffers(acc.unwrap_model(student), B, cfg, layers=True),
    )
    t2 = time.perf_counter()
    _, adv = rewards_and_advantages(store, cfg)
    n_tokens = float(store.mask.sum())
    with acc.autocast():
        loss, _ = minibatch_loss(student, teacher, store, t_store, adv, n_tokens, cfg, sampled)
    sampled = None  # freed before backward, as in the trainer
    acc.backward(loss)
    engine.clip_and_step(acc, student, optimizer, scheduler, cfg)
    t3 = time.perf_counter()
    times = {"sample": t2 - t0 - teacher_s, "teacher": teacher_s, "update": t3 - t2, "total": t3 - t0}
    shape = {
        "steps": store.response_ids.shape[1],
        "tokens": int(n_tokens),
        "ended": int((~store.truncated).sum()),
    }
    return times, shape


# ------------------------------------------------------------------------------------------------
# workload and measurement


def exact_prompts(tokenizer: Any, batch: int, length: int, template: str) -> torch.Tensor:
    """[B, P] long: row b joins the next consecutive Dolly training prompts until it has P tokens, then keeps
    the last P, so it ends on a whole prompt (its "### Response:" line) and needs no padding."""
    records = iter(load_records("dolly_train"))
    rows = []
    for _ in range(batch):
        ids: list[int] = []
        while len(ids) < length:
            ids += encode_prompt(next(records), tokenizer, template)
        rows.append(ids[-length:])
    return torch.tensor(rows)


def _release_free_memory() -> None:
    """Hand memory freed by earlier steps back to the OS (glibc `malloc_trim`), so the next step's RSS growth
    is measured from a low base; a no-op where glibc is missing."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Growth of the resident set above its value at entry, polled every `interval` seconds in a thread
    (Linux /proc; nan where it is missing or interval is 0)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval if interval > 0 and Path("/proc/self/statm").is_file() else 0.0
        self.growth_mib = math.nan

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes())

    def __enter__(self) -> PeakRss:
        if self.interval:
            _release_free_memory()
            self._base = self._peak = _rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.interval:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes())
            self.growth_mib = (self._peak - self._base) / 2**20


# ------------------------------------------------------------------------------------------------
# linearity


def fit(sizes: list[float], costs: list[float]) -> dict[str, Any]:
    """Cost ratios, the log-log exponent k, the last/first marginal-cost ratio (None when fewer than three
    sizes or the cost does not rise at every step) and the affine fit's fixed share."""
    n = len(sizes)
    lx, ly = [math.log(x) for x in sizes], [math.log(c) for c in costs]
    mx, my = sum(lx) / n, sum(ly) / n
    k = sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)
    out: dict[str, Any] = {
        "ratios": [(costs[i + 1] / costs[i], sizes[i + 1] / sizes[i]) for i in range(n - 1)],
        "k": k,
        "marginal": None,
        "fixed_share": None,
    }
    if n >= 3:
        marg = [(costs[i + 1] - costs[i]) / (sizes[i + 1] - sizes[i]) for i in range(n - 1)]
        out["marginal"] = marg[-1] / marg[0] if all(m > 0 for m in marg) else None
        xm, cm = sum(sizes) / n, sum(costs) / n
        slope = sum((x - xm) * (c - cm) for x, c in zip(sizes, costs, strict=True)) / sum(
            (x - xm) ** 2 for x in sizes
        )
        out["fixed_share"] = (cm - slope * xm) / costs[0]
    out["verdict"] = verdict(k, out["marginal"], n)
    return out


def verdict(k: float, marginal: float | None, n: int) -> str:
    """Growth from the exponent k (cost(2x)/cost(x) = 2^k), then the curve's shape from the marginal ratio."""
    if k > LINEAR_K[1]:
        growth = "super-linear"
    elif k >= LINEAR_K[0]:
        growth = "linear"
    elif k < 0.15:
        return "sub-linear (flat: fixed cost dominates)"
    else:
        growth = "sub-linear"
    if n < 3:
        return growth
    if marginal is None:
        return f"{growth} (not monotonic)"
    if marginal > STRAIGHT[1]:
        return f"{growth} (bends up: marginal cost x{marginal:.2f})"
    if marginal < STRAIGHT[0]:
        return f"{growth} (bends down: marginal cost x{marginal:.2f})"
    if growth == "sub-linear":
        return "sub-linear (affine: fixed cost + linear part)"
    return growth


# ------------------------------------------------------------------------------------------------
# report


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def sweep_tables(
    name: str,
    axis: str,
    configs: list[tuple[int, int]],
    results: dict[tuple[int, int], list[dict[str, Any]]],
    rss_mib: dict[tuple[int, int], float],
    batch: int,
) -> tuple[str, dict[str, Any]]:
    """The sweep's markdown table, its linearity table and verdict line; and the fits per phase."""
    out = [
        f"**{name}**",
        "",
        "| P | T | tokens | rows ended | sample s | teacher s | update s | total s | ms / token | peak dRSS MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for P, T in configs:
        runs = results[(P, T)]
        tok, tot = median_of(runs, "tokens"), median_of(runs, "total")
        ended = max(r["ended"] for r in runs)
        out.append(
            f"| {P} | {T} | {tok:.0f} | {ended}/{batch} | {median_of(runs, 'sample'):.3f} "
            f"| {median_of(runs, 'teacher'):.3f} | {median_of(runs, 'update'):.3f} | {tot:.3f} "
            f"| {1000 * tot / tok:.2f} | {rss_mib[(P, T)]:.0f} |"
        )
    sizes = [P if axis == "P" else T for P, T in configs]
    fits = {ph: fit(sizes, [median_of(results[c], ph) for c in configs]) for ph in PHASES}
    out += [
        "",
        f"| phase | cost ratio (size ratio) | exponent k | last/first marginal cost | fixed share at {axis}={sizes[0]} "
        "| verdict |",
        "|---|---|---:|---:|---:|---|",
    ]
    for ph, f in fits.items():
        ratios = ", ".join(f"{c:.2f} (x{s:.2f})" for c, s in f["ratios"])
        marg = "-" if f["marginal"] is None else f"{f['marginal']:.2f}"
        share = "-" if f["fixed_share"] is None else f"{100 * f['fixed_share']:.0f}%"
        out.append(f"| {ph} | {ratios} | {f['k']:.2f} | {marg} | {share} | {f['verdict']} |")
    early = any(r["ended"] for c in configs for r in results[c])
    caveat = " (caveat: some rows ended at EOS, so the T sizes are nominal)" if early and axis == "T" else ""
    parts = "; ".join(f"{ph} {fits[ph]['verdict']}, k {fits[ph]['k']:.2f}" for ph in PHASES[:3])
    c0, c1 = median_of(results[configs[0]], "total"), median_of(results[configs[-1]], "total")
    out += [
        "",
        f"Verdict, {name}: total x{c1 / c0:.2f} for x{sizes[-1] / sizes[0]:.2f} {axis}: "
        f"{fits['total']['verdict']}, k {fits['total']['k']:.2f}. Phases: {parts}{caveat}.",
    ]
    return "\n".join(out), fits


def ints(text: str) -> list[int]:
    values = sorted({int(x) for x in text.split(",") if x})
    if len(values) < 2 or values[0] < 1:
        raise argparse.ArgumentTypeError(f"need at least two distinct positive sizes, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--pair", choices=["tiny", "embedded"], default="embedded", help="model pair (compare_trl.py)"
    )
    p.add_argument("--batch", type=int, default=8, help="prompts per step B")
    p.add_argument("--prompts", type=ints, default=[64, 128, 256], help="prompt lengths P of the P sweep")
    p.add_argument("--tokens-fixed", type=int, default=128, help="sampled tokens T during the P sweep")
    p.add_argument("--tokens", type=ints, default=[64, 128, 256], help="sampled tokens T of the T sweep")
    p.add_argument("--prompt-fixed", type=int, default=128, help="prompt length P during the T sweep")
    p.add_argument("--reps", type=int, default=2, help="timed steps per configuration (median reported)")
    p.add_argument(
        "--chunk-size", type=int, default=None, help="tokens per head chunk (default: MiniLLMConfig's)"
    )
    p.add_argument(
        "--eos",
        choices=["off", "real"],
        default="off",
        help="off: exactly T tokens per row; real: may end early",
    )
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1 keeps timings stable)")
    p.add_argument("--rss-interval-ms", type=float, default=10.0, help="RSS poll period (0 = off)")
    p.add_argument("--out", type=Path, default=None, help="also write the raw numbers to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    teacher_dir, student_dir = PAIRS_DIR / args.pair / "teacher", PAIRS_DIR / args.pair / "student"
    if not (teacher_dir / "config.json").is_file() or not (student_dir / "config.json").is_file():
        sys.exit(f"pair {args.pair!r} missing under {PAIRS_DIR}; run bench/compare_trl.py --prepare-only")
    overrides = {"chunk_size": args.chunk_size} if args.chunk_size is not None else {}
    cfg = MiniLLMConfig(
        model=str(student_dir),
        teacher=str(teacher_dir),
        batch_size=args.batch,
        teacher_mix_alpha=0.0,
        **overrides,
    )
    tokenizer = models.load_tokenizer(cfg.model)
    dtype = models.torch_dtype(cfg.dtype, "cpu")
    student = models.load_model(cfg.model, dtype=dtype)
    teacher = models.load_model(cfg.teacher, dtype=dtype).requires_grad_(False).eval()
    models.check_same_vocab(student, teacher)
    acc = Accelerator(cpu=True, mixed_precision="no")
    optimizer = engine.make_optimizer(student, cfg)
    scheduler = engine.make_scheduler(optimizer, cfg, cfg.max_steps)
    student, optimizer = acc.prepare(student, optimizer)
    student.train()
    pad = tokenizer.pad_token_id
    eos = -1 if args.eos == "off" else tokenizer.eos_token_id

    p_sweep = [(P, args.tokens_fixed) for P in args.prompts]
    t_sweep = [(args.prompt_fixed, T) for T in args.tokens]
    configs = list(dict.fromkeys(p_sweep + t_sweep))  # the shared (P, T) runs once
    prompts = {P: exact_prompts(tokenizer, args.batch, P, cfg.template) for P, _ in configs}
    results: dict[tuple[int, int], list[dict[str, Any]]] = {c: [] for c in configs}
    load = os.getloadavg()[0]
    t_start = time.perf_counter()

    def one(c: tuple[int, int], rep: int) -> tuple[dict[str, float], dict[str, int]]:
        P, T = c
        g = engine.generator(cfg.seed, rep, device=acc.device)
        return train_step(student, teacher, acc, optimizer, scheduler, prompts[P], T, eos, pad, cfg, g)

    for c in configs:
        one(c, 0)  # warm-up
    for rep in range(args.reps):
        for c in configs:
            times, shape = one(c, rep + 1)
            results[c].append({**times, **shape})
            print(
                f"  rep {rep} P={c[0]} T={c[1]}: "
                + ", ".join(f"{ph} {times[ph]:.3f}s" for ph in PHASES)
                + f", {shape['tokens']} tokens",
                file=sys.stderr,
                flush=True,
            )
    rss_mib = {}
    for c in configs:  # untimed memory steps
        with PeakRss(args.rss_interval_ms / 1000) as rss:
            one(c, args.reps + 1)
        rss_mib[c] = rss.growth_mib

    n_s = sum(p.numel() for p in student.parameters()) / 1e6
    n_t = sum(p.numel() for p in teacher.parameters()) / 1e6
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    meta = {
        "date": stamp,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, Python "
        f"{platform.python_version()}",
        "setup": f"pair {args.pair} (student {n_s:.1f}M, teacher {n_t:.1f}M params, "
        f"V={student.config.vocab_size}), {dtype}, B={args.batch}, chunk_size {cfg.chunk_size}, eos {args.eos}, "
        f"{torch.get_num_threads()} threads, median of {args.reps} interleaved reps after 1 warm-up, "
        f"load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end, "
        f"{time.perf_counter() - t_start:.0f} s",
    }
    print("\n".join([meta["command"], meta["machine"], meta["versions"], stamp, meta["setup"], ""]))
    fits = {}
    for name, axis, sweep in (
        (f"prompt sweep (T = {args.tokens_fixed} sampled tokens)", "P", p_sweep),
        (f"sampled-token sweep (P = {args.prompt_fixed} prompt tokens)", "T", t_sweep),
    ):
        text, fits[axis] = sweep_tables(name, axis, sweep, results, rss_mib, args.batch)
        print(text + "\n")
    if args.out:
        raw = {
            **meta,
            "args": {k: str(v) for k, v in vars(args).items()},
            "results": [
                {"P": P, "T": T, "reps": runs, "peak_rss_growth_mib": rss_mib[(P, T)]}
                for (P, T), runs in results.items()
            ],
            "fits": fits,
        }
        args.out.write_text(json.dumps(raw, indent=1))
        print(f"raw results: {args.out}")


if __name__ == "__main__":
    main()
