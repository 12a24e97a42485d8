"""Bad input through the command line as a user runs it: one line on stderr naming the place and the fix, exit
status 2 (input) or 1 (runtime), no traceback, and no output folder left by a run refused at start. Then the
runtime edges: non-finite batches skipped and counted, a failed checkpoint write that keeps the previous one.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, stage_config
from test_minillm import minillm_config

from minillm import cli, config, models
from minillm.train import engine, sft


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """`minillm argv`: (exit status, stdout, stderr)."""
    try:
        cli.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code: int, err: str, status: int, *fragments: str) -> str:
    """The run exited with `status` and one `minillm ...:` line holding every fragment; returns that line."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("minillm ")]
    assert code == status and len(lines) == 1, (code, err)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def sft_argv(model: Path, out: Path, train: str = "dolly_valid", **kw) -> list[str]:
    """`minillm sft` flags for a seconds-long run on `train`."""
    base = dict(
        train_data=train, max_train_examples=16, max_valid_examples=4, batch_size=2, max_steps=2, lr=1e-3
    )
    return ["sft", *config.to_argv(stage_config(config.SFTConfig, model, out, **(base | kw)))]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


RECORD = json.dumps({"instruction": "Name a colour.", "input": "", "output": "Blue."})


# --- data ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lines, fragments",
    [
        ([RECORD, '{"instruction": "a", "output": '], [":2: malformed JSON", "fix or delete that line"]),
        (
            [RECORD, json.dumps({"instruction": "a", "output": 5})],
            ["record 2: field 'output' must be a string, got int"],
        ),
        ([], ["is empty: it holds no JSON record"]),
        (
            [json.dumps({"instruction": "word " * 300, "output": "x"})] * 3,
            [
                "no example left of 3 records: 3 have a prompt over max_prompt_length=192",
                "raise max_prompt_length",
            ],
        ),
        (
            [json.dumps({"instruction": "a", "output": " "})] * 2,
            ["no example left of 2 records: 0 have a prompt over", "2 an empty 'output'"],
        ),
    ],
    ids=["malformed", "number", "empty-file", "all-too-long", "all-empty-responses"],
)
def test_bad_data_file_is_one_line(lines, fragments, tiny_llama, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", lines)
    out = tmp_path / "run"
    code, _, err = run(sft_argv(tiny_llama, out, train=str(data)), capsys)
    line = assert_refused(code, err, 2, "minillm sft: ", str(data), *fragments)
    assert line.startswith("minillm sft: ")
    assert not out.exists()


def test_empty_responses_are_dropped_and_counted(tiny_llama, tmp_path, capsys):
    good = [json.dumps({"instruction": f"Name colour {i}.", "output": "Blue."}) for i in range(4)]
    empty = [json.dumps({"instruction": "Say nothing.", "output": ""})] * 2
    data = write_jsonl(tmp_path / "data.jsonl", good + empty)
    code, out, err = run(sft_argv(tiny_llama, tmp_path / "run", train=str(data), max_steps=1), capsys)
    assert code == 0, err
    assert f"{data}: 4 examples, 0 dropped (prompt > 192 tokens), 2 dropped (empty 'output')" in out


# --- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, flags, message",
    [
        ("sft", ["--lr", "-1"], "lr must be > 0, got -1.0"),
        ("sft", ["--batch_size", "0"], "batch_size must be > 0, got 0"),
        ("sft", ["--chunk_size", "0"], "chunk_size must be > 0, got 0"),
        ("sft", ["--epochs", "0"], "epochs must be > 0, got 0"),
        ("sft", ["--warmup_steps", "-1"], "warmup_steps must be >= 0, got -1"),
        ("sft", ["--eval_every", "-1"], "eval_every must be >= 0, got -1"),
        ("sft", ["--save_every", "-5"], "save_every must be >= 0, got -5"),
        ("sft", ["--keep_last", "0"], "keep_last must be > 0, got 0"),
        ("sft", ["--log_every", "0"], "log_every must be > 0, got 0"),
        ("sft", ["--max_grad_norm", "-1"], "max_grad_norm must be >= 0, got -1.0"),
        ("sft", ["--adam_beta2", "1"], "adam_beta2 must be in [0, 1), got 1.0"),
        ("sft", ["--lr", "nan"], "lr must be > 0, got nan"),
        ("distill", ["--max_new_tokens", "0"], "max_new_tokens must be > 0, got 0"),
        ("distill", ["--sample_temperature", "0"], "sample_temperature must be > 0, got 0.0"),
        ("distill", ["--reward_clip", "0"], "reward_clip must be > 0, got 0.0"),
        ("kd", ["--loss_temperature", "0"], "loss_temperature must be > 0, got 0.0"),
        ("gkd", ["--lmbda", "2"], "lmbda must be in [0, 1], got 2.0"),
        ("eval", ["--top_k", "-1"], "top_k must be >= 0, got -1"),
        ("eval", ["--seeds", "10,-1"], "seeds must be >= 0, got -1"),
    ],
)
def test_out_of_range_value_is_one_line(command, flags, message, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run([command, "--output_dir", str(out), *flags], capsys)
    assert_refused(code, err, 2, f"minillm {command}: {message}")
    assert not out.exists()


def test_config_file_that_is_not_yaml(tmp_path, capsys):
    bad = tmp_path / "notes.yaml"
    bad.write_text("lr: [1,\nfoo: {\n")
    code, _, err = run(["sft", "--config", str(bad), "--output_dir", str(tmp_path / "run")], capsys)
    assert_refused(code, err, 2, f"{bad} is not a YAML file at line 3", "--config takes a YAML mapping")
    assert not (tmp_path / "run").exists()


# --- models ---------------------------------------------------------------------------------------


def test_model_that_is_neither_folder_nor_hub_id(tmp_path, capsys):
    code, _, err = run(sft_argv(Path("/no/such/folder"), tmp_path / "run"), capsys)
    assert_refused(code, err, 2, "model '/no/such/folder' is neither a folder nor a hub id")
    assert not (tmp_path / "run").exists()


def test_missing_folder_under_a_local_folder_is_not_looked_up_on_the_hub(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    code, _, err = run(sft_argv(Path("runs/student-init"), tmp_path / "run"), capsys)
    assert_refused(code, err, 2, "model folder runs/student-init does not exist (its parent runs does")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("weights", ["pytorch_model.bin", None])
def test_model_folder_without_safetensors(weights, tiny_llama, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    if weights:
        (folder / weights).write_bytes(b"never unpickled")
    code, _, err = run(sft_argv(folder, tmp_path / "run"), capsys)
    found = "only pytorch_model.bin (pickle)" if weights else "no weights"
    assert_refused(code, err, 2, f"model folder {folder} holds {found}", "reads safetensors weights only")
    assert not (tmp_path / "run").exists()


# --- output folders -------------------------------------------------------------------------------


def test_resume_on_another_stage_or_a_finished_run(tiny_llama, teacher, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(sft_argv(tiny_llama, out, max_steps=1), capsys)
    assert code == 0, err
    before = sorted(p.name for p in out.iterdir())

    kd = sft_argv(tiny_llama, out, max_steps=1, resume=True) + ["--teacher", str(teacher)]
    code, _, err = run(["kd", *kd[1:]], capsys)
    assert_refused(
        code,
        err,
        2,
        f"output_dir {out} holds a `minillm sft` run",
        "records stage SFTConfig",
        "resume it with `minillm sft` or give this run another output_dir",
    )
    assert sorted(p.name for p in out.iterdir()) == before  # the other run is left as it was

    code, stdout, err = run(sft_argv(tiny_llama, out, max_steps=1, resume=True), capsys)
    assert code == 0, err
    assert f"{out} holds a finished run (1 of 1 steps): nothing to train" in stdout


def test_restart_before_the_first_checkpoint_logs_one_run(tiny_llama, tmp_path, capsys):
    """An attempt killed before its first checkpoint leaves its log lines; the rerun, which starts afresh,
    must not append to them (step 0 twice, and steps whose weights no checkpoint holds)."""
    out = tmp_path / "run"
    out.mkdir()
    stale = [{"step": 0, "valid/loss": 9.0}, {"step": 1, "loss": 9.0}]
    write_jsonl(out / "metrics.jsonl", [json.dumps(m) for m in stale])
    code, _, err = run(sft_argv(tiny_llama, out, max_steps=2, resume=True), capsys)
    assert code == 0, err
    logged = read_metrics(out)
    assert not [m for m in logged if m in stale]
    assert [m["step"] for m in logged if "loss" in m] == [1, 2]
    assert len([m for m in logged if m["step"] == 0]) == 1


# --- runtime: non-finite batches, failed checkpoint writes ----------------------------------------


def nan_on_training_calls(monkeypatch, bad: set[int]) -> None:
    """sft's loss is NaN on the training calls numbered in `bad` (1-based); validation stays finite."""
    real, calls = sft.ce_loss_sum, [0]

    def loss(model, batch, chunk_size):
        value = real(model, batch, chunk_size)
        if model.training:
            calls[0] += 1
            if calls[0] in bad:
                return value * float("nan")
        return value

    monkeypatch.setattr(sft, "ce_loss_sum", loss)


def test_non_finite_batch_is_skipped_and_counted(tiny_llama, tmp_path, capsys, monkeypatch):
    nan_on_training_calls(monkeypatch, {2})
    out = tmp_path / "run"
    code, _, err = run(sft_argv(tiny_llama, out, max_steps=4, save_every=1, keep_last=4), capsys)
    assert code == 0, err
    lines = {m["step"]: m for m in read_metrics(out)}
    assert [lines[s]["skipped"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    assert math.isnan(lines[2]["loss"]) and math.isnan(lines[2]["grad_norm"])
    # the skipped step left the weights as they were
    w1, w2 = (models.load_model(str(out / f"ckpt-{s}")).state_dict() for s in (1, 2))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert all(torch.isfinite(v).all() for v in models.load_model(str(out / "ckpt-4")).state_dict().values())


def test_non_finite_in_a_row_stops_the_run(tiny_llama, tmp_path, capsys, monkeypatch):
    nan_on_training_calls(monkeypatch, set(range(1, 100)))
    code, _, err = run(sft_argv(tiny_llama, tmp_path / "run", max_steps=5), capsys)
    assert_refused(code, err, 1, "minillm sft: steps 1 to 3 had a non-finite loss or gradient, 3 in a row")


def test_non_finite_rewards_stop_minillm(tiny_llama, teacher, tmp_path, capsys, monkeypatch):
    from minillm.objectives import policy

    real = policy.token_rewards
    monkeypatch.setattr(policy, "token_rewards", lambda *a, **k: real(*a, **k) * float("nan"))
    data = write_jsonl(
        tmp_path / "prompts.jsonl",
        [json.dumps({"instruction": f"Name colour {i}.", "output": "Blue."}) for i in range(8)],
    )
    cfg = minillm_config(
        tiny_llama,
        teacher,
        data,
        tmp_path / "run",
        num_rollouts=4,
        batch_size=2,
        max_steps=4,
        max_valid_examples=2,
    )
    code, _, err = run(["distill", *config.to_argv(cfg)], capsys)
    assert_refused(code, err, 1, "minillm distill: steps 1 to 3 had a non-finite loss or gradient")
    skipped = [m["skipped"] for m in read_metrics(tmp_path / "run") if "skipped" in m]
    assert skipped == [1.0, 2.0]  # the third is the error


def test_failed_checkpoint_write_keeps_the_previous_one(tiny_llama, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real = torch.save

    def save(obj, path, *a, **k):
        if ".ckpt-2.tmp" in str(path):
            raise OSError(28, "No space left on device")
        return real(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    code, _, err = run(sft_argv(tiny_llama, out, max_steps=3, save_every=1), capsys)
    assert_refused(
        code,
        err,
        1,
        f"writing checkpoint {out / 'ckpt-2'} failed",
        "No space left on device",
        "still names the previous checkpoint",
    )
    assert engine.latest_checkpoint(str(out)) == out / "ckpt-1"
    assert not list(out.glob(".ckpt-*"))  # the partial copy is gone
    models.load_model(str(out / "ckpt-1"))

    monkeypatch.setattr(torch, "save", real)  # the disk has room again: the run resumes from step 1
    code, _, err = run(sft_argv(tiny_llama, out, max_steps=3, save_every=1, resume=True), capsys)
    assert code == 0, err
    assert [m["step"] for m in read_metrics(out)] == [0, 1, 2, 3]


# --- the real entry point -------------------------------------------------------------------------


def test_console_prints_one_line_and_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("{")
    argv = [sys.executable, "-m", "minillm.cli", "sft", "--config", str(bad)]
    plain = subprocess.run(argv, capture_output=True, text=True)
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == [
        f"minillm sft: {bad} is not a YAML file at line 1, column 2; "
        "--config takes a YAML mapping of field: value"
    ]
    debug = subprocess.run(argv + ["--debug"], capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_every_stage_names_its_progress_bar():
    for command, (cls_name, _, _) in cli.STAGE_COMMANDS.items():
        cls = getattr(config, cls_name)
        if issubclass(cls, config.TrainConfig):
            cfg = cls(output_dir="/nonexistent/never-created")
            assert cfg.command == command
            log = engine.MetricsLog(engine.make_accelerator(cfg), cfg, total=2, start=0)
            assert log.bar.desc == command
            log.bar.close()
            assert not Path(cfg.output_dir).exists()


def test_eval_with_a_bad_set_leaves_no_folder(tiny_llama, tmp_path, capsys):
    """`minillm eval` reads every set before it creates its output folder."""
    bad = write_jsonl(tmp_path / "bad.jsonl", [RECORD, '{"instruction": "a", "output": '])
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(tiny_llama), "--sets", str(bad), "--seeds", "10", "--output_dir", str(out)]
    code, _, err = run(argv, capsys)
    assert_refused(code, err, 2, "bad.jsonl:2: malformed JSON")
    assert not out.exists()
