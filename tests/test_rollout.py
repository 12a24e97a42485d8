"""Teacher-mixed sampling: an independent uncached float64 loop, fast == eager, masks, the distribution.

Models are tiny random Llama / GPT-2 pairs (student and teacher of different sizes, one vocabulary). Their
LM head is rebuilt with a bias so that EOS (id 0) comes out ~7 % of the time per step (some rows end,
others are truncated) and scaled so the next-token distributions are far from uniform.
"""

from __future__ import annotations

import copy
import functools
import math
from types import SimpleNamespace

import pytest
import torch
from tolerances import assert_close_verbose
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from minillm.decode import fast as fast_path
from minillm.decode.draw import inverse_cdf, warp_fast, warp_reference
from minillm.decode.packing import packed_linears
from minillm.models import decoder_layers
from minillm.rollout import (
    Rollout,
    sample_rollout,
    score_teacher,
)

V = 96
EOS = 0
N = 12  # max_new_tokens


def _sharpen(model: nn.Module, seed: int, scale: float = 10.0, eos_bias: float = 2.5) -> nn.Module:
    """Replace the LM head by a biased copy: logits std ~1 instead of ~0.1, EOS pushed up by `eos_bias`."""
    old = model.get_output_embeddings()
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight * scale)
        head.bias.zero_()
        head.bias[EOS] = eos_bias
    model.lm_head = head  # also unties GPT-2's head from its input embedding: fine for a test model
    return model.eval()


def _llama(layers: int, hidden: int, seed: int, vocab: int = V, attn: str = "sdpa") -> nn.Module:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=EOS,
        attn_implementation=attn,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # HF initialises from the global generator; fork keeps it untouched
        return _sharpen(LlamaForCausalLM(config), seed)


def _gpt2(layers: int, hidden: int, seed: int, vocab: int = V, dropout: float = 0.0) -> nn.Module:
    config = GPT2Config(
        vocab_size=vocab,
        n_embd=hidden,
        n_layer=layers,
        n_head=4,
        n_positions=128,
        bos_token_id=1,
        eos_token_id=EOS,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _sharpen(GPT2LMHeadModel(config), seed)


@functools.cache
def pair(family: str) -> tuple[nn.Module, nn.Module]:
    """(student, teacher): teacher bigger than the student, same vocabulary."""
    if family == "llama":
        return _llama(2, 32, 1), _llama(3, 48, 2)
    if family == "llama-eager":  # eager attention takes the fast path's additive 4D mask
        return _llama(2, 32, 1, attn="eager"), _llama(3, 48, 2, attn="eager")
    if family == "gpt2":
        return _gpt2(2, 32, 3), _gpt2(3, 48, 4)
    raise ValueError(family)


def prompts(lengths: tuple[int, ...] = (7, 4, 1, 6, 3), seed: int = 0) -> tuple[Tensor, Tensor]:
    """Ragged left-padded prompts: ids [B, P] (pad id = EOS, so pads look like EOS), mask [B, P] bool."""
    P = max(lengths)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (len(lengths), P), generator=g)
    mask = torch.arange(P)[None, :] >= P - torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, EOS), mask


def run(
    family: str, seed: int = 0, fast: bool = True, lengths: tuple[int, ...] = (7, 4, 1, 6, 3), **kw: object
) -> Rollout:
    student, teacher = pair(family)
    ids, mask = prompts(lengths)
    args = dict(alpha=0.2, max_new_tokens=N, eos_token_id=EOS, pad_token_id=EOS) | kw
    return sample_rollout(
        student, teacher, ids, mask, generator=torch.Generator().manual_seed(seed), fast=fast, **args
    )


# ----------------------------------------------------------------------------------------------------
# Independent reference: no cache, full forward per step, float64, explicit probabilities


def softmax64(logits: Tensor) -> Tensor:
    x = logits.double()
    e = (x - x.max(-1, keepdim=True).values).exp()
    return e / e.sum(-1, keepdim=True)


