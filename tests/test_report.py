"""`minillm report` on hand-made run folders: the table's numbers, bold, deltas, CSV and plots."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest

from minillm.config import CalibrationConfig, EvalConfig, ExposureConfig
from minillm.evaluate import protocol
from minillm.report import make_report

# per-set, per-seed Rouge-L (seeds 10, 20) of three models
SCORES = {
    "runs_sft": {"dolly": (20.0, 22.0), "sni": (30.0, 30.0)},
    "runs_kd": {"dolly": (23.0, 25.0), "sni": (28.0, 30.0)},
    "runs_minillm": {"dolly": (26.0, 26.0), "sni": (31.0, 33.0)},
}


def write_eval(root: Path, name: str) -> None:
    """A results.json made by protocol.summarise from generation lines with chosen scores.

    Each set has two prompts: x (gold 3 tokens, bucket [0,5]) scores v - 5 and y (gold 20 tokens, [11,inf))
    scores v + 5, so the per-seed mean is v."""
    cfg = EvalConfig(model=f"runs/{name.removeprefix('runs_')}", sets=["dolly", "sni"], seeds=[10, 20])
    sets = {}
    for set_name, per_seed in SCORES[name].items():
        items = [protocol.Item("x", "p", [1], ["r"], 3, {}), protocol.Item("y", "p", [1], ["r"], 20, {})]
        es = protocol.EvalSet(set_name, set_name, "sha256:feedfacecafebeef", 2, 0, items)
        rows = {}
        for seed, v in zip((10, 20), per_seed, strict=True):
            for it, score in ((items[0], v - 5), (items[1], v + 5)):
                rows[(set_name, it.id, seed)] = {
                    "score": score,
                    "output": "a b c d e",
                    "new_tokens": 5 if it is items[0] else 20,
                    "finished": it is items[0],  # y ran into the token cap
                }
        sets[set_name] = protocol.summarise(es, rows, cfg.seeds) | {
            "lm_loss": 2.0,
            "lm_loss_per_example": 2.1,
            "lm_tokens": 40,
        }
    out = root / name
    out.mkdir(parents=True)
    results = {
        "kind": "eval",
        "name": name,
        "model": cfg.model,
        "config": dataclasses.asdict(cfg),
        "sets": sets,
        "timing": {
            "generated_prompts": 8,
            "generated_tokens": 40,
            "generate_seconds": 4.0,
            "seconds_per_100_prompts": 50.0,
        },
        "environment": {
            "code_revision": "abc123",
            "torch": "2.x",
            "transformers": "5.x",
            "device": "cpu",
            "dtype": "float32",
        },
        "finished_at": "2025-01-01T00:00:00+00:00",
    }
    protocol.write_json(out / "results.json", results)


@pytest.fixture
def runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    for name in SCORES:
        write_eval(root, name)
    exp = root / "runs_minillm"
    cfg = dataclasses.asdict(ExposureConfig(student="runs/minillm", max_new_tokens=12))
    protocol.write_json(
        exp / "exposure.json",
        {
            "kind": "exposure", "name": "runs_minillm", "student": "runs/minillm", "teacher": "smollm2-135m-instruct",
            "config": cfg, "data_revision": "sha256:0123", "n_prompts": 50, "l": list(range(1, 13)),
            "exacc_err": [float(i) for i in range(1, 13)], "R": [0.0] * 12, "eps": [0.0] * 12,
            "live_R": [1 - i / 16 for i in range(12)], "live_eps": [1.0] * 12, "step_error_R": [0.5] * 12,
            "step_error_eps": [0.25] * 12, "teacher_entropy_R": [2.0] * 12, "teacher_entropy_eps": [None] * 12,
            "reverse_kl_R": [0.75] * 12, "reverse_kl_eps": [0.125] * 12,
        },
    )  # fmt: skip
    for name, value in (("runs_sft", 0.25), ("runs_minillm", 0.125)):
        protocol.write_json(
            root / name / "calibration.json",
            {
                "kind": "calibration", "name": name, "model": name, "task": "unni-yesno", "labels": ["No", "Yes"],
                "gold_counts": {"No": 128, "Yes": 268}, "data_revision": "sha256:d0c9",
                "config": dataclasses.asdict(CalibrationConfig(model=name)), "n": 396, "ece": value, "accuracy": 0.5,
                "bins": [{"lo": 0.5, "hi": 0.6, "count": 396, "accuracy": 0.5, "confidence": 0.5 + value}],
            },
        )  # fmt: skip
    costs = {"name": "kd", "done": True, "attempts": 2, "wall_seconds": 5400.0, "cpu_seconds": 9000.0}
    costs |= {"steps": 400, "tokens_trained": 1234567, "tokens_sampled": 0}
    protocol.write_json(root / "costs.json", {"kind": "costs", "plan": "plan.yaml", "runs": [costs]})
    return root


def test_report_table_bold_deltas_and_average(runs, tmp_path):
    md = make_report([str(runs)], str(tmp_path / "rep"), "sft").read_text()
    # Avg = mean over sets per seed, then mean and sample std over seeds:
    #   sft (20+30)/2 = 25, (22+30)/2 = 26 -> 25.50 ± 0.71;  minillm 28.5, 29.5 -> 29.00 ± 0.71
    #   kd 25.5, 27.5 -> 26.50 ± 1.41.  Deltas vs sft: kd +3, -1, +1; minillm +5, +2, +3.5
    assert "| model | dolly | sni | Avg |" in md
    assert "| runs_sft | 21.00 ± 1.41 | 30.00 ± 0.00 | 25.50 ± 0.71 |" in md
    assert "| runs_kd | 24.00 ± 1.41 (+3.00) | 29.00 ± 1.41 (-1.00) | 26.50 ± 1.41 (+1.00) |" in md
    assert (
        "| runs_minillm | **26.00** ± 0.00 (+5.00) | **32.00** ± 1.41 (+2.00) | **29.00** ± 0.71 (+3.50) |"
        in md
    )
    # length buckets: sft dolly [0,5] = mean(15, 17) = 16, [11,inf) = mean(25, 27) = 26
    assert "| runs_sft | dolly | 16.00 (n=1) | – (n=0) | 26.00 (n=1) |" in md
    assert "| runs_kd | 12.5 (50 %) | 12.5 (50 %) |" in md  # answer length: (5 + 20) / 2, half ended with EOS
    # exposure at l = 10 is the 10th value; calibration: the lower ECE is bold
    assert "| runs_minillm | smollm2-135m-instruct | 10.0 |" in md
    # ... and what lies behind it at l = 10: student / teacher prefixes; a step no prompt reached shows as –
    assert "| runs_minillm | 10 | 0.44 / 1.00 | 0.500 / 0.250 | 0.750 / 0.125 | 2.00 / – |" in md
    assert "| runs_minillm | unni-yesno | 396 | 0.500 | **0.125** |" in md
    assert "| kd | yes | 2 | 1.50 | 2.50 | 400 | 1,234,567 | 0 |" in md  # the cost account, in hours
    # what was run: model, seeds, decoding, data hash, code revision
    assert "`minillm eval --model runs/kd`" in md and "seeds [10, 20]" in md
    assert "sha256:feedfacecafebeef" in md and "code abc123" in md and "no_repeat_ngram_size 6" in md
    for png in ("rougeL_by_set.png", "length_buckets.png", "exacc_err.png", "reliability.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:4] == b"\x89PNG"


def test_report_csv(runs, tmp_path):
    make_report([str(runs / n) for n in SCORES], str(tmp_path / "rep"), "runs_sft")
    rows = list(csv.DictReader((tmp_path / "rep" / "report.csv").open()))
    assert len(rows) == 6
    kd = next(r for r in rows if r["model"] == "runs_kd" and r["set"] == "dolly")
    assert float(kd["rougeL_mean"]) == 24.0 and float(kd["rougeL_minus_runs_sft"]) == 3.0
    assert float(kd["rougeL_std"]) == pytest.approx(2**0.5) and kd["n_seeds"] == "2"
    assert float(kd["rougeL_[0,5]"]) == 19.0 and kd["rougeL_[6,10]"] == ""


def test_report_without_baseline_has_no_deltas(runs, tmp_path):
    md = make_report([str(runs)], str(tmp_path / "rep"), None).read_text()
    assert "| runs_kd | 24.00 ± 1.41 | 29.00 ± 1.41 | 26.50 ± 1.41 |" in md


def test_report_errors(runs, tmp_path):
    with pytest.raises(ValueError, match="matches 3 models"):
        make_report([str(runs)], str(tmp_path / "rep"), "runs")
    with pytest.raises(ValueError, match="matches 0 models"):
        make_report([str(runs)], str(tmp_path / "rep"), "nope")
    with pytest.raises(FileNotFoundError, match="no results.json"):
        make_report([str(tmp_path / "rep")], str(tmp_path / "rep2"), None)
    copy = tmp_path / "copy"
    write_eval(copy, "runs_kd")
    with pytest.raises(ValueError, match="appears in several run dirs"):
        make_report([str(runs), str(copy)], str(tmp_path / "rep"), None)
    # results.json written by protocol is strict JSON (no NaN): empty buckets carry only their count
    data = json.loads((runs / "runs_sft" / "results.json").read_text())
    assert data["sets"]["dolly"]["buckets"]["[6,10]"] == {"n": 0}


def test_report_ablation_table(runs, tmp_path):
    md = make_report(
        [str(runs)], str(tmp_path / "rep"), "sft", ablations=["runs_kd"], ablation_base="runs_minillm"
    ).read_text()
    main, ablation = md.split("## Ablations")[0], md.split("## Ablations")[1].split("## LM loss")[0]
    assert "| runs_kd |" not in main and "| runs_sft |" in main
    # deltas against the ablation base: kd 24 - 26, 29 - 32, 26.5 - 29
    assert "| runs_kd | 24.00 ± 1.41 (-2.00) | 29.00 ± 1.41 (-3.00) | 26.50 ± 1.41 (-2.50) |" in ablation
    assert "| runs_minillm | **26.00** ± 0.00 | **32.00** ± 1.41 | **29.00** ± 0.71 |" in ablation


def test_report_rows_follow_the_given_order(runs, tmp_path):
    """Found in folder order (kd, minillm, sft); listed ones first, in the given order, in every table."""
    md = make_report([str(runs)], str(tmp_path / "rep"), None, order=["runs_sft", "runs_minillm"]).read_text()
    rouge = md[md.index("## Rouge-L") :]
    assert [r.split(" |")[0] for r in rouge.splitlines() if r.startswith("| runs_")][:3] == [
        "| runs_sft",
        "| runs_minillm",
        "| runs_kd",
    ]
    calibration = [r.split(" |")[0] for r in md.splitlines() if "| unni-yesno |" in r]
    assert calibration == ["| runs_sft", "| runs_minillm"]
    with pytest.raises(ValueError, match="no result has"):
        make_report([str(runs)], str(tmp_path / "rep"), None, order=["runs_gkd"])
