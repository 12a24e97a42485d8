"""The sampler's evaluation settings: HF's n-gram ban, greedy decoding, and the law of whole sampled sequences.

The ban is checked against HF's own `NoRepeatNGramLogitsProcessor`; greedy decoding against HF `generate`;
sampled sequences against exact sequence probabilities found by enumeration on a 5-token vocabulary.
Models are test_rollout's tiny random Llama / GPT-2 (sharpened heads, EOS id 0 ~7 % per step).
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from test_rollout import EOS, N, _gpt2, _llama, pair, prompts, run, warp64
from tolerances import assert_close_verbose
from torch import Tensor, nn
from transformers import GenerationConfig
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

from minillm.decode import fast as fast_path
from minillm.decode.draw import ngram_ban
from minillm.models import decoder_layers
from minillm.rollout import Rollout, sample_rollout


def hf_banned(row: list[int], n: int, vocab: int) -> Tensor:
    """[V] bool: what HF's processor bans after the unpadded sequence `row`."""
    return NoRepeatNGramLogitsProcessor(n)(torch.tensor([row]), torch.zeros(1, vocab))[0].isinf()


def has_repeated_ngram(row: list[int], n: int) -> bool:
    grams = [tuple(row[i : i + n]) for i in range(len(row) - n + 1)]
    return len(grams) != len(set(grams))


# ----------------------------------------------------------------------------------------------------
# The n-gram ban


@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_ngram_ban_equals_hf_processor_on_random_sequences(n: int) -> None:
    """Rows of 1..40 tokens over 4 ids (2 for n = 6, so that n-grams repeat), left-padded with random ids
    (not pad: the padding must not take part), against HF's processor on each unpadded row."""
    g = torch.Generator().manual_seed(n)
    vocab, B, L = 2 if n > 3 else 4, 64, 40
    seq = torch.randint(0, vocab, (B, L), generator=g)  # [B, L]; the slots before start are padding
    start = torch.randint(0, L, (B,), generator=g)
    got = ngram_ban(seq, start, n, vocab)
    expect = torch.stack([hf_banned(seq[b, start[b] :].tolist(), n, vocab) for b in range(B)])
    assert torch.equal(got, expect), (got ^ expect).nonzero()[:5]
    assert 0 < int(expect.sum()) < B * vocab, "fixture should ban some tokens, not all"


def test_ngram_ban_by_hand() -> None:
    # row 3 1 3 2 3, n = 2: the last token 3 was followed by 1 and by 2 -> both banned; n = 3: "2 3" never
    # occurred before -> nothing; n = 6: the row is shorter than 6 -> nothing. Row 2 of the batch is padded.
    seq = torch.tensor([[3, 1, 3, 2, 3], [9, 9, 1, 0, 1]])  # 9 = padding slots of row 1
    start = torch.tensor([0, 2])
    assert ngram_ban(seq, start, 2, 10).nonzero().tolist() == [[0, 1], [0, 2], [1, 0]]
    assert not bool(ngram_ban(seq, start, 3, 10).any())
    assert not bool(ngram_ban(seq, start, 6, 10).any())


def small_pair(family: str) -> tuple[nn.Module, nn.Module]:
    """(student, teacher) over 8 ids, EOS rarer than test_rollout's: rows run long and repeat n-grams, so
    the ban bites."""
    build = _llama if family == "llama" else _gpt2
    models = build(2, 32, 1, vocab=8), build(3, 48, 2, vocab=8)
    with torch.no_grad():
        for m in models:
            m.lm_head.bias[EOS] = -1.0
    return models


@pytest.mark.parametrize("n,lengths", [(2, (7, 4, 1, 6, 3)), (3, (5, 5, 2, 5, 2, 6))])
@pytest.mark.parametrize("kw", [dict(alpha=0.0), dict(alpha=0.2), dict(alpha=0.0, temperature=0.0)])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fast_equals_eager_with_the_ban(family: str, kw: dict, n: int, lengths: tuple[int, ...]) -> None:
    """The fast path's vectorised ban gives the eager path's tokens (which calls HF's processor row by row);
    no row repeats an n-gram of its prompt + response, and the ban changes what is sampled."""
    student, teacher = small_pair(family)
    ids, mask = prompts(lengths)
    ids = ids % 7 + 1  # ids 1..7; the padding slots too, which must not take part
    args = dict(max_new_tokens=N, eos_token_id=EOS, pad_token_id=EOS) | kw

    def sample(fast: bool, ngram: int) -> Rollout:
        g = torch.Generator().manual_seed(n)
        return sample_rollout(
            student, teacher, ids, mask, generator=g, fast=fast, no_repeat_ngram_size=ngram, **args
        )

    fast, eager = sample(True, n), sample(False, n)
    assert torch.equal(fast.response_ids, eager.response_ids) and torch.equal(fast.mask, eager.mask)
    for name in ("logq_old", "logp", "log_w"):
        assert_close_verbose(getattr(fast, name), getattr(eager, name), torch.float32)
    for b in range(len(fast)):
        row = fast.prompt_ids[b][fast.prompt_mask[b]].tolist() + fast.response_ids[b][fast.mask[b]].tolist()
        assert not has_repeated_ngram(row, n), (n, row)
    unbanned = sample(True, 0)
    assert not torch.equal(unbanned.response_ids, fast.response_ids), "the ban never bit: weak fixture"


