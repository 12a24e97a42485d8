"""Time teacher-mixed sampling: HF `generate` of the student alone vs the eager and fast two-model loops.

    python bench/bench_rollout.py                       # tiny random llama pair
    python bench/bench_rollout.py --pair mid            # random llama pair shaped like the embedded models
    python bench/bench_rollout.py --pair embedded       # SmolLM2-135M-Instruct teacher + derived 6-layer student

Prompts are random ids, left-padded to ragged lengths in [P/2, P]. EOS is disabled (id −1 for our loops,
`eos_token_id=None` for HF) so every method decodes exactly `--new-tokens` steps and the timings compare
like with like. Prints a markdown table; seconds are the median of `--reps` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from minillm.rollout import sample_rollout


def random_llama(layers: int, hidden: int, heads: int, kv_heads: int, inter: int, vocab: int, seed: int):
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=inter,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def build_pair(pair: str) -> tuple[PreTrainedModel, PreTrainedModel]:
    """(student, teacher)."""
    if pair == "tiny":
        return random_llama(2, 64, 4, 2, 128, 512, 1), random_llama(4, 128, 4, 2, 256, 512, 2)
    if pair == "mid":  # SmolLM2-135M shape; the student keeps 6 of its 30 layers
        return (
            random_llama(6, 576, 9, 3, 1536, 49152, 1),
            random_llama(30, 576, 9, 3, 1536, 49152, 2),
        )
    if pair == "embedded":
        from minillm.models import EMBEDDED_ALIAS, derive_student, load_model, spread_layers

        teacher = load_model(EMBEDDED_ALIAS).eval()
        return derive_student(teacher, spread_layers(teacher.config.num_hidden_layers, 6)).eval(), teacher
    raise ValueError(f"unknown pair {pair!r}")


def prompts(batch: int, length: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts: ids [B, P] long, mask [B, P] bool."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    mask = torch.arange(length)[None, :] >= (length - lengths)[:, None]  # [B, P]
    return ids.masked_fill(~mask, 0), mask


def median_seconds(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median wall time of each fn. Reps are interleaved (a, b, c, a, b, c, ...) so that load from other
    processes on a shared machine hits every method alike; one untimed warm-up call each first."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", choices=["tiny", "mid", "embedded"], default="tiny", help="model pair")
    ap.add_argument("--embedded", action="store_true", help="shorthand for --pair embedded")
    ap.add_argument("--batch", type=int, default=8, help="prompts per batch B")
    ap.add_argument("--prompt-len", type=int, default=64, help="padded prompt length P")
    ap.add_argument("--new-tokens", type=int, default=64, help="sampled tokens per response")
    ap.add_argument("--alpha", type=float, default=0.2, help="teacher weight of the sampling mixture")
    ap.add_argument("--top-p", type=float, default=1.0, help="top-p for all methods (1 = off)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (median reported)")
    ap.add_argument("--skip-eager", action="store_true", help="skip the eager two-model loop")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pair = "embedded" if args.embedded else args.pair

    torch.manual_seed(0)  # HF generate draws from the global generator
    student, teacher = build_pair(pair)
    vocab = student.config.vocab_size
    ids, mask = prompts(args.batch, args.prompt_len, vocab, seed=0)
    N = args.new_tokens
    common = dict(alpha=args.alpha, max_new_tokens=N, eos_token_id=-1, pad_token_id=0, top_p=args.top_p)

    def ours(fast: bool) -> Callable[[], object]:
        return lambda: sample_rollout(
            student,
            teacher,
            ids,
            mask,
            generator=torch.Generator().manual_seed(0),
            fast=fast,
            score=False,  # sampling only: at α = 0 the trainer scores with its own teacher pass
            **common,
        )

    student.generation_config.eos_token_id = None  # decode all N steps, like our loops with eos −1
    gen_config = GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=args.top_p, max_new_tokens=N, pad_token_id=0
    )

    def hf() -> object:
        with torch.inference_mode():
            return student.generate(input_ids=ids, attention_mask=mask.long(), generation_config=gen_config)

    eager_name = f"eager two-model loop, α={args.alpha}"
    fns: dict[str, Callable[[], object]] = {"HF generate, student alone": hf}
    if not args.skip_eager:
        fns[eager_name] = ours(False)
    fns[f"fast path, α={args.alpha}"] = ours(True)
    load = os.getloadavg()[0]
    seconds = median_seconds(fns, args.reps)

    n_s = sum(p.numel() for p in student.parameters()) / 1e6
    n_t = sum(p.numel() for p in teacher.parameters()) / 1e6
    print(
        f"pair {pair} (student {n_s:.1f}M, teacher {n_t:.1f}M params, V={vocab}), B={args.batch}, "
        f"P={args.prompt_len}, {N} new tokens, top_p={args.top_p}, {torch.get_num_threads()} threads, "
        f"median of {args.reps} interleaved reps, load average {load:.1f} at start\n"
    )
    eager = seconds.get(eager_name)
    print("| method | seconds | ms / step | tokens / s | vs eager |")
    print("|---|---:|---:|---:|---:|")
    for name, sec in seconds.items():
        rel = f"{eager / sec:.2f}x" if eager else "–"
        print(f"| {name} | {sec:.3f} | {1000 * sec / N:.1f} | {args.batch * N / sec:.0f} | {rel} |")


if __name__ == "__main__":
    main()
