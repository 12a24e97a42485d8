"""Stage modules import only downward: each of train/{sft,kd,seqkd,gkd,minillm}.py takes its loaders, losses
and loop from the shared modules below it (setup.py, supervised.py, loop.py, engine.py, ...), never from a
sibling stage, so no stage is the others' hidden engine."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

STAGES = ("sft", "kd", "seqkd", "gkd", "minillm")
TRAIN = Path(__file__).resolve().parents[1] / "minillm" / "train"


def imported_train_modules(path: Path) -> set[str]:
    """Names of the `minillm.train` modules `path` imports, however it imports them."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("minillm.train."):
                    found.add(a.name.split(".")[2])
        elif isinstance(node, ast.ImportFrom):
            if node.level > 0 and node.module is None:  # from . import sft
                found |= {a.name for a in node.names}
            elif node.level > 0:  # from .sft import fit
                found.add(node.module.split(".")[0])
            elif node.module == "minillm.train":  # from minillm.train import sft
                found |= {a.name for a in node.names}
            elif node.module and node.module.startswith("minillm.train."):
                found.add(node.module.split(".")[2])
    return found


@pytest.mark.parametrize("stage", STAGES)
def test_stage_imports_no_sibling_stage(stage):
    siblings = imported_train_modules(TRAIN / f"{stage}.py") & (set(STAGES) - {stage})
    assert not siblings, f"minillm/train/{stage}.py imports the stage module(s) {sorted(siblings)}"
