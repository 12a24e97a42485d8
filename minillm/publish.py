"""Published results: `minillm publish RUN_DIR... --out results` and the re-scoring `minillm report --rescore` does.

`publish` copies, per model, what `minillm eval`, `eval-exposure` and `eval-calibration` wrote (results.json,
settings.json, exposure.json, calibration.json) into `<out>/<model name>/`, and the generations compressed as
generations.jsonl.gz: no weights, a few MB per model, enough for anyone to check every score. A training run's
folder given as a run dir has its log (metrics.jsonl: losses, validation, checkpoint choice) copied, compressed,
to `<out>/training/<folder name>.metrics.jsonl.gz`.

`rescore` recomputes an eval's results.json from its generations alone: every answer is scored again by Rouge-L
against its references and each set is summarised as `minillm eval` summarises it (`protocol.summarise`). The
gold LM loss needs the weights, so it is carried over as recorded. A recorded Rouge-L that its generations do
not reproduce is an error, not a silent correction.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from typing import Any

from minillm.evaluate import metrics, protocol

GENERATIONS_GZ = protocol.GENERATIONS + ".gz"
COPIED = (protocol.RESULTS, protocol.SETTINGS, "exposure.json", "calibration.json")
CARRIED = ("lm_loss", "lm_loss_per_example", "lm_tokens")  # need the weights: kept as recorded
METRICS_LOG = "metrics.jsonl"  # a training run's log (train.engine.MetricsLog)
TOLERANCE = 1e-9  # Rouge-L x100 of a set; rouge_score is deterministic, so only summation order may differ


def generations_file(folder: Path) -> Path | None:
    """The generations beside a results.json: plain (as `minillm eval` writes them) or compressed (published)."""
    for name in (protocol.GENERATIONS, GENERATIONS_GZ):
        if (folder / name).is_file():
            return folder / name
    return None


def _gzip(src: Path, dest: Path) -> None:
    # mtime 0: the same content gives the same bytes, so a rerun changes nothing under git
    with src.open("rb") as fin, gzip.GzipFile(dest, "wb", mtime=0) as fout:
        shutil.copyfileobj(fin, fout)


def publish(run_dirs: list[str], out_dir: str) -> list[Path]:
    """Copy every result file under `run_dirs` into `out_dir/<slug of its model name>/`, and the training log of
    each run dir that is a training run's folder into `out_dir/training/`; returns the files' folders."""
    written: list[Path] = []
    for d in run_dirs:
        root = Path(d)
        if not root.exists():
            raise FileNotFoundError(f"run dir {d} does not exist")
        if (root / METRICS_LOG).is_file():
            dest = Path(out_dir) / "training"
            dest.mkdir(parents=True, exist_ok=True)
            _gzip(root / METRICS_LOG, dest / f"{root.name}.{METRICS_LOG}.gz")
            if dest not in written:
                written.append(dest)
        for f in sorted(root.rglob("*.json")):
            if f.name not in (protocol.RESULTS, "exposure.json", "calibration.json"):
                continue
            dest = Path(out_dir) / protocol.slug(json.loads(f.read_text())["name"])
            dest.mkdir(parents=True, exist_ok=True)
            for name in COPIED:
                if (f.parent / name).is_file():
                    shutil.copyfile(f.parent / name, dest / name)
            gen = f.parent / protocol.GENERATIONS
            if f.name == protocol.RESULTS and gen.is_file():
                _gzip(gen, dest / GENERATIONS_GZ)
            if dest not in written:
                written.append(dest)
    if not written:
        raise FileNotFoundError(
            f"no results.json, exposure.json, calibration.json or {METRICS_LOG} under {', '.join(run_dirs)}"
        )
    return written


def rescore(results: dict[str, Any], generations: Path) -> dict[str, Any]:
    """`results` (an eval's results.json) recomputed from `generations`; raises where the two disagree."""
    rows = protocol.read_generations(generations)
    seeds = [int(s) for s in results["config"]["seeds"]]
    sets = {}
    for name, recorded in results["sets"].items():
        mine = {k: dict(v) for k, v in rows.items() if k[0] == name}
        gold = {k[1]: int(v["gold_tokens"]) for k, v in mine.items()}
        missing = [(i, s) for i in gold for s in seeds if (name, i, s) not in mine]
        if len(gold) != recorded["n_prompts"] or missing:
            raise ValueError(
                f"{generations}: set {name} has answers for {len(gold)} prompts, results.json "
                f"{recorded['n_prompts']}; {len(missing)} (prompt, seed) pairs missing"
            )
        for row in mine.values():
            row["score"] = metrics.rouge_l(row["output"], row.get("references") or [row["reference"]])
        items = [protocol.Item(i, "", [], [], g, {}) for i, g in gold.items()]
        eval_set = protocol.EvalSet(
            name,
            recorded["spec"],
            recorded["revision"],
            recorded["n_records"],
            recorded["skipped_long"],
            items,
        )
        sets[name] = protocol.summarise(eval_set, mine, seeds) | {
            k: recorded[k] for k in CARRIED if k in recorded
        }
        new, old = sets[name]["rougeL"], recorded["rougeL"]
        if (new is None) != (old is None) or (new and abs(new["mean"] - old["mean"]) > TOLERANCE):
            raise ValueError(
                f"{generations}: set {name}: Rouge-L from the generations is {new and new['mean']}, "
                f"results.json records {old and old['mean']}"
            )
    return results | {"sets": sets, "rescored_from": str(generations)}
