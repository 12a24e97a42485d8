"""Model loading through the real code path, deriving students, tokenizer checks, the embedded GGUF teacher."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import build_tokenizer, model_config, save_tiny_model
from transformers import AutoModelForCausalLM

from minillm import models
from minillm.data.template import build_prompt
from minillm.data.tokenize import position_ids

FAMILIES = ["llama", "gpt2", "opt", "qwen2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_and_head_path(family, tokenizer, tmp_path):
    """Folder → load_model; logits rebuilt from final_hidden @ head equal the model's own logits."""
    path = save_tiny_model(tmp_path / family, family, tokenizer, layers=3)
    model = models.load_model(str(path)).eval()
    tok = models.load_tokenizer(str(path))
    assert tok.pad_token_id == tok.eos_token_id == tokenizer.eos_token_id
    ids = torch.randint(1, len(tokenizer), (2, 9))
    attn = torch.ones_like(ids)
    attn[1, :3] = 0
    with torch.no_grad():
        hidden = models.final_hidden(model, ids, attn)
        rebuilt = models.output_head(model).logits(hidden)
        pos = position_ids(attn)
        full = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits
    torch.testing.assert_close(rebuilt, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_derive_student_keeps_chosen_layers(family, tokenizer, tmp_path):
    teacher = models.load_model(str(save_tiny_model(tmp_path / "t", family, tokenizer, layers=6)))
    student = models.derive_student(teacher, [0, 2, 5])
    assert student.config.num_hidden_layers == 3
    prefix, t_layers = models._layer_list(teacher, 6)
    _, s_layers = models._layer_list(student, 3)
    for new, old in enumerate([0, 2, 5]):
        for (n1, p1), (n2, p2) in zip(
            s_layers[new].named_parameters(), t_layers[old].named_parameters(), strict=True
        ):
            assert n1 == n2 and torch.equal(p1, p2)
    s_head, t_head = student.get_output_embeddings().weight, teacher.get_output_embeddings().weight
    assert torch.equal(s_head, t_head)
    if teacher.config.tie_word_embeddings:
        assert s_head.data_ptr() == student.get_input_embeddings().weight.data_ptr()
    student.save_pretrained(tmp_path / "s")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    ids = torch.randint(1, len(tokenizer), (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, student.eval()(ids).logits)


def test_spread_layers_and_bad_layers(tokenizer, tmp_path):
    assert models.spread_layers(30, 6) == [0, 5, 10, 15, 20, 25]
    assert models.spread_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="between 1 and 30"):
        models.spread_layers(30, 31)
    teacher = models.load_model(str(save_tiny_model(tmp_path / "t", "llama", tokenizer, layers=4)))
    with pytest.raises(ValueError, match="increasing, distinct and within 0..3"):
        models.derive_student(teacher, [2, 1])


def test_tokenizer_and_vocab_mismatch_raise(tokenizer, tmp_path):
    other = build_tokenizer(vocab_size=400)
    with pytest.raises(ValueError, match="tokenizers differ: student has 384 entries, teacher has 400"):
        models.check_same_tokenizer(tokenizer, other, ("student", "teacher"))
    models.check_same_tokenizer(
        tokenizer, build_tokenizer(), ("student", "teacher")
    )  # same training → same vocab
    a = models.load_model(str(save_tiny_model(tmp_path / "a", "llama", tokenizer)))
    b = models.load_model(str(save_tiny_model(tmp_path / "b", "llama", other)))
    with pytest.raises(ValueError, match="student vocabulary size 384 != teacher vocabulary size 400"):
        models.check_same_vocab(a, b)


def test_missing_files_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file .* does not exist"):
        models.load_model(str(tmp_path / "x.gguf"))


def test_derive_student_cli(tokenizer, tmp_path):
    src = save_tiny_model(tmp_path / "t", "gpt2", tokenizer, layers=4)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "minillm.cli",
            "derive-student",
            "--teacher",
            str(src),
            "--num-layers",
            "2",
            "--output",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "kept layers [0, 2] of 4" in out.stdout
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "s").config.n_layer == 2


@pytest.mark.slow
def test_embedded_teacher_knows_paris():
    tok = models.load_tokenizer(models.EMBEDDED_ALIAS)
    model = models.load_model(models.EMBEDDED_ALIAS).eval()
    assert (
        model.config.num_hidden_layers == 30
        and len(tok) == 49152
        and tok.pad_token_id == tok.eos_token_id == 2
    )
    ids = tok(build_prompt("What is the capital of France?"), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])


def test_has_dropout_sees_modules_and_config_rates(tokenizer):
    llama = AutoModelForCausalLM.from_config(model_config("llama", len(tokenizer), 1, 32))
    assert not models.has_dropout(llama)  # attention_dropout 0, no Dropout modules
    llama.config.attention_dropout = 0.1  # applied functionally inside attention
    assert models.has_dropout(llama)
    llama.config.attention_dropout = 0.0
    for layer in models.decoder_layers(llama):
        layer.self_attn.attention_dropout = 0.1  # a model built with a rate, its config edited afterwards
    assert models.has_dropout(llama)
    for layer in models.decoder_layers(llama):
        layer.self_attn.attention_dropout = 0.0
    gpt2 = AutoModelForCausalLM.from_config(model_config("gpt2", len(tokenizer), 1, 32))
    assert models.has_dropout(gpt2)  # resid / embd / attn pdrop 0.1 by default
    for m in gpt2.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout"):
        setattr(gpt2.config, key, 0.0)
    assert not models.has_dropout(gpt2)
