"""Sampling distributions and the draw (`minillm/rollout.py` docstring): temperature / top-k / top-p warping
(the reference and the fast twin), teacher mixing in probability space, HF's n-gram ban, greedy, and the
inverse-CDF draw with one uniform per row per step from the caller's generator(s)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

# Fast top-p looks for the nucleus among this many most probable tokens first and sorts the whole
# vocabulary only when the nucleus is larger (flat distributions); 20-40 ms a step saved at V = 49152.
TOP_P_CANDIDATES = 256


# The fast step's inverse CDF sums blocks of this many probabilities, then scans one block: a float64
# cumsum over the whole [B, V] row was 1.4 of the step's 3.4 ms at V = 49152 on one core.
CDF_BLOCK = 1024


# The sampler's randomness: one generator for the batch, or one per row
Generators = torch.Generator | list[torch.Generator]


@dataclass(frozen=True)
class Sampling:
    alpha: float
    temperature: float
    top_k: int
    top_p: float
    ngram: int
    eos: int
    pad: int


def uniforms(generator: Generators, B: int, device: torch.device) -> Tensor:
    """One float64 uniform per row, [B, 1]: B from the one generator, or one from each row's own."""
    if isinstance(generator, torch.Generator):
        return torch.rand(B, 1, generator=generator, dtype=torch.float64, device=device)
    if len(generator) != B:
        raise ValueError(f"{len(generator)} generators for {B} rows")
    return torch.cat([torch.rand(1, 1, generator=g, dtype=torch.float64, device=device) for g in generator])


def draw(probs: Tensor, generator: Generators) -> Tensor:
    """One token per row by inverse CDF: probs [B, V] (unnormalised, ≥ 0) → [B] long.

    One float64 uniform per row; float64 cumsum so tokens of probability ~1e-9 keep their share.
    Zero-probability tokens are never picked: the CDF is flat there and searchsorted(right) skips them.
    """
    B, V = probs.shape
    cdf = probs.double().cumsum(-1)  # [B, V]
    u = uniforms(generator, B, probs.device)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # [B, 1]
    return idx.squeeze(1).clamp_(max=V - 1)


