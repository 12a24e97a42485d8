"""Configs: every field documented, flags round-trip, bad keys, types and values raise naming the key."""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest

from minillm import config as c


@pytest.mark.parametrize("cls", c.ALL_CONFIGS, ids=lambda k: k.__name__)
def test_every_field_has_help_and_round_trips(cls):
    for f in dataclasses.fields(cls):
        assert len(f.metadata.get("help", "")) > 10, f"{cls.__name__}.{f.name} has no help"
    cfg = cls()
    assert c.parse(cls, None, c.to_argv(cfg)) == cfg


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("lr: 1.0e-4\nbatch_size: 3\nteacher: smollm2-135m-instruct\n")
    cfg = c.parse(c.SFTConfig, str(path), ["--batch_size", "5", "--resume=true"])
    assert (cfg.lr, cfg.batch_size, cfg.teacher, cfg.resume) == (1e-4, 5, "smollm2-135m-instruct", True)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--learning_rate", "1"], "unknown key(s) learning_rate for SFTConfig; valid keys: model, teacher"),
        (["--batch_size", "two"], "batch_size: expected int, got 'two'"),
        (["--batch_size", "2.5"], "batch_size: expected int, got '2.5'"),
        (["--resume", "maybe"], "resume: expected true or false, got 'maybe'"),
        (["--template", "vicuna"], "template must be one of alpaca, chat; got 'vicuna'"),
        (["--batch_size", "0"], "batch_size must be > 0, got 0"),
        (["--max_prompt_length", "600"], "max_prompt_length (600) must be < max_length (512)"),
        (["--lr"], "--lr needs a value"),
        (["lr", "1"], "unexpected argument 'lr'"),
    ],
)
def test_bad_values_raise_with_the_key(argv, message):
    with pytest.raises(c.ConfigError) as e:
        c.parse(c.SFTConfig, None, argv)
    assert message in str(e.value)


def test_yaml_unknown_key_and_wrong_type(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("teacher_mix_alfa: 0.3\n")
    with pytest.raises(c.ConfigError, match="unknown key.*teacher_mix_alfa.*valid keys: .*teacher_mix_alpha"):
        c.parse(c.MiniLLMConfig, str(path))
    path.write_text("single_step: [1]\n")
    with pytest.raises(c.ConfigError, match="single_step: expected true or false"):
        c.parse(c.MiniLLMConfig, str(path))
    with pytest.raises(c.ConfigError, match="does not exist"):
        c.parse(c.MiniLLMConfig, str(tmp_path / "missing.yaml"))


def test_minillm_ranges():
    with pytest.raises(c.ConfigError, match=r"teacher_mix_alpha must be in \[0, 1\], got 1.5"):
        c.MiniLLMConfig(teacher_mix_alpha=1.5)
    with pytest.raises(c.ConfigError, match="whiten must be one of masked, official, off"):
        c.MiniLLMConfig(whiten="yes")


def test_lists_parse_from_commas():
    cfg = c.parse(c.EvalConfig, None, ["--seeds", "10,20", "--sets", "dolly,my.jsonl"])
    assert cfg.seeds == [10, 20] and cfg.sets == ["dolly", "my.jsonl"]


@pytest.mark.parametrize("cls", c.ALL_CONFIGS, ids=lambda k: k.__name__)
def test_every_numeric_field_is_range_checked(cls):
    """Each int/float field names its range, and a value just below it raises naming the field and range."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = {a for a in typing.get_args(tp) if a is not type(None)} or {tp}
        if not inner & {int, float, list[int], list[float]}:
            continue
        bounds = f.metadata.get("bounds")
        assert bounds, f"{cls.__name__}.{f.name} has no bounds"
        op, low = (bounds[0], bounds[1:].split(",")[0]) if bounds[0] in "[(" else bounds.split()
        bad = float(low) - 1 if op in ("[", ">=") else float(low)
        bad = [int(bad)] if typing.get_origin(tp) is list else (int(bad) if int in inner else bad)
        with pytest.raises(c.ConfigError, match=rf"^{f.name} must be (in )?{re.escape(bounds)}, got "):
            c.build(cls, {f.name: bad})