def warp64(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Sampling probabilities in float64, HF's formulation: top-k threshold; top-p removes the tokens
    whose ascending cumulative probability is ≤ 1 − top_p."""
    x = logits.double() / temperature
    if top_k > 0:
        kth = x.sort(-1, descending=True).values[:, top_k - 1 : top_k]
        x = torch.where(x < kth, -math.inf, x)
    probs = softmax64(x)
    if top_p < 1.0:
        asc, order = probs.sort(-1)
        remove_sorted = asc.cumsum(-1) <= 1.0 - top_p
        remove_sorted[:, -1] = False
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        probs = softmax64(torch.where(remove, -math.inf, x))
    return probs


def reference_rollout(
    family: str,
    alpha: float,
    seed: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    pad: int = EOS,
) -> dict[str, Tensor]:
    student, teacher = pair(family)
    ids, mask = prompts()
    g = torch.Generator().manual_seed(seed)
    B = ids.shape[0]
    seq, attn = ids.clone(), mask.long()
    finished = torch.zeros(B, dtype=torch.bool)
    out: dict[str, list[Tensor]] = {k: [] for k in ("ids", "mask", "logq", "logp", "log_w")}
    with torch.no_grad():
        for _ in range(N):
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            s_logits = student(input_ids=seq, attention_mask=attn, position_ids=pos).logits[:, -1]
            t_logits = teacher(input_ids=seq, attention_mask=attn, position_ids=pos).logits[:, -1]
            q_s, p_s = (
                warp64(s_logits, temperature, top_k, top_p),
                warp64(t_logits, temperature, top_k, top_p),
            )
            mix = alpha * p_s + (1.0 - alpha) * q_s  # [B, V]
            u = torch.rand(B, 1, generator=g, dtype=torch.float64)
            cdf = mix.cumsum(-1)
            tok = (cdf <= u * cdf[:, -1:]).sum(-1).clamp(max=V - 1)  # first index with cdf > u·total
            rows = torch.arange(B)
            q, p = softmax64(s_logits)[rows, tok], softmax64(t_logits)[rows, tok]
            live = ~finished
            out["ids"].append(torch.where(live, tok, pad))
            out["mask"].append(live)
            out["logq"].append(torch.where(live, q.log(), 0.0))
            out["logp"].append(torch.where(live, p.log(), 0.0))
            out["log_w"].append(torch.where(live, q.log() - mix[rows, tok].log(), 0.0))
            finished = finished | (tok == EOS)
            seq = torch.cat([seq, out["ids"][-1][:, None]], 1)
            attn = torch.cat([attn, torch.ones(B, 1, dtype=attn.dtype)], 1)
            if bool(finished.all()):
                break
    res = {k: torch.stack(v, 1) for k, v in out.items()}
    res["truncated"] = ~finished
    return res


SETTINGS = {
    "student-only": dict(alpha=0.0),
    "mixed": dict(alpha=0.2),
    "teacher-only": dict(alpha=1.0),
    "warped": dict(alpha=0.5, temperature=0.8, top_k=20, top_p=0.9),
}


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("fast", [False, True], ids=["eager", "fast"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_matches_uncached_float64_reference(family: str, fast: bool, setting: str) -> None:
    """α = 0 is student-only sampling, α = 1 teacher-only, and cached decoding (either path) equals an
    uncached full-recompute loop: same tokens under the same generator draws, same log-probs."""
    kw = SETTINGS[setting]
    got = run(family, fast=fast, **kw)
    ref = reference_rollout(family, **kw)
    assert torch.equal(got.response_ids, ref["ids"]), f"{got.response_ids}\n!=\n{ref['ids']}"
    assert torch.equal(got.mask, ref["mask"]) and torch.equal(got.truncated, ref["truncated"])
    assert bool(got.truncated.any()) and not bool(got.truncated.all()), "fixture should mix ended/truncated"
    # fp32 model maths vs float64 probabilities of the same fp32 logits: TOL[float32].
    for name, field in (("logq", got.logq_old), ("logp", got.logp), ("log_w", got.log_w)):
        assert field.dtype == torch.float32, name
        assert_close_verbose(field, ref[name], torch.float32)
    if kw["alpha"] == 0.0:
        assert bool((got.log_w == 0).all()), "no mixing, no warping: w = 1 exactly"


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "fast"])
def test_same_seed_same_tokens_other_seed_other_tokens(fast: bool) -> None:
    a, b, c = run("llama", 7, fast), run("llama", 7, fast), run("llama", 8, fast)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logq_old, b.logq_old)
    differ = (a.response_ids != c.response_ids) & a.mask & c.mask
    assert int(differ.sum()) >= 5, f"seeds 7 and 8 agree on all but {int(differ.sum())} tokens"


@pytest.mark.parametrize("setting", ["student-only", "mixed", "warped"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "llama-eager"])
def test_fast_equals_eager(family: str, setting: str) -> None:
    """Static cache prefilled by length groups + 4D decode mask + preallocated buffers + cheap top-p give
    the eager path's tokens exactly, its log-probs to fp32 rounding, on ragged left-padded prompts (the
    second set of lengths puts several rows in one prefill group)."""
    kw = SETTINGS[setting]
    for seed, lengths in ((0, (7, 4, 1, 6, 3)), (1, (5, 5, 2, 5, 2, 6))):
        eager, fast = run(family, seed, False, lengths, **kw), run(family, seed, True, lengths, **kw)
        assert torch.equal(fast.response_ids, eager.response_ids)
        assert torch.equal(fast.mask, eager.mask) and torch.equal(fast.truncated, eager.truncated)
        for name in ("logq_old", "logp", "log_w"):
            assert_close_verbose(getattr(fast, name), getattr(eager, name), torch.float32)


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "fast"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sampled_logp_equals_score_teacher_and_log_w_float64(family: str, fast: bool) -> None:
    r = run(family, 3, fast, alpha=0.3)
    assert_close_verbose(r.logp, score_teacher(pair(family)[1], r)[1], torch.float32)
    q, p = r.logq_old.double(), r.logp.double()
    expected = (q - (0.3 * p.exp() + 0.7 * q.exp()).log()).masked_fill(~r.mask, 0.0)
    assert_close_verbose(r.log_w, expected, torch.float32)
    assert bool((r.logq_old[~r.mask] == 0).all() and (r.logp[~r.mask] == 0).all())


# ----------------------------------------------------------------------------------------------------
# Masks, EOS, pad, truncation: a scripted model whose next token is a function of its position


class ScriptedLM(nn.Module):
    """Fake causal LM: after position `pos` the next token is (7·pos + 3) mod (V − 1) + 1 (never EOS),
    except EOS after position stop[b], each with probability ~1 − 1e-11. Ignores its cache."""

    _can_compile_fullgraph = False  # the fast path falls back to DynamicCache for it

    def __init__(self, stop: Tensor) -> None:
        super().__init__()
        self.config = LlamaConfig(vocab_size=V, hidden_size=8, num_hidden_layers=1, num_attention_heads=1)
        self.head = nn.Linear(8, V)
        self.stop = stop

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False, **kw):
        tok = (7 * position_ids + 3) % (V - 1) + 1  # [B, L]
        tok = torch.where(position_ids == self.stop[:, None], EOS, tok)
        logits = torch.zeros(*tok.shape, V).scatter(-1, tok[..., None], 30.0)
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "fast"])
@pytest.mark.parametrize("pad", [EOS, 5], ids=["pad=eos", "pad!=eos"])
def test_masks_keep_first_eos_and_flag_truncation(pad: int, fast: bool, monkeypatch) -> None:
    monkeypatch.setattr(fast_path, "COMPACT_AT", 0)  # ScriptedLM's script is per batch row: keep every row
    lengths = (7, 4, 1, 6, 3)
    ids, mask = prompts(lengths)
    L = torch.tensor(lengths)
    eos_step = torch.tensor([2, 0, 7, 1000, 4])  # response index of EOS; 1000 = never; N = 8
    model = ScriptedLM(stop=L - 1 + eos_step)  # response token t is predicted at position L − 1 + t
    r = sample_rollout(
        model,
        model,
        ids,
        mask,
        alpha=0.2,
        max_new_tokens=8,
        eos_token_id=EOS,
        pad_token_id=pad,
        generator=torch.Generator().manual_seed(0),
        fast=fast,
    )
    t = torch.arange(8)[None, :]
    expect_mask = t <= eos_step[:, None]  # True up to and including the first EOS
    expect_ids = torch.where(t == eos_step[:, None], EOS, (7 * (L[:, None] - 1 + t) + 3) % (V - 1) + 1)
    expect_ids = torch.where(expect_mask, expect_ids, pad)
    assert torch.equal(r.mask, expect_mask), r.mask
    assert torch.equal(r.response_ids, expect_ids), r.response_ids  # also: positions follow the mask
    assert r.truncated.tolist() == [False, False, False, True, False]
    assert_close_verbose(r.logq_old, torch.zeros(5, 8), torch.float32)  # each token had probability ~1


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "fast"])
def test_stops_when_every_row_has_ended(fast: bool, monkeypatch) -> None:
    monkeypatch.setattr(fast_path, "COMPACT_AT", 0)  # ScriptedLM's script is per batch row: keep every row
    ids, mask = prompts((3, 2, 1))
    model = ScriptedLM(stop=torch.tensor([2, 1, 0]) + torch.tensor([1, 0, 2]))  # EOS at steps 1, 0, 2
    r = sample_rollout(
        model,
        None,  # the student alone: the scripted model has no decoder for a scoring forward
        ids,
        mask,
        alpha=0.0,
        max_new_tokens=8,
        eos_token_id=EOS,
        pad_token_id=EOS,
        generator=torch.Generator().manual_seed(0),
        fast=fast,
        score=False,
    )
    assert r.response_ids.shape == (3, 3)
    assert r.mask.tolist() == [[True, True, False], [True, False, False], [True, True, True]]
    assert not bool(r.truncated.any())


# ----------------------------------------------------------------------------------------------------
# The sampled distribution, warping, helpers, errors


@pytest.mark.parametrize(
    "kw",
    [dict(alpha=0.2), dict(alpha=0.5, temperature=0.7, top_k=5, top_p=0.8)],
    ids=["paper-defaults", "warped"],
)
def test_first_token_frequencies_match_the_mixture(kw: dict) -> None:
    """Over n = 4000 draws of the first token (vocabulary 8), every frequency is within 4.5 standard
    errors of α·p_s + (1 − α)·q_s, and cut tokens never come out."""
    student, teacher = _llama(1, 16, 11, vocab=8), _llama(2, 16, 12, vocab=8)
    n = 4000
    ids = torch.tensor([[5, 3, 7, 2]]).expand(n, 4)
    mask = torch.ones(n, 4, dtype=torch.bool)
    r = sample_rollout(
        student,
        teacher,
        ids,
        mask,
        max_new_tokens=1,
        eos_token_id=EOS,
        pad_token_id=EOS,
        generator=torch.Generator().manual_seed(0),
        **kw,
    )
    warp = dict(temperature=kw.get("temperature", 1.0), top_k=kw.get("top_k", 0), top_p=kw.get("top_p", 1.0))
    with torch.no_grad():
        q = warp64(student(input_ids=ids[:1]).logits[:, -1], **warp)[0]
        p = warp64(teacher(input_ids=ids[:1]).logits[:, -1], **warp)[0]
    pi = kw["alpha"] * p + (1 - kw["alpha"]) * q  # [8]
    freq = torch.bincount(r.response_ids[:, 0], minlength=8).double() / n
    se = (pi * (1 - pi) / n).sqrt()
    assert bool((pi > 0.01).sum() >= 3), f"degenerate fixture {pi}"
    assert bool(((freq - pi).abs() <= 4.5 * se).all()), f"freq {freq}\nexpected {pi}"
    assert bool((freq[pi == 0] == 0).all())


@pytest.mark.parametrize("V", [1024, 3000, 700])
def test_inverse_cdf_equals_one_cumsum(V: int) -> None:
    """The two-level search picks what a float64 cumsum over the whole row picks (the `draw` rule), for
    V a multiple of the block, not, and under one block. For u on a block's last CDF value (within
    rounding of a boundary, where the two may differ) it still picks a token of nonzero probability
    whose CDF interval holds u·total to rounding."""
    g = torch.Generator().manual_seed(V)
    B = 400
    probs = torch.rand(B, V, generator=g) ** 4 * (torch.rand(B, V, generator=g) > 0.3)  # a third zeros
    probs[:, 1000:1030] = 0.0  # a zero run across the first block boundary
    cdf = probs.double().cumsum(-1)  # [B, V]
    u = torch.rand(B, 1, generator=g, dtype=torch.float64)
    u[:3] = torch.tensor([[0.0], [1 - 2**-53], [1e-12]], dtype=torch.float64)
    got, total = inverse_cdf(probs, u)
    assert torch.equal(got, torch.searchsorted(cdf, u * cdf[:, -1:], right=True))
    torch.testing.assert_close(total, cdf[:, -1:], rtol=1e-12, atol=0)

    end = min(V, 1024) - 2  # the CDF at the end of the first block, or of the row's second-to-last token
    u = cdf[:, end : end + 1] / cdf[:, -1:]
    got, total = inverse_cdf(probs, u)
    assert bool((probs.gather(-1, got) > 0).all())
    hi, lo = cdf.gather(-1, got), (cdf - probs.double()).gather(-1, got)
    target, eps = u * total, 1e-12 * total
    assert bool(((lo - eps <= target) & (target <= hi + eps)).all())


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1, 0, 1), (0.7, 0, 1), (1, 7, 1), (1, 0, 0.9), (0.5, 50, 0.6)]
)
def test_warp_fast_equals_reference(temperature: float, top_k: int, top_p: float) -> None:
    """Same kept set and log-probs; V = 300 > 256 candidates, flat rows force the full-sort fallback."""
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([10.0, 3.0, 0.1, 1.0])[:, None]  # peaky ... nearly flat
    logits = torch.randn(4, 300, generator=g) * scale
    for rows in (slice(0, 2), slice(0, 4)):  # peaky rows only (candidate path), then with flat rows
        x = logits[rows]
        ref = warp_reference(x, temperature, top_k, top_p)
        got = warp_fast(x, x.log_softmax(-1), temperature, top_k, top_p)
        assert torch.equal(ref.isinf(), got.isinf())
        assert_close_verbose(got[~got.isinf()], ref[~ref.isinf()], torch.float32)
        expect = warp64(x, temperature, top_k, top_p)
        assert torch.equal(expect == 0, ref.isinf()), "kept set differs from HF's formulation"


def test_top_p_by_hand() -> None:
    """probs 0.5, 0.3, 0.15, 0.05: top_p 0.75 keeps the first two (mass above 0.15 is 0.8 ≥ 0.75), renormalised
    to 0.625, 0.375; top_p 0.85 keeps three: 0.5/0.95, 0.3/0.95, 0.15/0.95."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    cases = {0.75: [0.625, 0.375, 0.0, 0.0], 0.85: [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]}
    for top_p, expected in cases.items():
        for out in (warp_reference(logits, 1.0, 0, top_p), warp_fast(logits, logits, 1.0, 0, top_p)):
            assert_close_verbose(out.exp(), torch.tensor([expected]), torch.float32)


