"""`minillm experiment`: a comparison run as an ordered plan of minillm commands, resumable piece by piece.

A plan (YAML, e.g. configs/experiments/comparison.yaml) lists runs in order; each names a minillm command, a
recipe file and flags. `minillm experiment --plan FILE` runs every run that is not done yet, each in its own
process (`python -m minillm.cli ...`, so one run's memory never weighs on the next), logging to
`<root>/logs/NAME.log`. A run is done once its command exited 0: `<root>/done/NAME` then records the
command, the wall and CPU time it took and when. Training stages are started with `--resume true`, so a run
killed midway (or a machine that stopped) continues from its last checkpoint when the plan is run again;
evaluation skips the generations it already wrote. Deleting `<root>` starts the whole comparison afresh.

What each run cost is kept per attempt in `<root>/time/NAME.json` (wall and CPU seconds, updated every
minute while it runs, so a stopped machine loses at most a minute of the account); the done marker sums the
attempts. `minillm experiment --costs FILE` writes every run's totals with the tokens it trained on and, for
on-policy stages, sampled (from its metrics.jsonl) into one JSON file that `minillm report` tabulates.

Plan format:
    root: runs/exp                  # done markers and logs
    runs:
      - name: teacher-sft           # unique; --only picks runs by name
        command: sft                # any minillm command
        config: configs/experiments/teacher-sft.yaml   # optional recipe (--config)
        args: {lr: 2.0e-5}          # optional flags after the recipe, as --key value; or a list, as it is
        resume: true                # default: true for training stages, false otherwise
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
import yaml

from minillm.errors import InputError

TRAINING = {"sft", "kd", "seqkd", "gkd", "distill"}
BOOKKEEPING = {"publish", "experiment", "report"}  # no cost of the comparison: left out of `costs`
POLL_SECONDS = 60.0


@dataclass
class Run:
    name: str
    command: str
    config: str | None = None
    args: dict[str, Any] | list[str] = field(default_factory=dict)
    resume: bool | None = None

    def argv(self) -> list[str]:
        """The `minillm` arguments of this run: a dict of args as `--key value` flags, a list as it is."""
        out = [self.command] + (["--config", self.config] if self.config else [])
        if isinstance(self.args, list):
            out += [str(a) for a in self.args]
        for key, value in self.args.items() if isinstance(self.args, dict) else ():
            out += [f"--{key}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
        resume = self.command in TRAINING if self.resume is None else self.resume
        return out + (["--resume", "true"] if resume else [])


def load_plan(path: str) -> tuple[Path, list[Run]]:
    """The plan's root folder and its runs, checked (unique names, known keys, recipe files present)."""
    if not Path(path).is_file():
        raise InputError(f"plan {path} does not exist")
    plan = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(plan, dict) or not isinstance(plan.get("runs"), list):
        raise InputError(f"{path}: expected a mapping with a list under 'runs'")
    runs = []
    for i, item in enumerate(plan["runs"], 1):
        unknown = set(item) - {"name", "command", "config", "args", "resume"}
        if unknown or not {"name", "command"} <= set(item):
            raise InputError(
                f"{path}: run {i} needs name and command, and takes config, args, resume; got {item}"
            )
        run = Run(**item)
        if run.config and not Path(run.config).is_file():
            raise InputError(f"{path}: run {run.name} names recipe {run.config}, which does not exist")
        runs.append(run)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise InputError(f"{path}: run names must be unique, got {names}")
    return Path(plan.get("root", "runs/exp")), runs


