"""The command line: commands listed, generated per-field help, config errors as clean messages, --version,
and `generate`'s first-contact defaults (the model's template and decoding; temperature 0 is greedy)."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

from minillm import cli, models
from minillm import config as config_lib
from minillm.data.template import build_prompt


def test_lists_commands(capsys):
    cli.main(["--help"])
    out = capsys.readouterr().out
    for command in ("sft", "distill", "eval", "derive-student", "generate", "report", "demo"):
        assert f"  {command}" in out


def test_stage_help_is_generated_from_fields(capsys):
    cli.main(["distill", "--help"])
    out = capsys.readouterr().out
    assert "--teacher_mix_alpha float (default 0.2)" in out and "paper and official: 0.2" in out


def test_config_error_exits_with_message(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["sft", "--bogus", "1"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("minillm sft: unknown key(s) bogus for SFTConfig")
    with pytest.raises(SystemExit) as e:
        cli.main(["nope"])
    assert "unknown command 'nope'" in str(e.value)


def test_console_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "minillm.cli", "sft", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--max_prompt_length int (default 256)" in out.stdout


def test_generate_answers_with_a_tiny_model(tiny_llama):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "minillm.cli",
            "generate",
            "--model",
            str(tiny_llama),
            "--prompt",
            "Name a colour.",
            "--prompt",
            "Say hi.",
            "--max-new-tokens",
            "5",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("### ") == 2 and "### Name a colour.\n" in out.stdout


def test_version_comes_from_the_package_metadata(capsys):
    cli.main(["--version"])
    assert capsys.readouterr().out == f"minillm {importlib.metadata.version('minillm')}\n"


CHAT = "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}<bot>"


@pytest.fixture
def chat_model(tmp_path, tiny_llama):
    """tiny_llama whose tokenizer carries a chat template."""
    folder = tmp_path / "chat-model"
    shutil.copytree(tiny_llama, folder)
    tok = models.load_tokenizer(str(folder))
    tok.chat_template = CHAT
    tok.save_pretrained(folder)
    return folder


def greedy_by_argmax(folder: Path, prompt: str, n: int) -> str:
    """n tokens by argmax of full forwards (no cache, no generate), cut at EOS, decoded."""
    tok, model = models.load_tokenizer(str(folder)), models.load_model(str(folder)).eval()
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
    return tok.decode(out, skip_special_tokens=True).strip()


def generate(folder: Path, capsys, *flags: str) -> tuple[str, str]:
    cli.main(["generate", "--model", str(folder), "--prompt", "Say hi.", "--max-new-tokens", "6", *flags])
    out, err = capsys.readouterr()
    return out.split("### Say hi.\n", 1)[1].rstrip("\n"), err.strip().splitlines()[-1]


def test_generate_defaults_to_the_chat_template_and_greedy(chat_model, capsys):
    reply, used = generate(chat_model, capsys)
    assert used == (
        "template chat (the tokenizer's chat template); decoding greedy (the model has no generation config)"
    )
    assert reply == greedy_by_argmax(chat_model, "<user>Say hi.</user><bot>", 6)


def test_generate_follows_the_models_generation_config_and_temperature_0_is_greedy(chat_model, capsys):
    model = models.load_model(str(chat_model))
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.7, top_k=5, top_p=0.9)
    model.save_pretrained(chat_model, safe_serialization=True)
    _, used = generate(chat_model, capsys)
    assert used.endswith(
        "decoding sampling, temperature 0.7, top_p 0.9, top_k 5 (the model's generation config)"
    )
    reply, used = generate(chat_model, capsys, "--temperature", "0", "--template", "alpaca")
    assert used == "template alpaca (as asked); decoding greedy (set by the caller)"
    assert reply == greedy_by_argmax(chat_model, build_prompt("Say hi.", "", "alpaca"), 6)


def test_generate_uses_the_template_a_run_trained_with(chat_model, capsys):
    config_lib.save(config_lib.SFTConfig(template="alpaca"), chat_model / "minillm_config.json")
    _, used = generate(chat_model, capsys)
    assert used.startswith("template alpaca (the template it was trained with)")