FIELDS = ("prompt_ids", "prompt_mask", "response_ids", "mask", "truncated", "logq_old", "logp", "log_w")


def test_index_and_cat_round_trip() -> None:
    r = run("llama", 5)
    back = Rollout.cat([r[[0, 1]], r[2:]])
    for name in FIELDS:
        assert torch.equal(getattr(back, name), getattr(r, name)), name
    # Narrower pieces are padded: prompts on the left (mask False), responses on the right (pad, False, 0).
    a, b = r[0], r[1]
    b.prompt_ids, b.prompt_mask = b.prompt_ids[:, 2:], b.prompt_mask[:, 2:]
    for name in ("response_ids", "mask", "logq_old", "logp", "log_w"):
        setattr(b, name, getattr(b, name)[:, :3])
    both = Rollout.cat([a, b])
    assert both.prompt_ids.shape == r[:2].prompt_ids.shape and both.response_ids.shape == (2, N)
    assert torch.equal(both.prompt_ids[1, 2:], r.prompt_ids[1, 2:]) and not bool(
        both.prompt_mask[1, :2].any()
    )
    assert torch.equal(both.response_ids[1, :3], r.response_ids[1, :3]) and not bool(both.mask[1, 3:].any())
    assert bool((both.response_ids[1, 3:] == EOS).all()) and bool((both.logq_old[1, 3:] == 0).all())


