"""Pure metric functions: Rouge-L, Dist-n, gold-length buckets, ECE. No models, no I/O.

Scales follow the paper's tables: Rouge-L and Dist-4 are percentages (x100), ECE is a fraction in [0, 1].

Rouge-L is Google's `rouge_score` RougeScorer(['rougeL'], use_stemmer=True), F-measure, max over the references,
x100: exactly what the official code computes (LMOps `minillm/rouge_metric.py`: `rouge()` +
`metric_max_over_ground_truths`; its SQuAD-style `normalize_answer` only feeds the exact-match score, never
Rouge-L). rouge_score's own tokenizer lowercases, keeps only [a-z0-9] runs and Porter-stems words longer than 3
characters, so punctuation, case and non-Latin scripts never count (a response in Chinese scores 0). What differs
from the official pipeline is upstream of the metric: the official code decodes with `skip_special_tokens`, cuts
at the literal "<|endoftext|>" and strips; we cut at the first EOS *id* and strip (`generate.trim_at_eos`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from functools import lru_cache

from rouge_score import rouge_scorer

# Gold-response length buckets of the paper's length analysis, in tokens (inclusive bounds).
BUCKETS: tuple[tuple[str, int, float], ...] = (("[0,5]", 0, 5), ("[6,10]", 6, 10), ("[11,inf)", 11, math.inf))


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Rouge-L F-measure x100 of `prediction`, the max over `references`; an empty prediction scores 0.0."""
    if isinstance(references, str) or not references:
        raise ValueError("references must be a non-empty list of strings")
    scorer = _scorer()
    return 100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def distinct_n(texts: Sequence[str], n: int = 4) -> float:
    """Dist-n x100: distinct word n-grams / all word n-grams, pooled over `texts` (Li et al., 2016).

    Words are whitespace-separated and lowercased, so the figure does not depend on any model's tokenizer.
    Texts shorter than n words contribute no n-gram; with no n-gram at all the result is 0.0.
    """
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        words = text.lower().split()
        for i in range(len(words) - n + 1):
            seen.add(tuple(words[i : i + n]))
            total += 1
    return 100.0 * len(seen) / total if total else 0.0


def length_bucket(n_tokens: int) -> str:
    """The bucket name ("[0,5]", "[6,10]" or "[11,inf)") of a gold response of `n_tokens` tokens (EOS excluded)."""
    if n_tokens < 0:
        raise ValueError(f"a length cannot be negative, got {n_tokens}")
    for name, lo, hi in BUCKETS:
        if lo <= n_tokens <= hi:
            return name
    raise AssertionError("unreachable: the last bucket is open")  # pragma: no cover


def ece_bins(confidences: Sequence[float], correct: Sequence[bool], bins: int = 10) -> list[dict[str, float]]:
    """Per-bin count, mean confidence and accuracy over `bins` equal-width bins of [0, 1].

    Bin i holds confidences in (i/bins, (i+1)/bins]; bin 0 also holds 0.0. An empty bin has count 0 and
    confidence/accuracy NaN.
    """
    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences but {len(correct)} correctness flags")
    if bins <= 0:
        raise ValueError(f"bins must be > 0, got {bins}")
    uppers = [(i + 1) / bins for i in range(bins)]
    count = [0] * bins
    conf_sum = [0.0] * bins
    hit_sum = [0.0] * bins
    for c, ok in zip(confidences, correct, strict=True):
        if not 0.0 <= c <= 1.0:
            raise ValueError(f"confidences must lie in [0, 1], got {c}")
        b = min(bisect.bisect_left(uppers, c), bins - 1)  # first bin whose upper edge is >= c
        count[b] += 1
        conf_sum[b] += c
        hit_sum[b] += float(bool(ok))
    return [
        {
            "lo": i / bins,
            "hi": uppers[i],
            "count": count[i],
            "confidence": conf_sum[i] / count[i] if count[i] else math.nan,
            "accuracy": hit_sum[i] / count[i] if count[i] else math.nan,
        }
        for i in range(bins)
    ]


def ece(confidences: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float:
    """Expected calibration error: sum over bins of (bin count / N) x |accuracy - mean confidence| (Guo et al.,
    2017), with `bins` equal-width bins of [0, 1]. A fraction in [0, 1]; raises on no examples."""
    if not confidences:
        raise ValueError("ECE of no examples is undefined")
    n = len(confidences)
    return sum(
        b["count"] / n * abs(b["accuracy"] - b["confidence"])
        for b in ece_bins(confidences, correct, bins)
        if b["count"]
    )


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the std of a single value is 0.0."""
    if not values:
        raise ValueError("mean of no values")
    m = sum(values) / len(values)
    if len(values) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
