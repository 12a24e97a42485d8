"""Evaluation generation side by side: HF `generate` (what `minillm eval` sampled with before) against the
project's sampler (`minillm.rollout`, what it samples with now), same prompts, same seeds, same protocol.

    python bench/bench_eval.py              # teacher, 80 DollyEval prompts, <= 128 new tokens, seeds 10 20
    python bench/bench_eval.py --models teacher,student --prompts 20 --max-new-tokens 256
    python bench/bench_eval.py --runs hf-generate:16,minillm:64 --threads 1 --seeds 10,20,30

Each (round, path) runs `protocol.evaluate_model` over every seed, i.e. exactly what `minillm eval` runs minus
model loading and the gold LM loss, with the paper's decoding (sampling, temperature 1, top_p 1, top_k 0,
no_repeat_ngram_size 6); the HF path swaps `generate.sample` for `hf_sample` below, the previous
implementation. `--runs` lists (path, batch size) pairs, the batch size in (prompt, seed) rows: by default HF
at the protocol's former batch of 16, ours at 16 and at 64. The runs alternate within each of `--rounds`
rounds so that a change of machine load hits all of them; as the load of a shared machine still moves
wall-clock rates by 2x within minutes, the sampler's CPU seconds (this process, all its threads) are reported
too: tokens per CPU second is the steadier rate there. The paths draw different random streams, so their
answers differ; Rouge-L is compared as mean ± standard error over the (prompt, seed) answers.

Teacher: SmolLM2-135M-Instruct (30 layers). Student: its layers 0,5,10,15,20,25 (`models.derive_student`, not
fine-tuned, so it rarely emits EOS and always pays for the full `--max-new-tokens`). On a CPU shared with
other jobs, use --threads 1: with 2 torch threads on 2 oversubscribed cores every small matmul waits on a
descheduled thread (decoding ran ~7x slower here).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import Tensor
from transformers import GenerationConfig

from minillm import models
from minillm.config import EvalConfig
from minillm.evaluate import generate
from minillm.evaluate.protocol import GENERATIONS, evaluate_model


def hf_sample(
    model: Any,
    prompts: list[list[int]],
    *,
    seed: int | list[int],
    eos_id: int,
    pad_id: int,
    temperature: float,
    top_p: float,
    top_k: int,
    max_new_tokens: int,
    no_repeat_ngram_size: int = 0,
    num_return_sequences: int = 1,
) -> Tensor:
    """The previous `generate.sample`: HF `generate` (`generate.decode`, the global RNG seeded once for the
    batch, from its rows' seeds; the model's own generation_config set aside) with the protocol's decoding."""
    gen = GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        no_repeat_ngram_size=no_repeat_ngram_size,
        num_return_sequences=num_return_sequences,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,
    )
    batch = seed if isinstance(seed, int) else generate.stable_seed(*seed)
    return generate.decode(model, prompts, gen, seed=batch)


PATHS = {"hf-generate": hf_sample, "minillm": generate.sample}


def run_once(model: Any, tok: Any, cfg: EvalConfig, path: str) -> dict[str, Any]:
    """One protocol run (cfg: its seeds, one batch size) through `path`: timing (wall, and this process's CPU
    seconds inside the sampler) and the per-answer scores."""
    cpu = 0.0

    def timed(*args: Any, **kwargs: Any) -> Tensor:
        nonlocal cpu
        t0 = time.process_time()
        try:
            return PATHS[path](*args, **kwargs)
        finally:
            cpu += time.process_time() - t0

    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(generate, "sample", timed):
        res = evaluate_model(model, tok, cfg, tmp, progress=False)
        rows = [json.loads(line) for line in (Path(tmp) / GENERATIONS).read_text().splitlines()]
    scores, finished = [r["score"] for r in rows], [r["finished"] for r in rows]
    return res["timing"] | {"cpu_seconds": cpu, "scores": scores, "finished": finished}


def mean_se(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
    return m, math.sqrt(var / len(xs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="teacher", help="Comma-separated: teacher, student.")
    p.add_argument("--prompts", type=int, default=80, help="DollyEval prompts (the first N).")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--runs",
        default="hf-generate:16,minillm:16,minillm:64",
        help="Comma-separated path:batch_size pairs (batch size in (prompt, seed) rows).",
    )
    p.add_argument("--no-repeat-ngram-size", type=int, default=6)
    p.add_argument("--seeds", default="10,20", help="Comma-separated sampling seeds.")
    p.add_argument("--rounds", type=int, default=1, help="Times each run is repeated, runs alternating.")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default).")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = [(path, int(b)) for path, b in (r.split(":") for r in args.runs.split(","))]
    tok = models.load_tokenizer(models.EMBEDDED_ALIAS)
    teacher = models.load_model(models.EMBEDDED_ALIAS)
    zoo = {"teacher": teacher}
    if "student" in args.models:
        zoo["student"] = models.derive_student(
            teacher, models.spread_layers(teacher.config.num_hidden_layers, 6)
        )
    load = os.getloadavg()
    print(
        f"{args.prompts} DollyEval prompts, seeds {seeds}, runs {args.runs}, <= {args.max_new_tokens} new "
        f"tokens, no_repeat_ngram_size {args.no_repeat_ngram_size}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at start, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
    )
    print(
        "| model | path | batch | round | wall s | CPU s | new tokens / answer | tokens / s | tokens / CPU s "
        "| Rouge-L | EOS rate |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    totals: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for name in args.models.split(","):
        for k in range(args.rounds):
            for path, batch in runs:
                cfg = EvalConfig(
                    model=models.EMBEDDED_ALIAS,
                    sets=["dolly"],
                    seeds=seeds,
                    max_per_set=args.prompts,
                    max_new_tokens=args.max_new_tokens,
                    batch_size=batch,
                    no_repeat_ngram_size=args.no_repeat_ngram_size,
                    lm_loss=False,
                )
                r = run_once(zoo[name], tok, cfg, path)
                totals.setdefault((name, path, batch), []).append(r)
                n = r["generated_tokens"]
                print(
                    f"| {name} | {path} | {batch} | {k} | {r['generate_seconds']:.1f} | {r['cpu_seconds']:.1f} | "
                    f"{n / r['generated_prompts']:.1f} | {n / r['generate_seconds']:.1f} | {n / r['cpu_seconds']:.1f} | "
                    f"{sum(r['scores']) / len(r['scores']):.2f} | {sum(r['finished']) / len(r['finished']):.2f} |",
                    flush=True,
                )
    print(
        "\n| model | path | batch | wall s | CPU s | tokens / s | tokens / CPU s | Rouge-L (mean ± se) "
        "| vs the first run: tokens / s, / CPU s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        base = None
        for path, batch in runs:
            done = totals[(name, path, batch)]
            wall = sum(r["generate_seconds"] for r in done)
            cpu = sum(r["cpu_seconds"] for r in done)
            tokens = sum(r["generated_tokens"] for r in done)
            base = base or (tokens / wall, tokens / cpu)
            m, se = mean_se([s for r in done for s in r["scores"]])
            print(
                f"| {name} | {path} | {batch} | {wall:.1f} | {cpu:.1f} | {tokens / wall:.1f} | {tokens / cpu:.1f} | "
                f"{m:.2f} ± {se:.2f} | {tokens / wall / base[0]:.2f}x, {tokens / cpu / base[1]:.2f}x |"
            )
    load = os.getloadavg()
    print(
        f"\nload average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end, {time.strftime('%H:%M UTC', time.gmtime())}"
    )


if __name__ == "__main__":
    main()