def test_dropout_off_while_sampling_and_mode_restored() -> None:
    student, teacher = _gpt2(2, 32, 3, dropout=0.5), pair("gpt2")[1]
    ids, mask = prompts()
    kw = dict(alpha=0.2, max_new_tokens=N, eos_token_id=EOS, pad_token_id=EOS)
    student.train()
    a = sample_rollout(student, teacher, ids, mask, generator=torch.Generator().manual_seed(0), **kw)
    assert student.training and not teacher.training
    student.eval()
    b = sample_rollout(student, teacher, ids, mask, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logq_old, b.logq_old)


def test_outputs_are_normal_tensors_usable_by_autograd() -> None:
    """Sampling runs in inference mode, but a trainer must be able to save logq_old / log_w for backward."""
    r = run("llama", 0, alpha=0.0)
    for name in ("response_ids", "mask", "logq_old", "logp", "log_w", "truncated", "prompt_ids"):
        assert not getattr(r, name).is_inference(), name
    logq_new = torch.zeros_like(r.logq_old, requires_grad=True)
    ((logq_new - r.logq_old).exp() * r.log_w.exp() * r.logp).sum().backward()
    assert_close_verbose(logq_new.grad, ((-r.logq_old).exp() * r.log_w.exp() * r.logp), torch.float32)