@pytest.mark.parametrize("n", [0, 2, 3])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_equals_hf_greedy_search(family: str, n: int) -> None:
    """Temperature 0 on left-padded ragged prompts gives HF `generate(do_sample=False,
    no_repeat_ngram_size=n)` on each prompt alone, token for token up to its EOS."""
    student = pair(family)[0]
    ids, mask = prompts()
    r = sample_rollout(
        student,
        student,
        ids,
        mask,
        alpha=0.0,
        max_new_tokens=N,
        eos_token_id=EOS,
        pad_token_id=EOS,
        generator=torch.Generator().manual_seed(0),
        temperature=0.0,
        no_repeat_ngram_size=n,
        score=False,
    )
    gen = GenerationConfig(
        do_sample=False, max_new_tokens=N, no_repeat_ngram_size=n, eos_token_id=EOS, pad_token_id=EOS
    )
    for b in range(ids.shape[0]):
        prompt = ids[b][mask[b]][None]  # [1, P_b], no padding
        with torch.no_grad():
            hf = student.generate(input_ids=prompt, generation_config=gen)[0, prompt.shape[1] :]
        assert r.response_ids[b][r.mask[b]].tolist() == hf.tolist(), b


def test_every_token_banned_raises() -> None:
    # vocabulary 2, n = 1: each token may occur once in prompt + response; the prompt [1] leaves EOS only,
    # and EOS is banned after it, so a second step has nothing left (pad != EOS keeps the row alive)
    model = _llama(1, 16, 5, vocab=2)
    ids, mask = torch.tensor([[1]]), torch.ones(1, 1, dtype=torch.bool)
    kw = dict(alpha=0.0, max_new_tokens=3, eos_token_id=1, pad_token_id=0, no_repeat_ngram_size=1)
    for fast in (True, False):
        with pytest.raises(RuntimeError, match="bans every token"):
            sample_rollout(model, model, ids, mask, generator=torch.Generator(), fast=fast, score=False, **kw)


# ----------------------------------------------------------------------------------------------------
# The law of whole sequences: empirical frequencies against exact probabilities by enumeration

SMALL_V = 5
STEPS = 4


def sequence_law(model: nn.Module, prompt: list[int], n: int, warp: dict) -> dict[tuple[int, ...], float]:
    """Exact probability of every complete response (ended by EOS, or STEPS tokens long) when each step
    bans (plain-Python n-gram lookup, no shared code), warps (`warp64`, HF's formulation) and renormalises.
    Uncached float64 forwards, one depth of the tree per batch."""
    law: dict[tuple[int, ...], float] = {}
    frontier = {(): 1.0}
    for depth in range(STEPS):
        prefixes = list(frontier)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + list(p) for p in prefixes])).logits[:, -1]
        for prefix, row in zip(prefixes, logits.double(), strict=True):
            seq = prompt + list(prefix)
            if n:
                seen = {tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)}
                for x in range(SMALL_V):
                    if len(seq) >= n - 1 and tuple(seq[len(seq) - n + 1 :] + [x]) in seen:
                        row[x] = -math.inf
            probs = warp64(row[None], **warp)[0]
            for x in range(SMALL_V):
                p = frontier[prefix] * float(probs[x])
                if p == 0.0:
                    continue
                child = (*prefix, x)
                if x == EOS or depth == STEPS - 1:
                    law[child] = law.get(child, 0.0) + p
                else:
                    frontier[child] = p
            del frontier[prefix]
    return law


