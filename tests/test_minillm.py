"""MiniLLM trainer: it learns (reverse KL to a peaked teacher halves), its loss equals a direct float64
computation, and a run killed mid-collection resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import save_tiny_model
from tolerances import assert_close_verbose
from torch import Tensor

from minillm import config as config_lib
from minillm import models
from minillm.config import MiniLLMConfig, SFTConfig
from minillm.data.tokenize import length_groups
from minillm.objectives import policy
from minillm.objectives.chunked import take_rows
from minillm.rollout import response_rows, sample_rollout, score_teacher
from minillm.train import minillm as minillm_train
from minillm.train import sampling_cache
from minillm.train.minillm import (
    TeacherStore,
    minibatch_loss,
    train_minillm,
)
from minillm.train.sampling_cache import SamplingCache
from minillm.train.sft import train_sft


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def peaked_teacher(tmp_path_factory, tokenizer) -> Path:
    """A tiny teacher SFT'd to answer every instruction with the same short text: a sharply peaked p."""
    root = tmp_path_factory.mktemp("peaked")
    data = root / "task.jsonl"
    with open(data, "w") as fh:
        for i in range(64):
            fh.write(
                json.dumps({"instruction": f"Say the word number {i}.", "input": "", "output": "yes"}) + "\n"
            )
    init = save_tiny_model(root / "init", "llama", tokenizer, layers=2, hidden=32, seed=1)
    cfg = SFTConfig(
        model=str(init),
        output_dir=str(root / "sft"),
        train_data=str(data),
        valid_data=str(data),
        max_valid_examples=8,
        batch_size=8,
        max_steps=40,
        lr=1e-2,
        warmup_steps=0,
        eval_every=40,
        save_every=0,
        max_prompt_length=192,
        max_length=256,
        chunk_size=64,
    )
    return train_sft(cfg), data


def minillm_config(student: Path, teacher: Path, data: Path, out: Path, **kw) -> MiniLLMConfig:
    base = dict(
        model=str(student),
        teacher=str(teacher),
        output_dir=str(out),
        train_data=str(data),
        valid_data=str(data),
        max_valid_examples=16,
        num_rollouts=16,
        batch_size=4,
        grad_accum=2,
        ppo_epochs=2,
        max_steps=16,
        max_new_tokens=6,
        valid_max_new_tokens=6,
        max_prompt_length=192,
        max_length=256,
        pt_loss="none",
        eval_every=16,
        save_every=0,
        chunk_size=16,
        warmup_steps=0,
        lr=5e-3,
    )
    base.update(kw)
    return MiniLLMConfig(**base)


@pytest.mark.parametrize(
    "variant",
    # "full" recomputes the teacher's log-probs every inner epoch; the resume test below reads them cached
    [
        dict(max_steps=24, lr=2e-2, teacher_cache_mib=0),
        dict(single_step=False, teacher_mix_alpha=0.0, max_steps=64, lr=3e-2),
    ],
    ids=["full", "pg-only"],
)
def test_reverse_kl_to_peaked_teacher_halves(peaked_teacher, tokenizer, tmp_path, variant):
    teacher, data = peaked_teacher
    student = save_tiny_model(tmp_path / "student", "llama", tokenizer, layers=1, hidden=32, seed=2)
    out = tmp_path / "run"
    train_minillm(minillm_config(student, teacher, data, out, **variant))
    lines = read_metrics(out)
    start, end = lines[0]["valid/reverse_kl"], lines[-1]["valid/reverse_kl"]
    assert end < 0.5 * start, (start, end)