def test_bad_inputs_raise() -> None:
    student, teacher = pair("llama")
    ids, mask = prompts()
    kw = dict(alpha=0.2, max_new_tokens=4, eos_token_id=EOS, pad_token_id=EOS, generator=torch.Generator())
    with pytest.raises(ValueError, match="left-padded"):
        sample_rollout(student, teacher, ids, mask.flip(-1), **kw)
    with pytest.raises(ValueError, match="vocabulary"):
        sample_rollout(student, _llama(1, 16, 0, vocab=V + 1), ids, mask, **kw)
    with pytest.raises(ValueError, match="alpha"):
        sample_rollout(student, teacher, ids, mask, **(kw | dict(alpha=1.5)))


@pytest.mark.parametrize("fast", [True, False])
def test_no_teacher_samples_the_student_alone(fast: bool) -> None:
    """teacher=None (SeqKD's and evaluation's student-only sampling) gives the α = 0 rollout of the same
    student with any teacher beside it, logp 0; it is refused where a teacher would be needed."""
    student, teacher = pair("llama")
    ids, mask = prompts()
    kw = dict(alpha=0.0, max_new_tokens=6, eos_token_id=EOS, pad_token_id=EOS, fast=fast, score=False)
    want = sample_rollout(student, teacher, ids, mask, generator=torch.Generator().manual_seed(3), **kw)
    got = sample_rollout(student, None, ids, mask, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(got.response_ids, want.response_ids) and torch.equal(got.mask, want.mask)
    assert torch.equal(got.logq_old, want.logq_old) and not got.logp.any()
    for bad in (dict(alpha=0.2), dict(score=True)):
        with pytest.raises(ValueError, match="teacher=None"):
            sample_rollout(student, None, ids, mask, generator=torch.Generator(), **(kw | bad))


def test_packed_linears_same_outputs_and_restored() -> None:
    """Inside `packed_linears` every plain Linear of an fp32 CPU model runs a packed weight: outputs equal
    the plain model's to fp32 rounding, and leaving restores the class forward."""
    student, _ = pair("llama")
    ids, mask = prompts()
    linears = [m for m in student.modules() if type(m) is nn.Linear]
    with torch.no_grad():
        want = student(input_ids=ids, attention_mask=mask.long()).logits
        with packed_linears(student, len(ids), True):
            assert all("forward" in m.__dict__ for m in linears)
            got = student(input_ids=ids, attention_mask=mask.long()).logits
        assert not any("forward" in m.__dict__ for m in linears)
        with packed_linears(student, len(ids), False):
            assert not any("forward" in m.__dict__ for m in linears)
    assert_close_verbose(got, want, torch.float32)


def float64_forward(model: nn.Module, r: Rollout, **kw: object) -> object:
    """One uncached float64 forward of (a copy of) `model` over r's prompts + responses."""
    full_ids, full_attn = r.full_inputs()
    pos = (full_attn.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return copy.deepcopy(model).double()(
            full_ids, attention_mask=full_attn.long(), position_ids=pos, **kw
        )


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "fast"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logits_out_holds_the_student_logits_of_each_step(family: str, fast: bool) -> None:
    """logits_out[:, t] is the raw student's next-token logits at response step t (one uncached forward
    over prompt + response in float64 as the reference), and the samples do not change."""
    student, _ = pair(family)
    ids, mask = prompts()
    buf = torch.full((len(ids), N, V), float("nan"))
    r = run(family, 0, fast=fast, logits_out=buf)
    assert torch.equal(r.response_ids, run(family, 0, fast=fast).response_ids)
    P, T = ids.shape[1], r.response_ids.shape[1]
    want = float64_forward(student, r).logits[:, P - 1 : P + T - 1]
    assert_close_verbose(buf[:, :T][r.mask].double(), want[r.mask], torch.float32)
    with pytest.raises(ValueError, match="logits_out shape"):
        run(family, 0, fast=fast, logits_out=buf[:, :-1])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_teacher_rows_out_hold_the_teacher_hidden_state_of_each_step(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """teacher_rows_out[:, t] is the teacher's final hidden state behind p(·|y<t) (its head's input; one
    uncached float64 forward over prompt + response as the reference), with prompts that share a prefill
    group and prompts that do not, and the samples do not change."""
    student, teacher = pair(family)
    lengths = (5, 5, 2, 5, 2, 6)
    ids, mask = prompts(lengths)
    H = teacher.get_output_embeddings().weight.shape[1]
    buf = torch.full((len(ids), N, H), float("nan"))
    r = run(family, 1, lengths=lengths, teacher_rows_out=buf)
    assert torch.equal(r.response_ids, run(family, 1, lengths=lengths).response_ids)
    P, T = ids.shape[1], r.response_ids.shape[1]
    out = float64_forward(teacher, r, output_hidden_states=True)
    want = out.hidden_states[-1][:, P - 1 : P + T - 1]  # after the final norm: what the head reads
    assert_close_verbose(buf[:, :T][r.mask].double(), want[r.mask], torch.float32)
    with pytest.raises(ValueError, match="alpha > 0"):
        run(family, 1, lengths=lengths, alpha=0.0, teacher_rows_out=buf)
    with pytest.raises(ValueError, match="alpha > 0"):
        run(family, 1, lengths=lengths, fast=False, teacher_rows_out=buf)
    # a head the forward never calls (pair() is cached: monkeypatch restores the teacher)
    monkeypatch.setattr(teacher, "get_output_embeddings", lambda: torch.nn.Linear(H, V))
    with pytest.raises(RuntimeError, match="never called its output embedding"):
        sample_rollout(
            student,
            teacher,
            ids,
            mask,
            alpha=0.2,
            max_new_tokens=N,
            eos_token_id=EOS,
            pad_token_id=EOS,
            generator=torch.Generator(),
            teacher_rows_out=buf,
        )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_layers_out_hold_each_layer_output_at_its_slot(family: str) -> None:
    """layers_out[l][b, c] is decoder layer l's output at column c of prompt + response (one uncached
    float64 forward as the reference, its layer outputs taken by hooks), for every column fed to the
    student: real prompt tokens and every response token but the last."""
    student, _ = pair(family)
    ids, mask = prompts((5, 5, 2, 5, 2, 6))
    B, P = ids.shape
    H = student.config.hidden_size
    bufs = [torch.full((B, P + N, H), float("nan")) for _ in decoder_layers(student)]
    r = run(family, 2, lengths=(5, 5, 2, 5, 2, 6), alpha=0.0, layers_out=bufs)
    full_ids, full_attn = r.full_inputs()
    s64 = copy.deepcopy(student).double()
    want = []
    hooks = [
        layer.register_forward_hook(lambda m, a, out: want.append(out[0] if isinstance(out, tuple) else out))
        for layer in decoder_layers(s64)
    ]
    pos = (full_attn.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        s64(full_ids, attention_mask=full_attn.long(), position_ids=pos)
    for h in hooks:
        h.remove()
    fed = full_attn.clone()
    fed[:, -1] = False  # the last sampled token is never fed
    width = full_ids.shape[1]
    for got, ref in zip(bufs, want, strict=True):
        assert_close_verbose(got[:, :width][fed].double(), ref[fed], torch.float32)
    with pytest.raises(ValueError, match="fast path only"):
        run(family, 2, fast=False, layers_out=bufs)
