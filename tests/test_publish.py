"""`minillm publish` and `minillm report --rescore`: published generations alone rebuild every Rouge-L, checked
against scores worked out by hand; a tampered or incomplete file is an error."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import pytest

from minillm.cli import main
from minillm.config import EvalConfig
from minillm.evaluate import protocol
from minillm.publish import rescore
from minillm.report import make_report

# (id, gold tokens, reference, answer at seed 1, answer at seed 2). Rouge-L F x100 by hand (LCS of words):
#   "the cat sat" vs itself: 100;  "the cat" vs "the cat sat": P 1, R 2/3 -> F 80
#   "a dog ran far" vs "a dog": P 1/2, R 1 -> 200/3;  "blue\u2028sky" vs "a dog": 0, and its U+2028 (a line
#   separator to str.splitlines) must not split its JSONL line
ROWS = [
    ("p1", 3, "the cat sat", "the cat sat", "the cat"),
    ("p2", 12, "a dog", "a dog ran far", "blue\u2028sky"),
]
SEED_MEANS = {1: (100 + 200 / 3) / 2, 2: (80 + 0) / 2}


def write_run(root: Path) -> Path:
    """A `minillm eval` folder: generations.jsonl with the rows above, results.json summarised from them."""
    cfg = EvalConfig(model="runs/x", name="Student", sets=["dolly"], seeds=[1, 2])
    out = root / "Student"
    out.mkdir(parents=True)
    rows, items = {}, []
    for pid, gold, ref, *answers in ROWS:
        items.append(protocol.Item(pid, "prompt", [1], [ref], gold, {}))
        for seed, text in zip((1, 2), answers, strict=True):
            rows[("dolly", pid, seed)] = {
                "set": "dolly", "id": pid, "seed": seed, "prompt": "prompt", "output": text, "reference": ref,
                "score": -1.0, "new_tokens": 4, "finished": True, "gold_tokens": gold,
            }  # fmt: skip
    with (out / protocol.GENERATIONS).open("w", encoding="utf-8") as fh:
        for row in rows.values():
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    recorded = {
        k: v | {"score": by_hand} for (k, v), by_hand in zip(rows.items(), (100, 80, 200 / 3, 0), strict=True)
    }
    es = protocol.EvalSet("dolly", "dolly", "sha256:ab", 2, 0, items)
    results = {
        "kind": "eval", "name": "Student", "model": "runs/x", "config": dataclasses.asdict(cfg),
        "sets": {"dolly": protocol.summarise(es, recorded, cfg.seeds) | {"lm_loss": 2.5}},
        "environment": {}, "timing": {},
    }  # fmt: skip
    protocol.write_json(out / protocol.RESULTS, results)
    protocol.write_json(out / protocol.SETTINGS, {"sampler": protocol.SAMPLER})
    return out


def test_publish_then_rescore_rebuilds_the_scores(tmp_path):
    write_run(tmp_path / "runs")
    main(["publish", str(tmp_path / "runs"), "--out", str(tmp_path / "results")])
    folder = tmp_path / "results" / "Student"
    assert sorted(p.name for p in folder.iterdir()) == [
        "generations.jsonl.gz",
        "results.json",
        "settings.json",
    ]
    first = (folder / "generations.jsonl.gz").read_bytes()
    main(["publish", str(tmp_path / "runs"), "--out", str(tmp_path / "results")])
    assert (folder / "generations.jsonl.gz").read_bytes() == first  # same generations, same bytes

    out = rescore(json.loads((folder / "results.json").read_text()), folder / "generations.jsonl.gz")
    dolly = out["sets"]["dolly"]
    assert dolly["rougeL"]["per_seed"] == pytest.approx({"1": SEED_MEANS[1], "2": SEED_MEANS[2]}, abs=1e-9)
    assert dolly["buckets"]["[0,5]"]["mean"] == pytest.approx(90.0)  # p1: 100 and 80
    assert dolly["lm_loss"] == 2.5  # carried over: it needs the weights
    md = make_report([str(tmp_path / "results")], str(tmp_path / "rep"), rescore=True).read_text()
    mean = (SEED_MEANS[1] + SEED_MEANS[2]) / 2
    assert f"| Student | **{mean:.2f}** ± " in md and "scores recomputed from" in md


def test_publish_copies_a_training_runs_log(tmp_path, capsys):
    # a training run's folder: its log is published, its checkpoints (weights) are not
    run = tmp_path / "runs" / "minillm"
    (run / "ckpt-2").mkdir(parents=True)
    (run / "ckpt-2" / "model.safetensors").write_bytes(b"weights")
    log = '{"step": 0, "valid/rougeL": 10.3}\n{"step": 2, "loss": 4.5}\n'
    (run / "metrics.jsonl").write_text(log)
    main(["publish", str(run), str(write_run(tmp_path / "evals").parent), "--out", str(tmp_path / "results")])
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["Student", "training"]
    assert [p.name for p in (tmp_path / "results" / "training").iterdir()] == ["minillm.metrics.jsonl.gz"]
    assert gzip.decompress((tmp_path / "results" / "training" / "minillm.metrics.jsonl.gz").read_bytes()) == (
        log.encode()
    )
    # neither results nor a log: nothing to publish, and the message says what was looked for
    with pytest.raises(SystemExit):
        main(["publish", str(run / "ckpt-2"), "--out", str(tmp_path / "results")])
    assert "calibration.json or metrics.jsonl under" in capsys.readouterr().err


def _rewrite(path: Path, edit) -> None:
    lines = [json.loads(x) for x in gzip.decompress(path.read_bytes()).decode().split("\n") if x]
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in edit(lines)).encode()))


def test_rescore_refuses_what_the_generations_do_not_reproduce(tmp_path):
    write_run(tmp_path / "runs")
    main(["publish", str(tmp_path / "runs"), "--out", str(tmp_path / "results")])
    gz = tmp_path / "results" / "Student" / "generations.jsonl.gz"
    results = json.loads((gz.parent / "results.json").read_text())

    _rewrite(gz, lambda rows: [r | {"output": "the cat sat"} if r["id"] == "p1" else r for r in rows])
    with pytest.raises(ValueError, match="Rouge-L from the generations is"):
        rescore(results, gz)
    _rewrite(gz, lambda rows: rows[:-1])
    with pytest.raises(ValueError, match="1 \\(prompt, seed\\) pairs missing"):
        rescore(results, gz)
    gz.unlink()
    with pytest.raises(FileNotFoundError, match="no generations beside it"):
        make_report([str(tmp_path / "results")], str(tmp_path / "rep"), rescore=True)
