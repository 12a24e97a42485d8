"""LoRA (peft) students: MiniLLM trains only the adapters and still lowers the reverse KL; checkpoints hold
the adapters and load back; `minillm export --merge` writes a plain folder with the adapted logits; an
adapter folder loads as a teacher (base + adapters merged); the other stages run with adapters."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import model_config, stage_config
from safetensors.torch import load_file
from test_minillm import minillm_config, peaked_teacher  # noqa: F401 (a fixture)
from transformers import AutoModelForCausalLM

from minillm import cli, models
from minillm.config import GKDConfig, KDConfig, SFTConfig
from minillm.data.tokenize import position_ids
from minillm.train import engine, gkd, setup, sft
from minillm.train import kd as kd_train
from minillm.train import minillm as minillm_train
from minillm.train.kd import train_kd
from minillm.train.sft import train_sft

LORA = dict(lora_r=4, lora_alpha=16, lora_target_modules=["q_proj", "v_proj", "down_proj"])


def _capture_student(monkeypatch, module) -> list:
    """Keep the student `module.load_student` returns (the trained object, after the run)."""
    kept = []
    original = module.load_student

    def load_student(cfg):
        acc, tok, model = original(cfg)
        kept.append(model)
        return acc, tok, model

    monkeypatch.setattr(module, "load_student", load_student)
    return kept


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    attn = torch.ones_like(ids)
    with torch.no_grad():
        return model.eval()(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn)).logits


def test_minillm_lora_trains_adapters_only(peaked_teacher, tokenizer, tmp_path, monkeypatch):  # noqa: F811
    """Reverse KL to a peaked teacher falls with only rank-4 adapters trained; every base weight stays
    bit-identical; the checkpoint holds adapters only and loads back into a fresh LoRA student; export
    --merge gives a plain folder whose logits are the adapted model's, and an adapter folder loads as a
    merged model (how a LoRA teacher loads)."""
    teacher, data = peaked_teacher
    # weights of std 0.5: the frozen tied head must be able to express a peaked distribution (at std 0.02
    # its logits stay within ±1 whatever the adapters do)
    config = model_config("llama", len(tokenizer), layers=1, hidden=32)
    config.initializer_range = 0.5
    torch.manual_seed(2)
    student = tmp_path / "student"
    AutoModelForCausalLM.from_config(config).save_pretrained(student)
    tokenizer.save_pretrained(student)
    out = tmp_path / "run"
    kept = _capture_student(monkeypatch, minillm_train)
    cfg = minillm_config(student, teacher, data, out, max_steps=24, lr=2e-2, **LORA)
    best = minillm_train.train_minillm(cfg)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    start, end = lines[0]["valid/reverse_kl"], lines[-1]["valid/reverse_kl"]
    assert end < 0.5 * start, (start, end)

    (trained,) = kept
    original = load_file(student / "model.safetensors")
    base = {n: p for n, p in models.unwrap(trained).state_dict().items() if "lora_" not in n}
    for name, value in original.items():  # the base's names, inside peft's layer wrappers
        key = name if name in base else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(base[key], value), name
    lora = {n: p for n, p in trained.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    assert all(float(p.abs().sum()) > 0 for n, p in lora.items() if "lora_B" in n)  # B starts at 0

    assert (best / "adapter_model.safetensors").is_file() and not (best / "model.safetensors").exists()
    ckpt = engine.latest_checkpoint(str(out))  # the last step's: the trained student's weights
    fresh_cfg = minillm_config(student, teacher, data, tmp_path / "fresh", **LORA)
    acc, _, fresh = setup.load_student(fresh_cfg)
    optimizer = engine.make_optimizer(fresh, fresh_cfg)
    engine.load_checkpoint(ckpt, acc, fresh, optimizer, engine.make_scheduler(optimizer, fresh_cfg, 1))
    for n, p in fresh.named_parameters():
        assert torch.equal(p, dict(trained.named_parameters())[n]), n

    ids = torch.randint(1, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    want = _logits(trained, ids)
    merged_dir = tmp_path / "merged"
    cli.main(["export", "--model", str(ckpt), "--output", str(merged_dir), "--merge"])
    assert (merged_dir / "model.safetensors").is_file() and not (merged_dir / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(merged_dir)
    torch.testing.assert_close(_logits(plain, ids), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(models.load_model(str(ckpt)), ids), want, rtol=1e-5, atol=1e-5)
    adapters_dir = tmp_path / "adapters"
    cli.main(["export", "--model", str(ckpt), "--output", str(adapters_dir)])
    assert (adapters_dir / "adapter_config.json").is_file()
    torch.testing.assert_close(_logits(models.load_model(str(adapters_dir)), ids), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stage", ["sft", "kd", "gkd"])
def test_supervised_stages_train_adapters(stage, tiny_llama, teacher, tokenizer, tmp_path, monkeypatch):
    """SFT, KD (whose loop SeqKD shares) and GKD on the student's own samples (MiniLLM's sampler through the
    PeftModel) run 2 steps with adapters: the adapters move and the base does not."""
    kept = _capture_student(monkeypatch, sft if stage == "sft" else kd_train if stage == "kd" else gkd)
    out = tmp_path / stage
    common = dict(max_steps=2, batch_size=4, max_train_examples=8, max_valid_examples=4, lr=5e-2, **LORA)
    if stage == "sft":
        train_sft(stage_config(SFTConfig, tiny_llama, out, **common))
    elif stage == "kd":
        train_kd(stage_config(KDConfig, tiny_llama, out, teacher=str(teacher), **common))
    else:
        cfg = stage_config(
            GKDConfig, tiny_llama, out, teacher=str(teacher), lmbda=1.0, max_new_tokens=6, **common
        )
        gkd.train_gkd(cfg)
    (trained,) = kept
    original = load_file(tiny_llama / "model.safetensors")
    base = models.unwrap(trained).state_dict()
    q = "model.layers.0.self_attn.q_proj"
    assert torch.equal(base[f"{q}.base_layer.weight"], original[f"{q}.weight"])
    assert torch.equal(base["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    assert float(base[f"{q}.lora_B.default.weight"].abs().sum()) > 0


def test_lora_dropout_counts_as_dropout(tiny_llama):
    """LoRA's dropout is an nn.Dropout inside the peft wrappers: `has_dropout` sees it (so MiniLLM's
    sampling cache is not used with it, and the RL phase's dropout handling covers it), and peft gets the
    arguments as its LoraConfig names them."""
    kw = dict(r=2, alpha=4, target_modules=["q_proj"])
    assert not models.has_dropout(models.add_lora(models.load_model(str(tiny_llama)), dropout=0.0, **kw))
    model = models.add_lora(models.load_model(str(tiny_llama)), dropout=0.1, **kw)
    assert models.has_dropout(model)
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout, config.target_modules) == (
        2,
        4,
        0.1,
        {"q_proj"},
    )


def test_adapters_start_from_the_seed(tiny_llama, tmp_path):
    """LoRA A's random init is the config seed's, whatever the global RNG held before: two processes (or two
    runs) start from the same adapters, and another seed from others."""

    def adapters(seed: int) -> dict[str, torch.Tensor]:
        torch.rand(7)  # the global RNG in some other state
        _, _, model = setup.load_student(stage_config(SFTConfig, tiny_llama, tmp_path, seed=seed, **LORA))
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    a, b, c = adapters(1), adapters(1), adapters(2)
    assert a and all(torch.equal(a[n], b[n]) for n in a)
    assert not any(torch.equal(a[n], c[n]) for n in a)
