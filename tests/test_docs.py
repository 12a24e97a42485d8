"""The README is true: every `minillm` command in its code blocks runs, and every config file parses.

The commands run in the README's order through `minillm.cli.main`, in a temp folder that holds `configs/`,
so each stage reads what the one before it wrote (`runs/student-init`, `runs/sft/best`, ...). Two things
make that take seconds: the embedded teacher's alias is replaced by a tiny random Llama (30 layers, as the
real one, so the README's cut works on it), and flags appended after the README's own shrink every
workload (one optimizer step, a few examples, a few new tokens). Flags override the YAML file, so the
file's keys, types and values are still parsed and validated. `make` targets are checked to exist.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
from conftest import save_tiny_model

from minillm import cli
from minillm import config as config_lib
from minillm.models import EMBEDDED_ALIAS

ROOT = Path(__file__).resolve().parents[1]

# Appended to a stage's flags when its config has the field: one step on a handful of short examples.
TINY = {
    "max_steps": 1,
    "max_train_examples": 4,
    "max_valid_examples": 2,
    "batch_size": 2,
    "grad_accum": 1,
    "warmup_steps": 0,
    "eval_every": 0,
    "save_every": 0,
    "chunk_size": 64,
    "num_rollouts": 2,
    "ppo_epochs": 1,
    "pt_block_length": 32,
    "max_new_tokens": 4,
    "valid_max_new_tokens": 4,
    "sample_batch_size": 2,
    "max_per_set": 3,
    "max_prompts": 2,
    "samples_per_prompt": 1,
    "max_examples": 4,
}
TOOL_TINY = {
    "generate": ["--max-new-tokens", "4"],
    "derive-student": ["--heal-steps", "2", "--heal-batch-size", "2", "--heal-block-length", "32"],
}


def readme_commands() -> list[str]:
    """Every line of a fenced code block in README.md that starts with `minillm ` (comments stripped)."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [shlex.split(line, comments=True) for line in lines if line.startswith("minillm ")]


def readme_make_targets() -> list[str]:
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)
    return [line.split()[1] for block in blocks for line in block.splitlines() if line.startswith("make ")]


def shrink(argv: list[str], teacher: Path) -> list[str]:
    """The README command with the embedded alias replaced by `teacher` and tiny workloads appended."""
    argv = [str(teacher) if a == EMBEDDED_ALIAS else a for a in argv]
    command, rest = argv[0], argv[1:]
    if "--help" in rest or "-h" in rest:
        return argv
    if command not in cli.STAGE_COMMANDS:
        return argv + TOOL_TINY.get(command, [])
    cls = getattr(config_lib, cli.STAGE_COMMANDS[command][0])
    config_file = rest[rest.index("--config") + 1] if "--config" in rest else None
    flags = [a for i, a in enumerate(rest) if a != "--config" and (i == 0 or rest[i - 1] != "--config")]
    cfg = config_lib.parse(cls, config_file, flags)
    fields = config_lib.to_dict(cfg)
    extra = {k: v for k, v in TINY.items() if k in fields}
    extra |= {k: str(teacher) for k, v in fields.items() if v == EMBEDDED_ALIAS}  # a YAML or default alias
    return argv + [x for k, v in extra.items() for x in (f"--{k}", str(v))]


def test_readme_names_commands_and_targets_that_exist():
    commands = readme_commands()
    names = {argv[1] for argv in commands if not argv[1].startswith("-")}  # not --help, --version
    assert {"derive-student", "sft", "distill", "kd", "seqkd", "gkd", "eval", "report", "generate"} <= names
    assert names <= set(cli.STAGE_COMMANDS) | set(cli.TOOL_COMMANDS)
    for argv in commands:
        if "--config" in argv:
            assert (ROOT / argv[argv.index("--config") + 1]).is_file(), " ".join(argv)
    makefile = (ROOT / "Makefile").read_text()
    for target in readme_make_targets():
        assert re.search(rf"^{target}:", makefile, flags=re.M), f"make {target}: no such target"


# Stage configs only: configs/accelerate/ holds accelerate's own launch files.
STAGE_CONFIGS = sorted(
    p.relative_to(ROOT).as_posix() for d in ("configs", "configs/demo") for p in (ROOT / d).glob("*.yaml")
)


@pytest.mark.parametrize("path", STAGE_CONFIGS)
def test_every_config_file_parses_and_says_what_it_runs(path):
    text = (ROOT / path).read_text()
    assert text.startswith("# "), f"{path} must open with a comment saying what it runs"
    run = re.search(r"`minillm ([a-z-]+) --config ([^ `]+)", text)
    if run is None:  # the demo's own files are run by `minillm demo`
        assert path.startswith("configs/demo/") and "make demo" in text, path
        command = {"sft": "sft", "distill": "distill"}[Path(path).stem]
    else:
        command, named = run.groups()
        assert named == path, f"{path} says it runs {named}"
    config_lib.parse(getattr(config_lib, cli.STAGE_COMMANDS[command][0]), str(ROOT / path))


def test_readme_commands_run(tmp_path, monkeypatch, tokenizer):
    teacher = save_tiny_model(tmp_path / "teacher", "llama", tokenizer, layers=30, hidden=32, seed=1)
    work = tmp_path / "work"
    shutil.copytree(ROOT / "configs", work / "configs")
    # What `make demo` leaves behind, for the commands that continue from it.
    save_tiny_model(work / "runs/demo/sft/best", "llama", tokenizer, layers=2, hidden=32)
    monkeypatch.chdir(work)
    for argv in readme_commands():
        try:
            cli.main(shrink(argv[1:], teacher))
        except SystemExit as e:  # argparse's --help and --version exit 0
            if e.code not in (0, None):
                pytest.fail(f"README command failed: {shlex.join(argv)}\n{e}")
        except config_lib.ConfigError as e:
            pytest.fail(f"README command failed: {shlex.join(argv)}\n{e}")
