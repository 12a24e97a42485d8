"""The teacher's full distributions for MiniLLM's single-step term: recompute per inner epoch, or cache?

    .venv/bin/python bench/teacher_cache.py --pair embedded --reps 3 --threads 1

The single-step term needs log p(·|y<t) over the whole vocabulary at every sampled position, in every
inner (PPO) epoch. minillm caches the teacher's final hidden rows per collection ([N, H_t], 2.4 MB at
N = 1024, H_t = 576) and recomputes the head and its log-softmax per chunk in each epoch. The
alternatives cache the log-probs themselves, computed once in the teacher pass: fp32 (exact), bf16, or
the top-k teacher tokens plus one tail bucket. One real rollout (the pair's student, B prompts, T tokens
at alpha 0) gives the rows; per option the table reports

- epoch s: the teacher side of one inner epoch's single-step term, per chunk of `--chunk-size` rows:
  recompute = head matmul + in-place log-softmax; fp32 / bf16 = copying (upcasting) the cached chunk into
  the buffer the loss overwrites; top-k = rebuilding the tail-bucketed distribution;
- cache s: the extra work in the teacher pass to fill the cache (the matmul is done there anyway);
- cache MiB: what the cache holds for the collection;
- KL rel. err. and grad rel. err.: the single-step value Σ_n KL(q_n ‖ p_n) and its gradient w.r.t. the
  student logits with the cached p, against the exact fp32 ones (the bias the option brings). top-k uses
  KL over the k tokens plus the bucket {rest}, which by the log-sum inequality is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from minillm import models
from minillm.data.instructions import load_records
from minillm.data.tokenize import collate_prompts, encode_prompt
from minillm.objectives.chunked import head_logits_into
from minillm.objectives.divergences import log_softmax_inplace
from minillm.rollout import response_rows, sample_rollout

ROOT = Path(__file__).resolve().parents[1]


def kl_and_grad(s_logits: torch.Tensor, logp: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Σ_n KL(q_n ‖ p_n) and its gradient w.r.t. the student logits [N, V] (float64 maths)."""
    s = s_logits.double().requires_grad_()
    logq = s.log_softmax(-1)
    kl = (logq.exp() * (logq - logp.double())).sum()
    (grad,) = torch.autograd.grad(kl, s)
    return float(kl.detach()), grad


