"""Heads that transform hidden @ Wᵀ further (Granite's logits_scaling, Gemma 2's final_logit_softcapping):
the chunked head reproduces the model's own logits, its closed-form gradients chain through the scale and
the tanh, and SFT, KD and MiniLLM losses equal references computed from the models' forward logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_minillm import minillm_config
from tolerances import assert_close_verbose
from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config, GraniteConfig

from minillm import models
from minillm.data.tokenize import position_ids
from minillm.objectives.chunked import Head, chunked_head_loss
from minillm.objectives.divergences import get_logit_grad
from minillm.objectives.lm import ce_kd_sum
from minillm.rollout import sample_rollout, score_teacher
from minillm.train.minillm import TeacherStore, minibatch_loss
from minillm.train.sampling_cache import SamplingCache
from minillm.train.supervised import ce_loss_sum, kd_loss_sums

N, V, H = 23, 41, 7
SCALE, CAP = 0.25, 1.5


def save_head_model(path: Path, family: str, tokenizer, seed: int = 0) -> Path:
    """A tiny random Granite (logits divided by logits_scaling 4), Cohere (multiplied by logit_scale 0.5) or
    Gemma 2 (soft-capped at 2)."""
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=0,
        bos_token_id=0,
        pad_token_id=0,
    )
    if family == "granite":
        config = GraniteConfig(logits_scaling=4.0, **common)
    elif family == "cohere":
        config = CohereConfig(logit_scale=0.5, **common)
    else:
        # weights of std 0.5 give logits of a few units, which the cap visibly bends
        config = Gemma2Config(
            head_dim=8, final_logit_softcapping=2.0, sliding_window=4, initializer_range=0.5, **common
        )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def reference_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """cap · tanh(scale · (hidden @ Wᵀ + b) / cap), written out (not `Head`), float64."""
    return CAP * torch.tanh(SCALE * (hidden @ weight.T + bias) / CAP)


def _data(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden=torch.randn(N, H, generator=g, dtype=torch.float64) * 2,
        weight=torch.randn(V, H, generator=g, dtype=torch.float64),
        bias=torch.randn(V, generator=g, dtype=torch.float64),
        t_rows=torch.randn(N, H + 2, generator=g, dtype=torch.float64) * 2,
        t_weight=torch.randn(V, H + 2, generator=g, dtype=torch.float64),
        targets=torch.randint(0, V, (N,), generator=g),
        row_weight=torch.rand(N, generator=g, dtype=torch.float64),
    )


@pytest.mark.parametrize("closed_form", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 5, N])
def test_chunked_head_chains_through_scale_and_softcap_float64(closed_form, chunk_size):
    """A weighted CE through a scaled, soft-capped head: value and gradients w.r.t. hidden, weight and bias
    equal float64 autograd through the written-out head, whether autograd or a hand-written logit
    gradient (then chained through d tanh and the scale by the chunker) gives the chunk's gradient."""
    d = _data()
    targets, w = d["targets"], d["row_weight"]

    def closed(logits, start, end):
        c = w[start:end, None]  # [C, 1]
        loss = (c[:, 0] * F.cross_entropy(logits, targets[start:end], reduction="none")).sum()
        grad = logits.softmax(-1).mul_(c)  # d/ds of w·CE = w·(softmax − onehot), s the final logits
        grad.scatter_add_(-1, targets[start:end, None], -c)
        logits.fill_(float("nan"))  # the buffer is token_fn's to overwrite
        return loss, grad

    def plain(logits, start, end):
        return (w[start:end] * F.cross_entropy(logits, targets[start:end], reduction="none")).sum()

    leaves = [d[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    head = Head(leaves[1], leaves[2], logit_scale=SCALE, softcap=CAP)
    fn = closed if closed_form else plain
    loss = chunked_head_loss(leaves[0], head, fn, chunk_size=chunk_size, closed_form=closed_form, scale=0.5)
    loss.backward()
    ref_leaves = [d[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    want = 0.5 * plain(reference_logits(*ref_leaves), 0, N)
    want.backward()
    assert_close_verbose(loss, want.detach(), torch.float64)
    for got, ref in zip(leaves, ref_leaves, strict=True):
        assert_close_verbose(got.grad, ref.grad, torch.float64)


def test_ce_kd_sum_through_transformed_heads_float64():
    """MiniLLM's PT loss, closed form, with a scaled soft-capped student head and a scaled teacher head."""
    d = _data(1)
    rows, weight, bias = (d[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    teacher = (d["t_rows"], Head(d["t_weight"], logit_scale=3.0))
    got = ce_kd_sum(
        rows, d["targets"], Head(weight, bias, SCALE, CAP), chunk_size=4, teacher=teacher, kd_ratio=0.5
    )
    got.backward()
    r64, w64, b64 = (d[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    logq = reference_logits(r64, w64, b64).log_softmax(-1)
    logp = (3.0 * d["t_rows"] @ d["t_weight"].T).log_softmax(-1)
    ce = -logq.gather(-1, d["targets"][:, None]).sum()
    want = 0.5 * ce + 0.5 * (logp.exp() * (logp - logq)).sum()
    want.backward()
    assert_close_verbose(got, want.detach(), torch.float64)
    for a, b in ((rows, r64), (weight, w64), (bias, b64)):
        assert_close_verbose(a.grad, b.grad, torch.float64)


@pytest.mark.parametrize("family", ["granite", "cohere", "gemma2"])
def test_head_gives_the_models_own_logits(family, tokenizer, tmp_path):
    """Through the loading path, the head's logits of the final hidden states are the forward's logits;
    for Granite the bare hidden @ Wᵀ is 4x them (what the update read before heads carried their scale)."""
    model = models.load_model(str(save_head_model(tmp_path / family, family, tokenizer))).eval()
    ids = torch.randint(1, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[1, :3] = 0
    with torch.no_grad():
        hidden = models.final_hidden(model, ids, attn)  # [2, 9, H]
        head = models.output_head(model)
        want = model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn)).logits
        torch.testing.assert_close(head.logits(hidden), want, rtol=1e-5, atol=1e-5)
        bare = hidden @ head.weight.T
    if family == "granite":
        assert head.logit_scale == 0.25 and head.softcap is None
        torch.testing.assert_close(bare, 4 * want, rtol=1e-5, atol=1e-5)
    elif family == "cohere":
        assert head.logit_scale == 0.5 and head.softcap is None
    else:
        assert head.logit_scale == 1.0 and head.softcap == 2.0
        assert float((bare - want).abs().max()) > 0.1  # the cap bends these logits


def test_unknown_head_transform_is_refused(tokenizer, tmp_path, monkeypatch):
    """A head transform `output_head` does not apply is caught at load, naming the config attribute."""
    path = save_head_model(tmp_path / "granite", "granite", tokenizer)
    monkeypatch.setattr(models, "LOGIT_SCALES", {})
    with pytest.raises(ValueError, match="logits_scaling=4.0"):
        models.load_model(str(path))


def _batch(tokenizer, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, len(tokenizer), (3, 10), generator=g)
    attn = torch.ones_like(ids)
    attn[2, 7:] = 0  # right padding
    target = torch.zeros_like(ids, dtype=torch.bool)
    target[:, 4:] = True
    return {"input_ids": ids, "attention_mask": attn, "target_mask": target & attn.bool()}


def _forward_logp(model, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """log softmax of the model's own forward logits, [B, L, V]."""
    return model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn)).logits.log_softmax(-1)


def _pairs(tokenizer, tmp_path: Path, student: str) -> tuple:
    other = "gemma2" if student == "granite" else "granite"
    s = models.load_model(str(save_head_model(tmp_path / "s", student, tokenizer, seed=1)))
    t = models.load_model(str(save_head_model(tmp_path / "t", other, tokenizer, seed=2))).eval()
    return s.eval(), t


@pytest.mark.parametrize("student", ["granite", "gemma2"])
def test_sft_and_kd_losses_match_forward_logits(student, tokenizer, tmp_path):
    """SFT's CE and KD's forward KL from the chunked heads equal the same sums over the models' forward
    logits, value and student gradients (teacher: the other family)."""
    s, t = _pairs(tokenizer, tmp_path, student)
    batch = _batch(tokenizer)
    ids, attn, target = batch["input_ids"], batch["attention_mask"], batch["target_mask"]
    s.zero_grad()
    ce = ce_loss_sum(s, batch, chunk_size=4)
    kd, _ = kd_loss_sums(s, t, batch, get_logit_grad("forward_kl"), kd_ratio=1.0, chunk_size=4)
    (ce + kd).backward()
    got = {n: p.grad.clone() for n, p in s.named_parameters() if p.grad is not None}

    s.zero_grad()
    keep = target[:, 1:]  # position i predicts token i + 1
    logq = _forward_logp(s, ids, attn)[:, :-1][keep]  # [N, V]
    with torch.no_grad():
        logp = _forward_logp(t, ids, attn)[:, :-1][keep]
    want_ce = -logq.gather(-1, ids[:, 1:][keep][:, None]).sum()
    want_kd = (logp.exp() * (logp - logq)).sum()
    (want_ce + want_kd).backward()
    assert float(ce) == pytest.approx(float(want_ce), rel=1e-5)
    assert float(kd) == pytest.approx(float(want_kd), rel=1e-5)
    for n, p in s.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("sampled", [False, True], ids=["head", "sampling logits"])
@pytest.mark.parametrize("student", ["granite", "gemma2"])
def test_minillm_loss_matches_forward_logits(student, sampled, tokenizer, tmp_path):
    """MiniLLM's PG + single-step loss from one chunked closed-form pass equals the direct computation on
    both models' forward logits, value and gradients, with the student's logits from its head or kept from
    sampling (then the soft-cap's d tanh comes from the capped logits themselves)."""
    s, t = _pairs(tokenizer, tmp_path, student)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, len(tokenizer), (3, 5), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :2] = 0
    Vt = len(tokenizer)
    logits = torch.full((3, 6, Vt), float("nan"))
    kw = dict(alpha=0.3, max_new_tokens=6, eos_token_id=0, pad_token_id=0, generator=g, logits_out=logits)
    r = sample_rollout(s, t, ids, attn, **kw)
    t_rows, _ = score_teacher(t, r, chunk_size=4)
    adv = torch.randn(r.mask.shape, generator=g)
    cfg = minillm_config(tmp_path, tmp_path, tmp_path, tmp_path, chunk_size=4, clip_eps=0.2)
    cache = None
    if sampled:
        grid = torch.arange(3 * 6).view(3, 6)[:, : r.mask.shape[1]]
        cache = SamplingCache(logits.view(-1, Vt), grid[r.mask], None, torch.arange(3), 5)
    s.zero_grad()
    loss, _ = minibatch_loss(s, t, r, TeacherStore(t_rows), adv, 9.0, cfg, cache)
    loss.backward()
    got = {n: p.grad.clone() for n, p in s.named_parameters() if p.grad is not None}

    s.zero_grad()
    full_ids, full_attn = r.full_inputs()
    P, T = r.prompt_ids.shape[1], r.response_ids.shape[1]
    logq = _forward_logp(s, full_ids, full_attn.long())[:, P - 1 : P + T - 1]  # [B, T, V]
    with torch.no_grad():
        logp = _forward_logp(t, full_ids, full_attn.long())[:, P - 1 : P + T - 1]
    logq_new = logq.gather(-1, r.response_ids[..., None])[..., 0]
    ratio = torch.exp(logq_new - r.logq_old + r.log_w)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    single = (logq.exp() * (logq - logp)).sum(-1)
    want = ((pg + single) * r.mask).sum() / 9.0
    want.backward()
    assert float(loss) == pytest.approx(float(want), rel=1e-4)
    for n, p in s.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-3, atol=1e-6, msg=n)


def test_softcapped_minillm_loss_under_bf16_autocast_tracks_fp32(tokenizer, tmp_path):
    """The GPU path: under bf16 autocast the closed-form pass's logits and d tanh buffers are bf16; the
    soft-capped student's loss and gradients match fp32 to bf16 accuracy."""
    s, t = _pairs(tokenizer, tmp_path, "gemma2")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, len(tokenizer), (3, 5), generator=g)
    kw = dict(alpha=0.0, max_new_tokens=7, eos_token_id=0, pad_token_id=0, generator=g)
    r = sample_rollout(s, t, ids, torch.ones_like(ids), **kw)
    t_rows, r.logp = score_teacher(t, r, chunk_size=4)
    adv = torch.randn(r.mask.shape, generator=g)
    cfg = minillm_config(tmp_path, tmp_path, tmp_path, tmp_path, chunk_size=4)
    results = []
    for autocast in (False, True):
        s.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = minibatch_loss(s, t, r, TeacherStore(t_rows), adv, 11.0, cfg)
        loss.backward()
        results.append((float(loss), torch.cat([p.grad.flatten() for p in s.parameters()])))
    (l32, g32), (l16, g16) = results
    assert l16 != l32  # bf16 really ran
    assert l16 == pytest.approx(l32, rel=5e-2, abs=1e-2)
    assert float(F.cosine_similarity(g16, g32, dim=0)) > 0.98