def inverse_cdf(probs: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """`draw`'s token for the uniforms u [B, 1] float64, found in two levels: probs [B, V] (unnormalised,
    ≥ 0) → tokens [B, 1] long and the row totals [B, 1] float64.

    Block sums and their cumsum in float64 pick the block holding u·total; a float64 cumsum of that block
    alone picks the token. The same token as one cumsum over the row unless u·total falls within float64
    rounding of a boundary; zero-probability tokens are never picked.
    """
    B, V = probs.shape
    bs = min(CDF_BLOCK, V)
    full = V // bs * bs
    sums = probs[:, :full].reshape(B, -1, bs).sum(-1, dtype=torch.float64)  # [B, nb]
    if full < V:
        sums = torch.cat([sums, probs[:, full:].sum(-1, keepdim=True, dtype=torch.float64)], -1)
    cdf = sums.cumsum(-1)  # [B, nb]
    total = cdf[:, -1:]
    target = u * total  # [B, 1]
    blk = torch.searchsorted(cdf, target, right=True).clamp_(max=sums.shape[1] - 1)  # [B, 1]
    before = torch.nn.functional.pad(cdf, (1, 0)).gather(-1, blk)  # [B, 1] mass before the block
    # the block's tokens (indices past V, in a short last block, read as probability 0)
    idx = blk * bs + torch.arange(bs, device=probs.device)  # [B, bs]
    vals = probs.gather(-1, idx.clamp(max=V - 1)).double().masked_fill_(idx >= V, 0.0)
    inner = vals.cumsum(-1).add_(before)  # [B, bs]
    pos = torch.searchsorted(inner, target, right=True)
    # rounding can put target past the block's last cumsum: take its last token of nonzero probability
    last = torch.where(vals > 0, torch.arange(bs, device=probs.device), -1).amax(-1, keepdim=True)
    return blk * bs + torch.minimum(pos, last), total


def ngram_ban(seq: Tensor, start: Tensor, n: int, V: int) -> Tensor:
    """The tokens HF's NoRepeatNGramLogitsProcessor(n) bans next in each row, the row taken unpadded: x is
    banned when the row's last n − 1 tokens followed by x already occur in it (prompt included).

    seq:     [B, L] long, left-padded rows (prompt + response so far); row b is seq[b, start[b]:]
    start:   [B] long, first real slot of each row
    returns: [B, V] bool, True = banned; nothing in a row shorter than n
    """
    B, L = seq.shape
    k = n - 1
    # n-token windows, starts 0 .. L − n: window j's prefix is seq[j : j + k], its follower seq[j + k]
    W = L - k
    if W <= 0:
        return torch.zeros(B, V, dtype=torch.bool, device=seq.device)
    match = torch.arange(W, device=seq.device)[None, :] >= start[:, None]  # [B, W] windows inside the row
    for i in range(k):  # window j's i-th token equals the row's i-th of its last k
        match &= seq[:, i : i + W] == seq[:, L - k + i, None]
    banned = torch.zeros(B, V + 1, dtype=torch.bool, device=seq.device)
    banned.scatter_(1, torch.where(match, seq[:, k:], V), True)  # windows that do not match write column V
    return banned[:, :V]


def check_ban(banned: Tensor) -> None:
    if bool(banned.all(-1).any()):
        raise RuntimeError("no_repeat_ngram_size bans every token of a row; use a larger n")


def greedy(scores: Tensor) -> Tensor:
    """The point mass on each row's most probable token (the first on ties, as HF's greedy search), as
    log-probs [B, V]: 0 there, −inf elsewhere."""
    return torch.full_like(scores, -math.inf).scatter_(-1, scores.argmax(-1, keepdim=True), 0.0)


def log_mix(logp_s: Tensor, logq_s: Tensor, alpha: float) -> Tensor:
    """log(α·e^logp_s + (1 − α)·e^logq_s) per element, exact at α ∈ {0, 1} (no log(exp(x)) roundoff)."""
    if alpha == 0.0:
        return logq_s
    if alpha == 1.0:
        return logp_s
    return torch.logaddexp(logp_s + math.log(alpha), logq_s + math.log1p(-alpha))


def mix_probs(logp_s: Tensor | None, logq_s: Tensor, alpha: float) -> Tensor:
    """p̃ = α·p_s + (1 − α)·q_s: [B, V] fp32 from the two sampling log-distributions."""
    if alpha == 0.0:
        return logq_s.exp()
    if alpha == 1.0:
        return logp_s.exp()
    return logq_s.exp().mul_(1.0 - alpha).add_(logp_s.exp(), alpha=alpha)  # in place: 2 passes fewer


def warp_reference(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Sampling log-distribution of one model, the plain way: logits [B, V] → log-probs [B, V] (−inf = cut)."""
    if temperature == 0.0:
        return greedy(logits)
    scores = logits / temperature
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[:, -1:]  # [B, 1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p < 1.0:
        probs = scores.softmax(-1)
        sorted_probs, order = probs.sort(-1, descending=True)  # [B, V]
        mass_above = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly above each token
        keep_sorted = mass_above < top_p  # the top token always stays (mass above it is 0)
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        scores = scores.masked_fill(~keep, -math.inf)
    return scores.log_softmax(-1)


def ban_reference(rows: list[list[int]], n: int, V: int) -> Tensor:
    """HF's NoRepeatNGramLogitsProcessor(n) itself, applied to each unpadded row alone: [B, V] bool, True = banned."""
    proc = NoRepeatNGramLogitsProcessor(n)
    return torch.cat([proc(torch.tensor([row]), torch.zeros(1, V)).isinf() for row in rows])


def warp_fast(logits: Tensor, raw: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Same distribution as `warp_reference`, cheaper: logits [B, V] fp32, raw = logits.log_softmax(-1).

    No work at all at the defaults; top-p looks for the nucleus among the top `TOP_P_CANDIDATES`
    tokens and sorts the whole vocabulary only for the rows whose nucleus is larger.
    """
    if temperature == 1.0 and top_k == 0 and top_p == 1.0:
        return raw
    if temperature == 0.0:
        return greedy(logits)
    scores = logits if temperature == 1.0 else logits / temperature
    V = scores.shape[-1]
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, V)).values[:, -1:]  # [B, 1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p < 1.0:
        probs = scores.softmax(-1)  # [B, V]
        C = min(V, TOP_P_CANDIDATES)
        top_probs, order = probs.topk(C)  # [B, C], descending, as a full sort's first C
        cum = top_probs.cumsum(-1)
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, cum - top_probs < top_p)
        wide = cum[:, -1] < top_p  # [B] rows whose nucleus is larger than the candidates
        if bool(wide.any()):
            sorted_probs, order = probs[wide].sort(-1, descending=True)
            keep_sorted = sorted_probs.cumsum(-1) - sorted_probs < top_p
            keep[wide] = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        scores = scores.masked_fill(~keep, -math.inf)
    return scores.log_softmax(-1)


def mixed_draw(
    s_logits: Tensor, t_logits: Tensor | None, u: Tensor, s: Sampling, banned: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`fast_step`'s draw from the warped mixture: token [B, 1], log q, log p (0 without a teacher) and
    log p̃ of it, each [B]."""
    logq = s_logits.log_softmax(-1)  # [B, V] raw student
    logq_s = sampling_dist(s_logits, logq, s, banned)
    logp = logp_s = None
    if t_logits is not None:
        logp = t_logits.log_softmax(-1)
        logp_s = sampling_dist(t_logits, logp, s, banned)
    tok, _ = inverse_cdf(mix_probs(logp_s, logq_s, s.alpha), u)  # [B, 1]
    lq = logq.gather(-1, tok).squeeze(-1)
    lq_s = logq_s.gather(-1, tok).squeeze(-1)
    lp = logp.gather(-1, tok).squeeze(-1) if logp is not None else torch.zeros_like(lq)
    lmix = log_mix(logp_s.gather(-1, tok).squeeze(-1) if logp_s is not None else lq_s, lq_s, s.alpha)
    return tok, lq, lp, lmix


def sampling_dist(logits: Tensor, raw: Tensor, s: Sampling, banned: Tensor | None) -> Tensor:
    """One model's sampling log-distribution [B, V]: the n-gram ban first (as HF's generate applies its
    logits processors before its warpers), then `warp_fast`. raw = logits.log_softmax(-1)."""
    if banned is not None:
        logits = logits.masked_fill(banned, -math.inf)
        raw = logits.log_softmax(-1)
    return warp_fast(logits, raw, s.temperature, s.top_k, s.top_p)