def topk_tail(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cache of one option: top-k log-probs [N, k], their ids [N, k] and the tail's log mass [N]."""
    vals, ids = logp.topk(k, dim=-1)
    tail = torch.log1p(-vals.exp().sum(-1).clamp(max=1 - 1e-7))
    return vals, ids, tail


def topk_kl_and_grad(s_logits: torch.Tensor, vals, ids, tail) -> tuple[float, torch.Tensor]:
    """KL over the k cached tokens plus one bucket for the rest, and its gradient w.r.t. the logits."""
    s = s_logits.double().requires_grad_()
    logq = s.log_softmax(-1)
    logq_k = logq.gather(-1, ids)  # [N, k]
    q_tail = (1 - logq_k.exp().sum(-1)).clamp(min=1e-30)  # [N]
    kl = (logq_k.exp() * (logq_k - vals.double())).sum() + (q_tail * (q_tail.log() - tail.double())).sum()
    (grad,) = torch.autograd.grad(kl, s)
    return float(kl.detach()), grad


def timed(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", default="embedded", choices=["tiny", "embedded"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--topk", default="32,256", help="Comma-separated k of the top-k + tail options.")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="Write the raw figures as JSON.")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pair = ROOT / "runs" / "bench" / "pairs" / args.pair
    if not pair.is_dir():
        raise SystemExit(f"{pair} missing: build it with `python bench/compare_trl.py --prepare-only`")
    tok = models.load_tokenizer(str(pair / "student"))
    student = models.load_model(str(pair / "student"), dtype=torch.float32).eval()
    teacher = models.load_model(str(pair / "teacher"), dtype=torch.float32).eval().requires_grad_(False)
    records = load_records("dolly_train", limit=args.batch)
    enc = collate_prompts([encode_prompt(r, tok, "alpaca") for r in records], tok.pad_token_id)
    with torch.no_grad():
        r = sample_rollout(
            student,
            teacher,
            enc["input_ids"],
            enc["attention_mask"],
            alpha=0.0,
            max_new_tokens=args.tokens,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            generator=torch.Generator().manual_seed(0),
            score=False,
        )
        t_rows = response_rows(teacher, r)  # [N, H_t]
        s_rows = response_rows(student, r)  # [N, H]
    t_head, s_head = models.output_head(teacher), models.output_head(student)
    N, V, C = t_rows.shape[0], t_head.weight.shape[0], args.chunk_size
    with torch.no_grad():
        s_logits = s_head.logits(s_rows)  # [N, V], for the bias figures only
        exact = t_head.logits(t_rows).log_softmax(-1)  # [N, V] fp32
    kl_exact, grad_exact = kl_and_grad(s_logits, exact)

    buf, work = torch.empty(C, V), torch.empty(C, V)

    def recompute() -> None:
        for i in range(0, N, C):
            x = buf[: len(t_rows[i : i + C])]
            head_logits_into(x, t_rows[i : i + C], t_head)
            log_softmax_inplace(x, work[: len(x)])

    def read(cache: torch.Tensor) -> None:
        for i in range(0, N, C):
            buf[: len(cache[i : i + C])].copy_(cache[i : i + C])

    def fill(dtype: torch.dtype) -> torch.Tensor:
        # what the teacher pass would add: the full log-softmax written out (its matmul is done anyway)
        cache = torch.empty(N, V, dtype=dtype)
        for i in range(0, N, C):
            x = buf[: len(t_rows[i : i + C])]
            head_logits_into(x, t_rows[i : i + C], t_head)
            log_softmax_inplace(x, work[: len(x)])
            cache[i : i + C] = x
        return cache

    base_fill = timed(recompute, args.reps)  # the teacher pass's own matmul + log-sum-exp, for subtraction
    rows = []
    rows.append(
        dict(
            option="recompute (default)",
            epoch=timed(recompute, args.reps),
            cache=0.0,
            mib=t_rows.numel() * 4 / 2**20,
            kl=0.0,
            grad=0.0,
        )
    )
    for name, dtype in (("cache fp32", torch.float32), ("cache bf16", torch.bfloat16)):
        cache = fill(dtype)
        fill_s = max(timed(lambda d=dtype: fill(d), args.reps) - base_fill, 0.0)
        kl, grad = kl_and_grad(s_logits, cache.float())
        rows.append(
            dict(
                option=name,
                epoch=timed(lambda c=cache: read(c), args.reps),
                cache=fill_s,
                mib=cache.numel() * cache.element_size() / 2**20,
                kl=abs(kl - kl_exact) / abs(kl_exact),
                grad=float((grad - grad_exact).norm() / grad_exact.norm()),
            )
        )
        del cache
    for k in (int(x) for x in args.topk.split(",")):
        vals, ids, tail = topk_tail(exact, k)

        def rebuild(vals=vals, ids=ids, tail=tail, k=k) -> None:
            for i in range(0, N, C):
                x = buf[: len(vals[i : i + C])]
                x.copy_((tail[i : i + C] - torch.log(torch.tensor(float(V - k)))).unsqueeze(-1).expand_as(x))
                x.scatter_(-1, ids[i : i + C], vals[i : i + C])

        kl, grad = topk_kl_and_grad(s_logits, vals, ids, tail)
        rows.append(
            dict(
                option=f"top-{k} + tail",
                epoch=timed(rebuild, args.reps),
                cache=timed(lambda k=k: topk_tail(exact, k), args.reps),
                mib=(vals.numel() * 4 + ids.numel() * 8 + tail.numel() * 4) / 2**20,
                kl=abs(kl - kl_exact) / abs(kl_exact),
                grad=float((grad - grad_exact).norm() / grad_exact.norm()),
            )
        )

    print(
        f"{platform.node() or 'host'}: {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    )
    print(
        f"pair {args.pair}: N = {N} sampled positions ({args.batch} x {args.tokens}), V = {V}, "
        f"H_t = {t_rows.shape[1]}, chunk {C}, median of {args.reps}; exact single-step Σ KL = {kl_exact:.2f}\n"
    )
    print("| option | epoch s | cache s | cache MiB | KL rel. err. | grad rel. err. |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['option']} | {row['epoch']:.3f} | {row['cache']:.3f} | {row['mib']:.1f} | "
            f"{row['kl']:.2e} | {row['grad']:.2e} |"
        )
    if args.out:
        args.out.write_text(
            json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, rows=rows), indent=1)
        )


if __name__ == "__main__":
    main()