def test_no_dropout_in_the_update_ratio_is_one_at_a_collections_first_step(
    tiny_gpt2, teacher, tmp_path, monkeypatch
):
    """Pins dropout in the PPO update: a GPT-2 student (dropout 0.1) was updated in train mode, so even at
    a collection's first mini-batch, at the sampling weights, log q_new differed from the sampler's log q_old
    (spurious clipping, a noisy single-step term). The RL phase now runs in eval mode: the two agree to fp32
    rounding (the sampler decodes with a KV cache, the update runs one forward)."""
    assert models.has_dropout(models.load_model(str(tiny_gpt2)))
    real = minillm_train.minibatch_loss
    seen: list[tuple[bool, Tensor, Tensor]] = []

    def spy(student, teacher, mb, *args, **kw):
        inner = getattr(student, "module", student)
        with torch.no_grad():
            logits = models.output_head(inner).logits(response_rows(student, mb)).double()  # [N, V]
            logq = logits.log_softmax(-1).gather(-1, mb.response_ids[mb.mask][:, None])[:, 0]  # [N]
        seen.append((student.training, logq, mb.logq_old[mb.mask]))
        return real(student, teacher, mb, *args, **kw)

    monkeypatch.setattr(minillm_train, "minibatch_loss", spy)
    # one mini-batch per collection: every step is a collection's first, at the weights it sampled with
    cfg = minillm_config(
        tiny_gpt2,
        teacher,
        "dolly_valid",
        tmp_path / "run",
        max_train_examples=16,
        max_valid_examples=4,
        num_rollouts=4,
        batch_size=2,
        ppo_epochs=1,
        max_steps=2,
    )
    train_minillm(cfg)
    assert len(seen) == 4  # 2 steps x 2 micro-batches
    for training, logq, logq_old in seen:
        assert not training
        assert_close_verbose(logq, logq_old, torch.float32)


def test_gradient_checkpointing_with_dropout_is_refused(tiny_gpt2, teacher, tmp_path):
    """HF checkpoints layers only in train mode, which would draw dropout in the update: refused."""
    cfg = minillm_config(tiny_gpt2, teacher, "dolly_valid", tmp_path / "run", gradient_checkpointing=True)
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        train_minillm(cfg)


def test_length_groups_hand_sized():
    # sorted: 10 (i=2), 10 (i=0), 11 (i=3), 20 (i=1): 10, 10, 11 pad 2 of 33 (6 %); adding 20 would pad 29 of 80
    assert length_groups([10, 20, 10, 11], max_padding=0.1) == [[0, 2, 3], [1]]
    assert length_groups([10, 20, 10, 11], max_padding=0.0) == [[0, 2], [3], [1]]
    assert length_groups([10, 20, 10, 11], max_padding=1.0) == [[0, 2, 3, 1]]
    assert length_groups([]) == []