def run_plan(plan: str, only: list[str] | None = None, dry_run: bool = False) -> None:
    root, runs = load_plan(plan)
    unknown = set(only or []) - {r.name for r in runs}
    if unknown:
        raise InputError(f"--only names no run of {plan}: {', '.join(sorted(unknown))}")
    (root / "done").mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    for run in runs:
        if only and run.name not in only:
            continue
        marker = root / "done" / run.name
        cmd = [sys.executable, "-m", "minillm.cli", *run.argv()]
        if marker.is_file():
            print(f"[done] {run.name}")
            continue
        print(f"[run]  {run.name}: minillm {shlex.join(run.argv())}", flush=True)
        if dry_run:
            continue
        attempts = _attempt(cmd, root / "logs" / f"{run.name}.log", root / "time" / f"{run.name}.json")
        if attempts[-1]["exit"] != 0:
            raise ChildProcessError(
                f"run {run.name} exited {attempts[-1]['exit']}; see {root / 'logs' / f'{run.name}.log'}"
            )
        record = {
            "command": ["minillm", *run.argv()],
            "wall_seconds": sum(a["wall_seconds"] for a in attempts),
            "cpu_seconds": sum(a["cpu_seconds"] for a in attempts),
            "attempts": len(attempts),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        _write_json(marker, record)
        print(f"[done] {run.name} in {attempts[-1]['wall_seconds'] / 60:.1f} min", flush=True)


def _attempt(cmd: list[str], log_path: Path, record_path: Path, poll: float = POLL_SECONDS) -> list[dict]:
    """Run `cmd`, appending to `log_path`; every `poll` seconds and at its end, this attempt's wall and CPU
    time (the process and its descendants) are written into the attempts list at `record_path`."""
    record_path.parent.mkdir(exist_ok=True)
    attempts = json.loads(record_path.read_text()) if record_path.is_file() else []
    now = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "exit": None}
    attempts.append(now)
    t0, cpu0 = time.time(), _reaped_cpu()
    with log_path.open("a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        while True:
            try:
                now["exit"] = proc.wait(timeout=poll)
            except subprocess.TimeoutExpired:
                now |= {"wall_seconds": time.time() - t0, "cpu_seconds": _live_cpu(proc.pid)}
                _write_json(record_path, attempts)
                continue
            break
    # once reaped, the kernel's account of the child and everything it waited for is exact
    now |= {"wall_seconds": time.time() - t0, "cpu_seconds": _reaped_cpu() - cpu0}
    _write_json(record_path, attempts)
    return attempts


def _reaped_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _live_cpu(pid: int) -> float:
    """CPU seconds of a running process, its live descendants and the descendants it has reaped."""
    try:
        proc = psutil.Process(pid)
        total = sum(proc.cpu_times()[:4])  # user, system, children_user, children_system
        for child in proc.children(recursive=True):
            total += sum(child.cpu_times()[:4])
    except psutil.Error:  # it ended between the poll and now: the final account follows
        return 0.0
    return total


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def costs(plan: str) -> dict[str, Any]:
    """Every run's wall and CPU seconds over its attempts, and for training stages the optimizer steps, the
    tokens trained on and the tokens sampled on-policy (from the run's metrics.jsonl). The plan's own
    bookkeeping (publish, costs, report) is left out."""
    from minillm import config as config_lib
    from minillm.cli import STAGE_COMMANDS

    root, runs = load_plan(plan)
    out = []
    for run in runs:
        if run.command in BOOKKEEPING:
            continue
        path = root / "time" / f"{run.name}.json"
        attempts = json.loads(path.read_text()) if path.is_file() else []
        entry: dict[str, Any] = {
            "name": run.name,
            "command": ["minillm", *run.argv()],
            "done": (root / "done" / run.name).is_file(),
            "attempts": len(attempts),
            "wall_seconds": sum(a.get("wall_seconds", 0.0) for a in attempts),
            "cpu_seconds": sum(a.get("cpu_seconds", 0.0) for a in attempts),
        }
        if run.command in TRAINING:
            argv = run.argv()[1:]
            flags = [
                a for i, a in enumerate(argv) if a != "--config" and (i == 0 or argv[i - 1] != "--config")
            ]
            cls = getattr(config_lib, STAGE_COMMANDS[run.command][0])
            cfg = config_lib.parse(cls, run.config, flags)
            entry |= _token_counts(Path(cfg.output_dir) / "metrics.jsonl")
        out.append(entry)
    return {"kind": "costs", "plan": plan, "runs": out}


def _token_counts(metrics: Path) -> dict[str, Any]:
    """Steps, trained and sampled tokens in a metrics.jsonl; a step logged twice (a resumed run) counts once."""
    by_step: dict[int, dict[str, Any]] = {}
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if row.get("step", 0) > 0:
                by_step[row["step"]] = row
    return {
        "steps": max(by_step, default=0),
        "tokens_trained": sum(r.get("tokens", 0) for r in by_step.values()),
        "tokens_sampled": sum(r.get("tokens/sampled", 0) for r in by_step.values()),
    }


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="minillm experiment", description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", default="configs/experiments/comparison.yaml", help="The plan (YAML).")
    p.add_argument("--only", default=None, help="Comma-separated run names: run just these (in plan order).")
    p.add_argument("--dry-run", action="store_true", help="Print what would run, run nothing.")
    p.add_argument(
        "--costs",
        default=None,
        help="Write every run's time and tokens so far into this JSON file, run nothing.",
    )
    args = p.parse_args(argv)
    if args.costs:
        Path(args.costs).parent.mkdir(parents=True, exist_ok=True)
        _write_json(Path(args.costs), costs(args.plan))
        return
    run_plan(args.plan, args.only.split(",") if args.only else None, args.dry_run)