def chi_square(counts: Counter, law: dict[tuple[int, ...], float], total: int) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom; sequences expected < 5 times pooled into one bin."""
    big = [s for s, p in law.items() if p * total >= 5]
    stat, pooled_obs, pooled_exp = 0.0, total, total * 1.0
    for s in big:
        e = law[s] * total
        stat += (counts[s] - e) ** 2 / e
        pooled_obs -= counts[s]
        pooled_exp -= e
    bins = len(big)
    if pooled_exp >= 5:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        bins += 1
    return stat, bins - 1


def chi_square_limit(df: int, z: float = 3.719) -> float:
    """Upper 1e-4 quantile of χ²(df) (z = the normal's), by Wilson and Hilferty's approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


LAW_CASES = {
    "paper": (0, dict(temperature=1.0, top_k=0, top_p=1.0)),
    "ban-2": (2, dict(temperature=1.0, top_k=0, top_p=1.0)),
    "ban-3-warped": (3, dict(temperature=0.8, top_k=3, top_p=0.9)),
}


@pytest.mark.parametrize("case", LAW_CASES)
def test_whole_sequence_frequencies_match_the_exact_law(case: str) -> None:
    """20,000 responses (5 seeds x 4,000 rows of one prompt, ≤ 4 tokens, vocabulary 5): Pearson's χ²
    against the exact law stays under its 1e-4 upper quantile. The ban is tested against the banned,
    renormalised law; the same counts against the law without the ban land far above the limit, so the
    test can tell the two apart."""
    n, warp = LAW_CASES[case]
    model = _llama(1, 16, 21, vocab=SMALL_V)
    with torch.no_grad():
        model.lm_head.bias[EOS] = -1.0  # rows of all lengths, not mostly an immediate EOS
    prompt = [3, 1, 3, 2, 4, 2]  # repeats 3 and 2 so that bigram and trigram bans bite early
    rows, seeds = 4000, 5
    counts: Counter = Counter()
    for seed in range(seeds):
        r = sample_rollout(
            model,
            model,
            torch.tensor([prompt]).expand(rows, -1),
            torch.ones(rows, len(prompt), dtype=torch.bool),
            alpha=0.0,
            max_new_tokens=STEPS,
            eos_token_id=EOS,
            pad_token_id=EOS,
            generator=torch.Generator().manual_seed(seed),
            no_repeat_ngram_size=n,
            score=False,
            **warp,
        )
        counts.update(tuple(r.response_ids[b][r.mask[b]].tolist()) for b in range(rows))
    total = rows * seeds
    law = sequence_law(model, prompt, n, warp)
    assert math.isclose(sum(law.values()), 1.0, rel_tol=1e-12)
    assert set(counts) <= set(law), "a sequence of probability 0 was sampled"
    assert len(law) >= 20 and max(law.values()) < 0.5, f"degenerate fixture: {len(law)} sequences"
    stat, df = chi_square(counts, law, total)
    assert stat < chi_square_limit(df), f"chi2 {stat:.1f} >= {chi_square_limit(df):.1f} (df {df})"
    if n:
        unbanned = sequence_law(model, prompt, 0, warp)
        stat0, df0 = chi_square(counts, unbanned, total)
        assert stat0 > 10 * chi_square_limit(df0), f"the ban is invisible: chi2 {stat0:.1f} (df {df0})"


# ----------------------------------------------------------------------------------------------------
# Ended rows leave the batch


@pytest.mark.parametrize("family", ["llama", "llama-eager", "gpt2"])
def test_dropping_ended_rows_changes_nothing(family: str, monkeypatch) -> None:
    """The fast path drops rows that have ended from its caches and masks (`decode.fast.COMPACT_AT`); tokens and
    log-probs equal those of the path that keeps every row, with and without the ban and the teacher."""
    for kw in (dict(alpha=0.0, no_repeat_ngram_size=2), dict(alpha=0.2)):
        ended_early = 0
        for seed in range(3):
            dropped = run(family, seed, True, (7, 4, 1, 6, 3, 5, 2, 6), **kw)
            with monkeypatch.context() as m:
                m.setattr(fast_path, "COMPACT_AT", 0)
                kept = run(family, seed, True, (7, 4, 1, 6, 3, 5, 2, 6), **kw)
            assert torch.equal(dropped.response_ids, kept.response_ids) and torch.equal(
                dropped.mask, kept.mask
            )
            for name in ("logq_old", "logp", "log_w"):
                assert_close_verbose(getattr(dropped, name), getattr(kept, name), torch.float32)
            ended_early += int((dropped.mask.sum(-1) < dropped.mask.shape[1] - 1).sum())
        assert ended_early >= 3, "rows should end well before the batch does, so that some are dropped"


# ----------------------------------------------------------------------------------------------------
# Repeated prompts and one generator per row (evaluation's seeds)


def row_generators(B: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(1000 * seed + b) for b in range(B)]


@pytest.mark.parametrize("kw", [dict(alpha=0.0, no_repeat_ngram_size=2), dict(alpha=0.2)])
@pytest.mark.parametrize("family", ["llama", "llama-eager", "gpt2"])
def test_repeated_prompts_prefill_once_and_sample_as_before(family: str, kw: dict, monkeypatch) -> None:
    """Rows holding the same prompt share one prefill of it (the forward runs 3 of 7 rows): tokens, log-probs
    and the per-step outputs (`layers_out` for the student alone, `teacher_rows_out` with a teacher) equal
    those of a prefill that runs every row."""
    student, teacher = pair(family)
    ids, mask = prompts((5, 2, 6))
    order = torch.tensor([0, 1, 0, 2, 1, 0, 2])  # prompt 0 three times, 1 and 2 twice, interleaved
    ids, mask = ids[order], mask[order]
    B, P = ids.shape

    def sample() -> tuple[Rollout, list[Tensor], list[int]]:
        if kw["alpha"] == 0.0:
            H = student.config.hidden_size
            outs = [torch.full((B, P + N, H), float("nan")) for _ in decoder_layers(student)]
            extra = dict(layers_out=outs)
        else:
            outs = [torch.full((B, N, teacher.config.hidden_size), float("nan"))]
            extra = dict(teacher_rows_out=outs[0])
        ran: list[int] = []  # rows of each multi-token (prefill) forward of the student
        hook = student.register_forward_pre_hook(
            lambda m, a, k: ran.append(k["input_ids"].shape[0]) if k["input_ids"].shape[1] > 1 else None,
            with_kwargs=True,
        )
        try:
            r = sample_rollout(
                student, teacher, ids, mask, generator=row_generators(B), max_new_tokens=N,
                eos_token_id=EOS, pad_token_id=EOS, **kw, **extra,
            )  # fmt: skip
        finally:
            hook.remove()
        return r, outs, ran

    shared, shared_outs, shared_ran = sample()
    with monkeypatch.context() as m:
        m.setattr(fast_path, "prompt_holders", lambda ids, mask: {b: [b] for b in range(len(ids))})
        each, each_outs, each_ran = sample()
    assert sum(shared_ran) == 3 and sum(each_ran) == B
    assert torch.equal(shared.response_ids, each.response_ids) and torch.equal(shared.mask, each.mask)
    for name in ("logq_old", "logp", "log_w"):
        assert_close_verbose(getattr(shared, name), getattr(each, name), torch.float32)
    if (
        kw["alpha"] == 0.0
    ):  # every column fed to the student: real prompt tokens, all but the last response token
        fed = shared.full_inputs()[1].clone()
        fed[:, -1] = False
        where = lambda x: x[:, : fed.shape[1]][fed]  # noqa: E731
    else:  # the teacher's state behind each step's valid token
        where = lambda x: x[:, : shared.mask.shape[1]][shared.mask]  # noqa: E731
    for a, b in zip(shared_outs, each_outs, strict=True):
        assert_close_verbose(where(a), where(b), torch.float32)
    assert len({tuple(shared.response_ids[b].tolist()) for b in (0, 2, 5)}) > 1, "one stream for all rows"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_row_generators_make_each_row_independent_of_its_batch(family: str) -> None:
    """With one generator per row, a row samples what it samples alone (ended rows leave the batch on the
    way: only the rows decoded draw)."""
    student, _ = pair(family)
    lengths = (7, 4, 1, 6, 3, 5, 2, 6)
    ids, mask = prompts(lengths)
    kw = dict(alpha=0.0, max_new_tokens=N, eos_token_id=EOS, pad_token_id=EOS, no_repeat_ngram_size=2)
    gens = row_generators(len(ids), seed=1)
    batch = sample_rollout(student, None, ids, mask, generator=gens, score=False, **kw)
    assert int((batch.mask.sum(-1) < batch.mask.shape[1] - 1).sum()) >= 2, "no row ended early: weak fixture"
    for b, n in enumerate(lengths):
        alone = sample_rollout(
            student, None, ids[b : b + 1, -n:], mask[b : b + 1, -n:], generator=row_generators(len(ids), 1)[b : b + 1],
            score=False, **kw,
        )  # fmt: skip
        got = batch.response_ids[b][batch.mask[b]].tolist()
        assert got == alone.response_ids[0][alone.mask[0]].tolist(), b