def test_response_rows_equal_padded_forward(tokenizer, tmp_path):
    """Unpadded, grouped rows equal the rows of one left-padded batch forward (float64)."""
    model = models.load_model(str(save_tiny_model(tmp_path / "m", "llama", tokenizer, layers=2, seed=5)))
    model = model.double().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, len(tokenizer), (4, 9), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :7] = 0  # prompt lengths 2, 9, 6, 9: several groups
    attn[2, :3] = 0
    r = sample_rollout(
        model, model, ids, attn, alpha=0.0, max_new_tokens=6, eos_token_id=5, pad_token_id=0, generator=g
    )
    lengths = (r.prompt_mask.sum(-1) + r.mask.sum(-1) - 1).tolist()
    assert len(length_groups(lengths)) > 1  # several groups, one of them shorter than the batch width
    full_ids, full_attn = r.full_inputs()
    P, T = r.prompt_ids.shape[1], r.response_ids.shape[1]
    with torch.no_grad():
        want = models.final_hidden(model, full_ids, full_attn)[:, P - 1 : P + T - 1][r.mask]
        got = response_rows(model, r)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "store", ["rows", "cache", "cache, permuted", "cache, sampling cache", "cache, single_step_weight token"]
)
def test_minibatch_loss_matches_direct_float64(peaked_teacher, tokenizer, tmp_path, store):
    """PG + single-step from the chunked pass equal a direct full-logit float64 computation, value and grads,
    whether the teacher's log-probs are recomputed from its hidden rows or read from the collection's
    cache, in order or through a mini-batch's index, and whether the student's logits come from its head
    or, with its layers' outputs, from the sampler."""
    teacher_dir, _ = peaked_teacher
    student = models.load_model(str(save_tiny_model(tmp_path / "s", "llama", tokenizer, layers=1, seed=3)))
    teacher = models.load_model(str(teacher_dir)).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, len(tokenizer), (3, 5), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :2] = 0  # left padding
    V, H = len(tokenizer), student.config.hidden_size
    reuse = store == "cache, sampling cache"
    logits = torch.full((3, 7, V), float("nan"))  # positions after an end must stay unread
    layers = [torch.full((3, 5 + 7, H), float("nan")) for _ in models.decoder_layers(student)]
    r = sample_rollout(
        student,
        teacher,
        ids,
        attn,
        alpha=0.3,
        max_new_tokens=7,
        eos_token_id=0,
        pad_token_id=0,
        generator=g,
        fast=reuse,
        logits_out=logits,
        layers_out=layers if reuse else None,
    )
    N = int(r.mask.sum())
    assert N < r.mask.numel(), "an early EOS should leave stale positions"
    cache = torch.full((N + 3, V), float("nan"))  # rows past N must stay unread
    t_rows, logp = score_teacher(teacher, r, chunk_size=5, logp_out=None if store == "rows" else cache)
    torch.testing.assert_close(logp, score_teacher(teacher, r, chunk_size=5)[1], rtol=1e-5, atol=1e-6)
    t_store = TeacherStore(t_rows, None if store == "rows" else cache[:N])
    if store == "cache, permuted":  # a collection in another order; the mini-batch picks its positions
        perm = torch.randperm(N, generator=g)
        t_store = TeacherStore(t_rows[perm], cache[:N][perm]).select(perm.argsort())
    adv = torch.randn(r.mask.shape, generator=g)
    weight = "token" if store.endswith("token") else "none"
    cfg = minillm_config(
        tmp_path, tmp_path, tmp_path, tmp_path, chunk_size=5, clip_eps=0.2, single_step_weight=weight
    )
    sampled = None
    if reuse:
        grid = torch.arange(3 * 7).view(3, 7)[:, : r.mask.shape[1]]
        sampled = SamplingCache(logits.view(-1, V), grid[r.mask], layers, torch.arange(3), 5)
    student.eval()  # the RL update's mode; the replay turns on the layers' own train flag for HF's routing
    if reuse:  # a first backward finds each layer's value-free output linear; the measured one skips it
        warm = SamplingCache(logits.clone().view(-1, V), sampled.index, layers, sampled.rows, 5)  # read once
        minibatch_loss(student, teacher, r, t_store, adv, 11.0, cfg, warm)[0].backward()
        student.zero_grad()
        skipped = {sampling_cache._SKIPPABLE[layer] for layer in models.decoder_layers(student)}
        assert skipped == {"mlp.down_proj"}
    mlp_calls = []
    hooks = [
        layer.mlp.register_forward_hook(lambda *a: mlp_calls.append(1))
        for layer in models.decoder_layers(student)
    ]
    loss, _ = minibatch_loss(student, teacher, r, t_store, adv, 11.0, cfg, sampled)
    assert (len(mlp_calls) == 0) == reuse  # replayed layers do not run forward
    for h in hooks:
        h.remove()
    loss.backward()
    got = {n: p.grad.clone() for n, p in student.named_parameters()}

    student.zero_grad()
    s64, t64 = student.double(), teacher.double()
    full_ids, full_attn = r.full_inputs()
    P, T = r.prompt_ids.shape[1], r.response_ids.shape[1]
    pos = (full_attn.long().cumsum(-1) - 1).clamp(min=0)
    logq = (
        s64(full_ids, attention_mask=full_attn, position_ids=pos).logits[:, P - 1 : P + T - 1].log_softmax(-1)
    )
    with torch.no_grad():
        logp = (
            t64(full_ids, attention_mask=full_attn, position_ids=pos)
            .logits[:, P - 1 : P + T - 1]
            .log_softmax(-1)
        )
    logq_new = logq.gather(-1, r.response_ids[..., None])[..., 0]
    ratio = torch.exp(logq_new - r.logq_old.double() + r.log_w.double())
    a = adv.double()
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2))
    single = (logq.exp() * (logq - logp)).sum(-1)
    if weight == "token":  # paper Eq. 7: the rollout-time importance weight w = q_old/p̃ of each token
        single = single * r.log_w.double().exp()
    want = ((pg + single) * r.mask).sum() / 11.0
    want.backward()
    assert float(loss) == pytest.approx(float(want), rel=1e-4)
    for n, p in s64.named_parameters():
        torch.testing.assert_close(got[n].double(), p.grad, rtol=1e-3, atol=1e-6, msg=n)
    # the same numbers through the policy module, as a cross-check of the conventions used above
    ref, _ = policy.ppo_policy_loss(
        logq_new.detach(), r.logq_old.double(), r.log_w.double(), a, r.mask, clip_eps=0.2
    )
    torch.testing.assert_close(ref, (pg * r.mask).detach())


