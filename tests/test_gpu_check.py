"""bench/gpu_check.py, the GPU check of every stage, runs here on tiny shapes on the CPU and prints its
tables: each stage's 3 steps with their phases, and MiniLLM's figures against the design's targets."""

from __future__ import annotations

import importlib
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_gpu_check_runs_every_stage_tiny_on_cpu(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # bench/ holds scripts, not a package
    gpu_check = importlib.import_module("gpu_check")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the script sets it for --device cpu; restored after
    gpu_check.main(["--device", "cpu", "--tiny"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    phases = {(r[0].strip("| "), r[1], r[2]) for r in rows if r[1].isdigit()}
    want = {(s, str(k), "update") for s in ("sft", "kd", "seqkd", "gkd", "minillm") for k in (1, 2, 3)}
    want |= {("seqkd", "0", "teacher answers")} | {("gkd", str(k), "sampling") for k in (1, 2, 3)}
    want |= {("minillm", str(k), p) for k in (1, 2, 3) for p in ("mixed sampling", "teacher pass")}
    assert phases == want
    walls = [r[0].strip("| ") for r in rows if len(r) == 2][1:]  # after the header
    assert walls == [
        "random models and data",
        "sft",
        "kd",
        "seqkd",
        "gkd",
        "minillm",
        "all (budget on one H100: 480)",
    ]
    figures = [
        r[0].strip("| ") for r in rows if r[-1].strip(" |") == "n/a"
    ]  # targets hold at full shape only
    assert figures == [
        "full iteration (sampling + teacher + update)",
        "mixed sampling (α = 0.2, both KV caches)",
        "peak memory",
    ]
