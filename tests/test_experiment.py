"""`minillm experiment`: the shipped comparison plan is valid, and a plan runs in order, skips what is done and
stops on a failing run."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from minillm import config as config_lib
from minillm.cli import STAGE_COMMANDS, main
from minillm.experiment import _attempt, load_plan, run_plan


def test_shipped_plan_parses_every_recipe():
    root, runs = load_plan("configs/experiments/comparison.yaml")
    assert str(root) == "runs/exp"
    names = [r.name for r in runs]
    assert names.index("teacher-sft") < names.index("kd") and names[-1] == "report"
    for run in runs:
        if run.command in STAGE_COMMANDS:  # the recipe and flags as the command will read them
            argv = run.argv()[1:]
            i = argv.index("--config") if "--config" in argv else None
            cfg_file = argv[i + 1] if i is not None else None
            flags = argv[:i] + argv[i + 2 :] if i is not None else argv
            cls = getattr(config_lib, STAGE_COMMANDS[run.command][0])
            config_lib.parse(cls, cfg_file, flags)

    def folder(argv: list[str]) -> str:  # evaluations write into output_dir/<name>
        out = argv[argv.index("--output_dir") + 1]
        return f"{out}/{argv[argv.index('--name') + 1]}" if "--name" in argv else out

    outputs = [folder(r.argv()) for r in runs if "--output_dir" in r.argv()]
    assert len(outputs) == len(set(outputs))  # ablations never share a folder with the full method


def test_plan_runs_in_order_skips_done_and_stops_on_failure(teacher, tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    student = tmp_path / "student"
    plan.write_text(
        yaml.safe_dump(
            {
                "root": str(tmp_path / "exp"),
                "runs": [
                    {
                        "name": "cut",
                        "command": "derive-student",
                        "args": ["--teacher", str(teacher), "--layers", "0,2", "--output", str(student)],
                    },
                    {
                        "name": "broken",
                        "command": "sft",
                        "args": {"model": str(tmp_path / "nothing"), "output_dir": str(tmp_path / "sft")},
                    },
                    {"name": "costs", "command": "experiment", "args": ["--plan", "p", "--costs", "c"]},
                ],
            }
        )
    )
    with pytest.raises(SystemExit) as e:
        main(["experiment", "--plan", str(plan)])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "run broken exited 2" in err and "broken.log" in err
    done = json.loads((tmp_path / "exp" / "done" / "cut").read_text())
    assert done["command"][:2] == ["minillm", "derive-student"] and done["wall_seconds"] > 0
    assert (student / "model.safetensors").is_file()
    assert not (tmp_path / "exp" / "done" / "broken").exists()

    mtime = (student / "model.safetensors").stat().st_mtime
    run_plan(str(plan), only=["cut"])  # done: skipped
    assert (student / "model.safetensors").stat().st_mtime == mtime
    assert "[done] cut" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--only names no run"):
        run_plan(str(plan), only=["nope"])

    # the cost account: every attempt, failed ones too; tokens from metrics.jsonl, a re-logged step once
    (tmp_path / "sft").mkdir()
    rows = [{"step": 0, "valid/loss": 3.0}, {"step": 1, "tokens": 10}, {"step": 2, "tokens": 20}]
    rows += [{"step": 2, "tokens": 20}, {"step": 3, "tokens": 5, "tokens/sampled": 7}]  # resumed at step 1
    (tmp_path / "sft" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["experiment", "--plan", str(plan), "--costs", str(tmp_path / "costs.json")])
    cut, broken = json.loads((tmp_path / "costs.json").read_text())["runs"]  # not the costs run itself
    assert cut["done"] and cut["attempts"] == 1 and cut["wall_seconds"] == pytest.approx(done["wall_seconds"])
    assert "steps" not in cut  # not a training stage
    assert not broken["done"] and broken["attempts"] == 1 and broken["cpu_seconds"] > 0
    assert (broken["steps"], broken["tokens_trained"], broken["tokens_sampled"]) == (3, 35, 7)


def test_an_attempt_is_accounted_while_it_runs(tmp_path):
    """What a machine that stops mid-run leaves: the running attempt's wall and CPU time as of the last poll."""
    record = tmp_path / "time" / "x.json"
    burn = (
        "import time; t = time.process_time()\n"
        "while time.process_time() - t < 0.5: pass\n"
        f"time.sleep(0.3); print(open({str(record)!r}).read())"
    )
    attempts = _attempt([sys.executable, "-c", burn], tmp_path / "x.log", record, poll=0.1)
    seen = json.loads((tmp_path / "x.log").read_text())[-1]  # the record as the child saw it, mid-run
    assert seen["exit"] is None and seen["cpu_seconds"] > 0.4 and seen["wall_seconds"] > 0.4
    assert attempts[-1]["exit"] == 0 and attempts[-1]["cpu_seconds"] >= seen["cpu_seconds"]
    assert json.loads(record.read_text()) == attempts