def test_sampling_logits_only_for_the_first_step(peaked_teacher, tokenizer, tmp_path):
    """Reading the sampler's logits changes no figure at any step: 4 steps per collection, so a trainer
    that kept them past the first step (stale weights) would log other losses from the second on."""
    teacher, data = peaked_teacher
    student = save_tiny_model(tmp_path / "student", "llama", tokenizer, layers=1, hidden=32, seed=2)
    runs = []
    for mib in (0.0, 256.0):
        out = tmp_path / f"run-{mib}"
        train_minillm(
            minillm_config(student, teacher, data, out, max_steps=8, eval_every=0, sampling_cache_mib=mib)
        )
        runs.append(read_metrics(out))
    plain, cached = runs
    assert [m["step"] for m in cached] == [m["step"] for m in plain] == list(range(9))
    for a, b in zip(cached[1:], plain[1:], strict=True):
        for key in ("loss/pg", "loss/single", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_mixed_sampling_gives_the_teacher_side_without_a_teacher_pass(
    peaked_teacher, tokenizer, tmp_path, monkeypatch
):
    """With alpha > 0 `collect` takes the teacher's hidden rows from the sampler's teacher forwards and runs
    only the head over them: rows and cached log-probs equal a teacher pass over the same rollouts."""
    teacher_dir, data = peaked_teacher
    student = models.load_model(str(save_tiny_model(tmp_path / "s", "llama", tokenizer, layers=1, seed=3)))
    teacher = models.load_model(str(teacher_dir)).eval()
    cfg = minillm_config(tmp_path, tmp_path, data, tmp_path / "out", teacher_mix_alpha=0.3, chunk_size=4)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, len(tokenizer), (n,), generator=g).tolist() for n in (3, 7, 5, 2, 7, 4)]
    cache = torch.full((6 * cfg.max_new_tokens, len(tokenizer)), float("nan"))

    def no_pass(*args, **kwargs):
        raise AssertionError("the teacher pass ran")

    monkeypatch.setattr(minillm_train, "score_teacher", no_pass)
    acc = Accelerator(cpu=True)
    store, t_store, _, _ = minillm_train.collect(student, teacher, prompts, 0, 0, cfg, acc, g, cache)
    N = int(store.mask.sum())
    assert N > 8 and len(t_store.rows) == N and t_store.logp.shape[0] == N
    want_logp = torch.empty(N, len(tokenizer))
    want_rows, _ = score_teacher(teacher, store, chunk_size=cfg.chunk_size, logp_out=want_logp)
    torch.testing.assert_close(t_store.rows, want_rows, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(t_store.logp, want_logp, rtol=1e-4, atol=1e-4)


def test_one_minibatch_step_reads_the_teacher_cache_in_place(
    peaked_teacher, tokenizer, tmp_path, monkeypatch
):
    """With one mini-batch per collection its rows come in store order, so every chunk of cached teacher
    log-probs is read in place; in the collection's random order, chunks spanning two rows stored apart
    would be gathered into a buffer."""
    teacher, data = peaked_teacher
    student = save_tiny_model(tmp_path / "student", "llama", tokenizer, layers=1, hidden=32, seed=2)
    in_place = []

    def spy(src, at, out):
        got = take_rows(src, at, out)
        in_place.append(got.data_ptr() != out.data_ptr())
        return got

    monkeypatch.setattr(minillm_train, "take_rows", spy)
    cfg = dict(num_rollouts=8, batch_size=8, grad_accum=1, ppo_epochs=1, chunk_size=3, sampling_cache_mib=0)
    train_minillm(minillm_config(student, teacher, data, tmp_path / "out", max_steps=2, eval_every=0, **cfg))
    assert len(in_place) > 4 and all(in_place)


def test_killed_mid_collection_resumes_exactly(peaked_teacher, tokenizer, tmp_path):
    teacher, data = peaked_teacher
    student = save_tiny_model(tmp_path / "student", "llama", tokenizer, layers=1, hidden=32, seed=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}

    def launch(out: Path, resume: bool) -> subprocess.Popen:
        cfg = minillm_config(
            student,
            teacher,
            data,
            out,
            pt_loss="ce+kd",
            pt_block_length=32,
            max_steps=12,
            save_every=3,
            eval_every=6,
            resume=resume,
        )  # 4 steps per collection: kills land mid-way
        return subprocess.Popen(
            [sys.executable, "-m", "minillm.cli", "distill", *config_lib.to_argv(cfg)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    ref = launch(tmp_path / "ref", False)
    killed = tmp_path / "killed"
    run = launch(killed, False)
    deadline = time.time() + 180
    while time.time() < deadline:
        latest = killed / "latest.json"
        if latest.is_file() and json.loads(latest.read_text())["step"] >= 3:
            break
        assert run.poll() is None, run.stderr.read().decode()[-3000:]
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = launch(killed, True)
    for p in (ref, resumed):
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-3000:]
    want, got = read_metrics(tmp_path / "ref"), read_metrics(killed)
    assert [m["step"] for m in got] == [m["step"] for m in want]
    keys = ("loss", "loss/pg", "loss/single", "loss/pt", "reward", "valid/rougeL", "valid/reverse_kl")
    for a, b in zip(got, want, strict=True):
        assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}, (a["step"], a, b)


def test_minibatch_loss_under_bf16_autocast_tracks_fp32(peaked_teacher, tokenizer, tmp_path):
    """The closed-form chunk pass under autocast (the GPU path: bf16 logits buffers, fp32 maths) gives the
    fp32 loss and gradients to bf16 accuracy."""
    teacher_dir, _ = peaked_teacher
    student = models.load_model(str(save_tiny_model(tmp_path / "s", "llama", tokenizer, layers=1, seed=3)))
    teacher = models.load_model(str(teacher_dir)).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, len(tokenizer), (3, 5), generator=g)
    r = sample_rollout(
        student,
        teacher,
        ids,
        torch.ones_like(ids),
        alpha=0.0,
        max_new_tokens=7,
        eos_token_id=0,
        pad_token_id=0,
        generator=g,
    )
    t_rows, r.logp = score_teacher(teacher, r, chunk_size=4)
    t_store = TeacherStore(t_rows)
    adv = torch.randn(r.mask.shape, generator=g)
    cfg = minillm_config(tmp_path, tmp_path, tmp_path, tmp_path, chunk_size=4)
    results = []
    for autocast in (False, True):
        student.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = minibatch_loss(student, teacher, r, t_store, adv, 11.0, cfg)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in student.parameters()])
        results.append((float(loss), grad))
    (l32, g32), (l16, g16) = results
    assert l16 != l32  # bf16 really ran
    assert l16 == pytest.approx(l32, rel=5e-2, abs=1e-2)
    assert float(torch.nn.functional.cosine_similarity(g16, g32, dim=0)) > 0.98


