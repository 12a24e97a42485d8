"""Word-level KD: the loss against a float64 reference, learning, micro-batch invariance, config checks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, save_tiny_model, stage_config
from reference import divergence_slow, softmax_slow
from tolerances import assert_close_verbose

from minillm import config as config_lib
from minillm import models
from minillm.config import ConfigError, GKDConfig, KDConfig, SeqKDConfig, SFTConfig
from minillm.data.tokenize import Example, collate
from minillm.train.kd import kd_loss, make_divergence, train_kd
from minillm.train.sft import train_sft


def kd_config(model: Path, teacher: Path, out: Path, **kw) -> KDConfig:
    base = dict(
        teacher=str(teacher),
        max_train_examples=64,
        max_valid_examples=16,
        batch_size=4,
        grad_accum=2,
        max_steps=10,
        lr=3e-3,
        eval_every=5,
    )
    return stage_config(KDConfig, model, out, **(base | kw))


@pytest.fixture(scope="module")
def sft_teacher(tmp_path_factory, tokenizer) -> Path:
    """A tiny teacher that knows the data a little: a wider llama fine-tuned for a few steps (peaked
    distributions, unlike a random model's near-uniform ones)."""
    root = tmp_path_factory.mktemp("kd_teacher")
    init = save_tiny_model(root / "init", "llama", tokenizer, layers=2, hidden=48, seed=1)
    cfg = stage_config(
        SFTConfig,
        init,
        root / "sft",
        max_train_examples=64,
        max_valid_examples=8,
        batch_size=8,
        max_steps=16,
        lr=5e-3,
        warmup_steps=0,
        eval_every=0,
        chunk_size=64,
    )
    return train_sft(cfg)


@pytest.mark.parametrize(
    "divergence,params",
    [
        ("forward_kl", {}),
        ("jsd", {"jsd_beta": 0.3, "loss_temperature": 2.0}),
        ("skew_reverse_kl", {"skew_alpha": 0.2}),
    ],
)
def test_kd_loss_matches_float64_reference(divergence, params, tiny_llama, tiny_gpt2, tokenizer):
    """kd_ratio·Σ D + (1 − kd_ratio)·Σ CE over exactly the response tokens (EOS = pad kept), against
    explicit float64 probabilities from the two models' full logits."""
    student, teacher = models.load_model(str(tiny_llama)).eval(), models.load_model(str(tiny_gpt2)).eval()
    cfg = KDConfig(divergence=divergence, kd_ratio=0.3, chunk_size=3, **params)
    eos = tokenizer.eos_token_id
    batch = collate([Example([5, 6, 7], [8, 9, eos]), Example([5, 6], [10, 11, 12, eos])], pad_id=eos)
    with torch.no_grad():
        got, parts = kd_loss(student, teacher, batch, make_divergence(cfg), cfg)
        kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        s_logits, t_logits = student(**kw).logits.double(), teacher(**kw).logits.double()
    # position i predicts token i + 1: row 0 predicts 8, 9, eos from 2..4; row 1 predicts 10, 11, 12, eos from 1..4
    predict = batch["target_mask"][:, 1:]  # [B, L-1]
    params_slow = {"beta": params["jsd_beta"]} if divergence == "jsd" else {}
    params_slow |= {"alpha": params["skew_alpha"]} if "skew_alpha" in params else {}
    d = divergence_slow(
        divergence,
        s_logits[:, :-1],
        t_logits[:, :-1],
        predict,
        temperature=params.get("loss_temperature", 1.0),
        **params_slow,
    )
    ce = 0.0
    for b, i in predict.nonzero().tolist():
        ce -= (
            torch.tensor(softmax_slow(s_logits[b, i].tolist())[int(batch["input_ids"][b, i + 1])])
            .log()
            .item()
        )
    assert int(predict.sum()) == 7
    want = 0.3 * d.sum() + 0.7 * ce
    assert_close_verbose(
        torch.tensor([parts["loss/kd"], parts["loss/ce"]]), torch.tensor([d.sum(), ce]), torch.float32
    )
    assert_close_verbose(got.detach().reshape(1), want.reshape(1), torch.float32)


def test_kd_lowers_heldout_forward_kl(tiny_llama, sft_teacher, tmp_path):
    """KD from a fine-tuned teacher into a random student lowers held-out KL(teacher ‖ student) on the gold
    validation responses, and by more than the same steps of plain CE on the gold data (kd_ratio 0) do."""
    fkl = {}
    for ratio in (0.5, 0.0):
        out = tmp_path / f"kd{ratio}"
        train_kd(kd_config(tiny_llama, sft_teacher, out, kd_ratio=ratio))
        lines = [m for m in read_metrics(out) if "valid/forward_kl" in m]
        assert [m["step"] for m in lines] == [0, 5, 10]
        fkl[ratio] = [m["valid/forward_kl"] for m in lines]
    kd, ce = fkl[0.5], fkl[0.0]
    assert kd[0] == ce[0] and kd[0] > 1.0, kd  # the random student is far from the fine-tuned teacher
    assert kd[-1] < 0.75 * kd[0], kd
    assert kd[-1] < ce[-1] - 0.03, (kd, ce)  # measured: 0.766 vs 0.832


def test_micro_batches_give_equal_gradients(tiny_llama, tiny_gpt2, tmp_path):
    """1 micro-batch of 8 and 4 micro-batches of 2 give the same step: losses and the gradient norm agree
    (a per-micro-batch mean would weight the 4x2 tokens differently; docs/design.md §4)."""
    logs = []
    for name, bs, ga in (("one", 8, 1), ("four", 2, 4)):
        out = tmp_path / name
        train_kd(
            kd_config(
                tiny_llama,
                tiny_gpt2,
                out,
                batch_size=bs,
                grad_accum=ga,
                max_steps=1,
                eval_every=0,
                max_valid_examples=2,
                valid_forward_kl=False,
            )
        )
        logs.append(read_metrics(out)[1])
    a, b = logs
    assert a["tokens"] == b["tokens"]
    for key in ("loss", "loss/kd", "loss/ce", "grad_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


def test_configs_check_values_and_round_trip():
    for cls in (KDConfig, SeqKDConfig, GKDConfig):
        cfg = cls()
        assert config_lib.parse(cls, None, config_lib.to_argv(cfg)) == cfg
        assert all(f.metadata.get("help") for f in dataclasses.fields(cls)), cls
    for cls, bad in (
        (KDConfig, {"kd_ratio": 1.5}),
        (KDConfig, {"divergence": "kl"}),
        (KDConfig, {"teacher": None}),
        (KDConfig, {"loss_temperature": 0.0}),
        (KDConfig, {"jsd_beta": -0.1}),
        (SeqKDConfig, {"seqkd_loss": "pg"}),
        (SeqKDConfig, {"top_p": 0.0}),
        (GKDConfig, {"lmbda": 1.2}),
        (GKDConfig, {"sample_temperature": -1.0}),
    ):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            cls(**bad)
