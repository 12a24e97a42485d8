"""`minillm experiment`: a comparison run as an ordered plan of minillm commands, resumable piece by piece.

A plan (YAML, e.g. configs/experiments/comparison.yaml) lists runs in order; each names a minillm command, a
recipe file and flags. `minillm experiment --plan FILE` runs every run that is not done yet, each in its own
process (`python -m minillm.cli ...`, so one run's memory never weighs on the next), logging to
`<root>/logs/NAME.log`. A run is done once its command exited 0: `<root>/done/NAME` then records the
command, the wall and CPU time it took and when. Training stages are started with `--resume true`, so a run
killed midway (or a machine that stopped) continues from its last checkpoint when the plan is run again;
evaluation skips the generations it already wrote. Deleting `<root>` starts the whole comparison afresh.

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

import yaml

from minillm.errors import InputError

TRAINING = {"sft", "kd", "seqkd", "gkd", "distill"}


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
        t0, cpu0 = time.time(), _children_cpu()
        with (root / "logs" / f"{run.name}.log").open("a") as log:
            code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
        if code != 0:
            raise ChildProcessError(f"run {run.name} exited {code}; see {root / 'logs' / f'{run.name}.log'}")
        record = {
            "command": ["minillm", *run.argv()],
            "wall_seconds": time.time() - t0,
            "cpu_seconds": _children_cpu() - cpu0,  # this piece only: a resumed run adds what it ran now
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        marker.write_text(json.dumps(record, indent=2))
        print(f"[done] {run.name} in {record['wall_seconds'] / 60:.1f} min", flush=True)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="minillm experiment", description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", default="configs/experiments/comparison.yaml", help="The plan (YAML).")
    p.add_argument("--only", default=None, help="Comma-separated run names: run just these (in plan order).")
    p.add_argument("--dry-run", action="store_true", help="Print what would run, run nothing.")
    args = p.parse_args(argv)
    run_plan(args.plan, args.only.split(",") if args.only else None, args.dry_run)