@pytest.mark.parametrize(
    "family,skip,lora",
    [
        ("gpt2", None, None),  # Conv1D
        ("qwen2", "mlp.down_proj", None),
        ("opt", None, None),  # dropout
        ("llama", "mlp.down_proj", ["q_proj", "v_proj"]),  # LoRA, the output linear plain
        ("llama", None, ["all-linear"]),  # LoRA on the output linear too: its value is read
    ],
    ids=["gpt2", "qwen2", "opt", "llama-lora-qv", "llama-lora-all"],
)
def test_sampling_cache_matches_recompute_in_other_families(tokenizer, tmp_path, family, skip, lora):
    """The logits and replayed layer outputs give the loss and gradients of the plain pass in families
    other than Llama (GPT-2 and OPT with their dropout 0.1: the RL update runs in eval mode) and in LoRA
    students (frozen embedding, adapters inside the replayed layers), and the replay's recompute leaves out
    the output linear exactly where backward never reads its value."""
    student = models.load_model(str(save_tiny_model(tmp_path / "s", family, tokenizer, layers=2, seed=4)))
    assert models.has_dropout(student) == (family in ("gpt2", "opt"))
    if lora is not None:
        student = models.add_lora(student, r=4, alpha=8, dropout=0.0, target_modules=lora)
    teacher = models.load_model(
        str(save_tiny_model(tmp_path / "t", family, tokenizer, layers=1, seed=5))
    ).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, len(tokenizer), (3, 5), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :2] = 0
    V, H = len(tokenizer), student.config.hidden_size
    logits = torch.empty(3, 6, V)
    layers = [torch.empty(3, 5 + 6, H) for _ in models.decoder_layers(student)]
    kw = dict(alpha=0.0, max_new_tokens=6, eos_token_id=0, pad_token_id=0, generator=g)
    r = sample_rollout(student, teacher, ids, attn, **kw, logits_out=logits, layers_out=layers)
    t_rows, r.logp = score_teacher(teacher, r, chunk_size=4)
    adv = torch.randn(r.mask.shape, generator=g)
    cfg = minillm_config(tmp_path, tmp_path, tmp_path, tmp_path, chunk_size=4)
    grid = torch.arange(3 * 6).view(3, 6)[:, : r.mask.shape[1]]
    results = []
    student.eval()  # the RL update's mode
    for reuse in (False, True, True):  # the second replay skips what the first found value-free
        # the cached logits are read once (overwritten in place): each replay gets its own copy
        cache = SamplingCache(logits.clone().view(-1, V), grid[r.mask], layers, torch.arange(3), 5)
        cache = cache if reuse else None
        student.zero_grad()
        loss, _ = minibatch_loss(student, teacher, r, TeacherStore(t_rows), adv, 7.0, cfg, cache)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}
        assert all(float(x.abs().sum()) > 0 for n, x in grads.items() if "lora_A" not in n)  # A's: 0 at B = 0
        results.append((float(loss), grads))
    skipped = {sampling_cache._SKIPPABLE[layer] for layer in models.decoder_layers(student)}
    assert skipped == {skip}
    (plain, g_plain), *replayed = results
    for cached, g_cached in replayed:
        assert cached == pytest.approx(plain, rel=1e-5)
        for n, grad in g_plain.items():
            torch.testing.assert_close(g_cached[n], grad, rtol=1e-4, atol=1e-6, msg=n)
