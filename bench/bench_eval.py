"""Time the evaluation protocol's generation: seconds per 100 prompts for the embedded teacher and a student.

    python bench/bench_eval.py                                  # 20 DollyEval prompts, 256 new tokens
    python bench/bench_eval.py --prompts 100 --max-new-tokens 64 --no-repeat-ngram-size 0
    python bench/bench_eval.py --threads 1                      # when other jobs share the cores

On a CPU shared with other jobs, use --threads 1: with 2 torch threads on 2 oversubscribed cores every small
matmul waits on a descheduled thread, and decoding ran ~7x slower here (225 s vs 30 s for 8 prompts x 32 tokens).

Teacher: SmolLM2-135M-Instruct (30 layers). Student: its layers 0,5,10,15,20,25 (`models.derive_student`,
not fine-tuned, so it rarely emits EOS and always pays for the full `--max-new-tokens`). One seed, the paper's
decoding (sampling, temperature 1, top_p 1, top_k 0, no_repeat_ngram_size 6) through `protocol.evaluate_model`,
i.e. exactly what `minillm eval` runs, minus model loading and the gold LM loss. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from minillm import models
from minillm.config import EvalConfig
from minillm.evaluate.protocol import evaluate_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=20, help="DollyEval prompts (the first N).")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-repeat-ngram-size", type=int, default=6)
    p.add_argument("--seed", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default).")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = models.load_model(models.EMBEDDED_ALIAS)
    student = models.derive_student(teacher, models.spread_layers(teacher.config.num_hidden_layers, 6))
    tok = models.load_tokenizer(models.EMBEDDED_ALIAS)
    cfg = EvalConfig(
        model=models.EMBEDDED_ALIAS,
        sets=["dolly"],
        seeds=[args.seed],
        max_per_set=args.prompts,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        lm_loss=False,
    )
    print(
        f"{args.prompts} DollyEval prompts, seed {args.seed}, batch {args.batch_size}, <= {args.max_new_tokens} new "
        f"tokens, no_repeat_ngram_size {args.no_repeat_ngram_size}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}\n"
    )
    print("| model | layers | s / 100 prompts | new tokens / prompt | tokens / s | Rouge-L | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, model in (("teacher", teacher), ("student (6 layers)", student)):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            res = evaluate_model(model, tok, cfg, tmp, progress=False)
            wall = time.perf_counter() - t0
        t, s = res["timing"], res["sets"]["dolly"]
        print(
            f"| {name} | {model.config.num_hidden_layers} | {t['seconds_per_100_prompts']:.0f} | "
            f"{t['generated_tokens'] / t['generated_prompts']:.0f} | {t['generated_tokens'] / t['generate_seconds']:.1f} | "
            f"{s['rougeL']['mean']:.2f} | {wall:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
