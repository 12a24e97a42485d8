"""The command line: commands listed, generated per-field help, config errors as clean messages."""

from __future__ import annotations

import subprocess
import sys

import pytest

from minillm import cli


def test_lists_commands(capsys):
    cli.main(["--help"])
    out = capsys.readouterr().out
    for command in ("sft", "distill", "eval", "derive-student", "generate", "report", "demo"):
        assert f"  {command}" in out


def test_stage_help_is_generated_from_fields(capsys):
    cli.main(["distill", "--help"])
    out = capsys.readouterr().out
    assert "--teacher_mix_alpha float (default 0.2)" in out and "paper and official: 0.2" in out


def test_config_error_exits_with_message():
    with pytest.raises(SystemExit) as e:
        cli.main(["sft", "--bogus", "1"])
    assert "minillm sft: unknown key(s) bogus for SFTConfig" in str(e.value)
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
