"""`minillm report RUN_DIR...`: one markdown report (tables), a CSV beside it and PNG plots, from the JSON files
that `minillm eval` (results.json), `eval-exposure` (exposure.json) and `eval-calibration` (calibration.json)
write. A run dir may be one model's folder or any folder above several; files are found recursively.

The report stands on its own: it says which models, sets (with their file hashes), seeds and decoding settings
produced each number, the code revision and library versions, and when it ran.
"""

from __future__ import annotations

import csv
import json
import math
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from minillm import publish  # noqa: E402
from minillm.evaluate import metrics  # noqa: E402
from minillm.evaluate.calibration import draw_reliability  # noqa: E402

DECODING = (
    "temperature",
    "top_p",
    "top_k",
    "max_new_tokens",
    "no_repeat_ngram_size",
    "template",
    "max_prompt_length",
)
EXPOSURE_AT = (10, 25, 50, 100, 128, 256)


def _load(
    run_dirs: list[str], rescore: bool = False
) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    evals, exposures, calibrations, costs = [], [], [], []
    seen: set[Path] = set()
    for d in run_dirs:
        root = Path(d)
        if not root.exists():
            raise FileNotFoundError(f"run dir {d} does not exist")
        files = [root] if root.is_file() else sorted(root.rglob("*.json"))
        for f in files:
            if f.resolve() in seen or f.name not in (
                "results.json",
                "exposure.json",
                "calibration.json",
                "costs.json",
            ):
                continue
            seen.add(f.resolve())
            obj = json.loads(f.read_text())
            if rescore and obj.get("kind") == "eval":
                generations = publish.generations_file(f.parent)
                if generations is None:
                    raise FileNotFoundError(f"{f}: no generations beside it to rescore from")
                obj = publish.rescore(obj, generations)
            obj["_path"] = str(f)
            kind = obj.get("kind")
            {"eval": evals, "exposure": exposures, "calibration": calibrations, "costs": costs}.get(
                kind, []
            ).append(obj)
    if not (evals or exposures or calibrations):
        raise FileNotFoundError(
            f"no results.json, exposure.json or calibration.json under {', '.join(run_dirs)}"
        )
    names = [e["name"] for e in evals]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        where = [e["_path"] for e in evals if e["name"] in dup]
        raise ValueError(
            f"model {dup[0]} appears in several run dirs ({', '.join(where)}); pass only one of them"
        )
    return evals, exposures, calibrations, costs


def _match_baseline(baseline: str | None, names: list[str]) -> str | None:
    """The model name `baseline` designates: an exact name, else the one name containing it (case-insensitive)."""
    if baseline is None:
        return None
    if baseline in names:
        return baseline
    hits = [n for n in names if baseline.lower() in n.lower()]
    if len(hits) == 1:
        return hits[0]
    raise ValueError(
        f"baseline {baseline!r} matches {len(hits)} models ({', '.join(hits) or 'none'}); models: {', '.join(names)}"
    )


def _fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _mean(e: dict, set_name: str, key: str) -> float | None:
    return (e["sets"].get(set_name, {}).get(key) or {}).get("mean")


def _length_cell(e: dict, set_name: str) -> str:
    """Mean new tokens per answer, with the share ended by EOS in brackets."""
    eos = _mean(e, set_name, "eos_rate")
    return f"{_fmt(_mean(e, set_name, 'gen_tokens'), 1)} ({_fmt(None if eos is None else 100 * eos, 0)} %)"


def _average(e: dict, sets: list[str]) -> dict | None:
    """Mean over sets of Rouge-L, with its std over seeds when every set has the same seeds."""
    parts = [e["sets"].get(s, {}).get("rougeL") for s in sets]
    if not parts or any(p is None for p in parts):
        return None
    seed_sets = [set(p["per_seed"]) for p in parts]
    if all(ss == seed_sets[0] for ss in seed_sets):
        per_seed = [sum(p["per_seed"][k] for p in parts) / len(parts) for k in sorted(seed_sets[0])]
        m, s = metrics.mean_std(per_seed)
        return {"mean": m, "std": s}
    return {"mean": sum(p["mean"] for p in parts) / len(parts), "std": None}


def _rouge_table(evals: list[dict], sets: list[str], base: str | None) -> tuple[list[str], list[list[str]]]:
    cols = sets + ["Avg"]
    cells: dict[tuple[str, str], dict | None] = {}
    for e in evals:
        for s in sets:
            cells[(e["name"], s)] = e["sets"].get(s, {}).get("rougeL")
        cells[(e["name"], "Avg")] = _average(e, sets)
    best = {}
    for c in cols:
        vals = [cells[(e["name"], c)]["mean"] for e in evals if cells[(e["name"], c)] is not None]
        best[c] = max(vals) if vals else None
    rows = []
    for e in evals:
        row = [e["name"]]
        for c in cols:
            v = cells[(e["name"], c)]
            if v is None:
                row.append("–")
                continue
            mean = f"{v['mean']:.2f}"
            if best[c] is not None and round(v["mean"], 2) == round(best[c], 2):
                mean = f"**{mean}**"
            text = mean + (f" ± {v['std']:.2f}" if v.get("std") is not None else "")
            if base is not None and e["name"] != base and cells.get((base, c)) is not None:
                text += f" ({v['mean'] - cells[(base, c)]['mean']:+.2f})"
            row.append(text)
        rows.append(row)
    return ["model"] + cols, rows


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _bucket_value(e: dict, s: str, b: str) -> float | None:
    v = e["sets"].get(s, {}).get("buckets", {}).get(b)
    return v.get("mean") if v else None


def _plot_rouge(evals: list[dict], sets: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(sets) * max(1, len(evals)) / 2), 4))
    width = 0.8 / max(1, len(evals))
    for i, e in enumerate(evals):
        xs, ys, errs = [], [], []
        for j, s in enumerate(sets):
            v = e["sets"].get(s, {}).get("rougeL")
            if v is not None:
                xs.append(j + i * width - 0.4 + width / 2)
                ys.append(v["mean"])
                errs.append(v["std"])
        ax.bar(xs, ys, width=width, yerr=errs, capsize=3, label=e["name"])
    ax.set_xticks(range(len(sets)), sets)
    ax.set_ylabel("Rouge-L (mean ± std over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_buckets(evals: list[dict], sets: list[str], base: str | None, path: Path) -> None:
    buckets = [b for b, _, _ in metrics.BUCKETS]
    ref = next((e for e in evals if e["name"] == base), None)
    shown = [e for e in evals if e is not ref] if ref is not None else evals
    fig, axes = plt.subplots(1, len(sets), figsize=(4 * len(sets), 3.6), squeeze=False)
    width = 0.8 / max(1, len(shown))
    for ax, s in zip(axes[0], sets, strict=True):
        for i, e in enumerate(shown):
            xs, ys = [], []
            for j, b in enumerate(buckets):
                v = _bucket_value(e, s, b)
                r = _bucket_value(ref, s, b) if ref is not None else 0.0
                if v is not None and r is not None:
                    xs.append(j + i * width - 0.4 + width / 2)
                    ys.append(v - r)
            ax.bar(xs, ys, width=width, label=e["name"])
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xticks(range(len(buckets)), buckets)
        ax.set_title(s)
        ax.set_xlabel("gold response length (tokens)")
    axes[0][0].set_ylabel(f"Rouge-L − {base}" if ref is not None else "Rouge-L (no baseline given)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_exposure(exposures: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for x in exposures:
        ys = [math.nan if v is None else v for v in x["exacc_err"]]
        ax.plot(x["l"], ys, label=f"{x['name']} (teacher {x['teacher']})")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("generation length l (tokens)")
    ax.set_ylabel("ExAccErr (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_reliability(calibrations: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, len(calibrations), figsize=(3.6 * len(calibrations), 3.8), squeeze=False)
    for x, ax in zip(calibrations, axes[0], strict=True):
        draw_reliability(x, ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _exposure_explained(exposures: list[dict]) -> list[str]:
    """The step-l view behind R and eps, for exposure results that record it (`minillm.evaluate.exposure.explain`)."""
    if not exposures:
        return []
    rows = []
    for x in exposures:
        for la in (la for la in EXPOSURE_AT if la <= len(x["l"])):
            rows.append(
                [x["name"], str(la)]
                + [
                    f"{_fmt(x[f'{k}_R'][la - 1], d)} / {_fmt(x[f'{k}_eps'][la - 1], d)}"
                    for k, d in (("live", 2), ("step_error", 3), ("reverse_kl", 3), ("teacher_entropy", 2))
                ]
            )
    return [
        "What lies behind R and eps at step l, on student / teacher prefixes: the share of prompts with a sample "
        "still running (a prompt adds error only then), the mean KL(teacher || student) of the step over those "
        "prompts, the mean KL(student || teacher) (on student prefixes: minus the expected per-token MiniLLM "
        "reward), and the teacher's mean entropy on their prefixes (nats).",
        "",
        _markdown(["model", "l", "running", "step KL(p‖q)", "step KL(q‖p)", "teacher entropy"], rows),
        "",
    ]


def _cost_section(costs: dict) -> list[str]:
    rows = [
        [
            r["name"],
            "yes" if r["done"] else "no",
            str(r["attempts"]),
            f"{r['wall_seconds'] / 3600:.2f}",
            f"{r['cpu_seconds'] / 3600:.2f}",
            *(
                [str(r["steps"]), f"{r['tokens_trained']:,.0f}", f"{r['tokens_sampled']:,.0f}"]
                if "steps" in r
                else ["–", "–", "–"]
            ),
        ]
        for r in costs["runs"]
    ]
    header = ["run", "done", "attempts", "wall h", "CPU h", "steps", "tokens trained", "tokens sampled"]
    return [
        "## Cost",
        "",
        f"Every run of `{costs['plan']}` as it ran, summed over its attempts (a resumed run has several). Tokens: "
        "the response tokens each optimizer step trained on, and those the student sampled on-policy (MiniLLM's "
        "collections, GKD's on-policy steps); SeqKD's teacher sampling is in its CPU time.",
        "",
        _markdown(header, rows),
        "",
    ]


def _settings_section(evals: list[dict], exposures: list[dict], calibrations: list[dict]) -> list[str]:
    out = ["## What was run", ""]
    for e in evals:
        c, env = e["config"], e.get("environment", {})
        out.append(
            f"**{e['name']}**: `minillm eval --model {e['model']}` ({e['_path']}, finished {e.get('finished_at')})"
        )
        if e.get("rescored_from"):
            out.append(f"- scores recomputed from {e['rescored_from']} (the gold LM loss as recorded)")
        out.append(
            f"- seeds {c['seeds']}; max_per_set {c['max_per_set']}; selfinst_242 {c['selfinst_242']}; dtype {env.get('dtype')} "
            f"on {env.get('device')}; " + ", ".join(f"{k} {c[k]}" for k in DECODING)
        )
        for s, v in e["sets"].items():
            out.append(
                f"- set `{s}` = `{v['spec']}` ({v['revision']}): {v['n_prompts']} prompts scored, "
                f"{v['skipped_long']} skipped as longer than {c['max_prompt_length']} tokens"
            )
        t = e.get("timing", {})
        if t.get("seconds_per_100_prompts") is not None:
            out.append(
                f"- generation {t['seconds_per_100_prompts']:.1f} s per 100 prompts ({t['generated_prompts']} generated in this run)"
            )
        out.append(
            f"- code {env.get('code_revision')}, torch {env.get('torch')}, transformers {env.get('transformers')}"
        )
        out.append("")
    for x in exposures:
        c = x["config"]
        out.append(
            f"**exposure {x['name']}**: student `{x['student']}`, teacher `{x['teacher']}`, data `{c['data']}` "
            f"({x['data_revision']}), {x['n_prompts']} prompts x {c['samples_per_prompt']} samples, "
            f"l <= {c['max_new_tokens']}, seed {c['seed']}, template {c['template']} ({x['_path']})"
        )
    for x in calibrations:
        c = x["config"]
        out.append(
            f"**calibration {x['name']}**: model `{x['model']}`, task `{x['task']}` ({x['data_revision']}), "
            f"labels {x['labels']} with counts {x['gold_counts']}, {c['bins']} bins, template {c['template']} ({x['_path']})"
        )
    return out


def make_report(
    run_dirs: list[str],
    out_dir: str,
    baseline: str | None = None,
    *,
    rescore: bool = False,
    ablations: list[str] = (),
    ablation_base: str | None = None,
    order: list[str] = (),
) -> Path:
    """Write report.md, report.csv and the PNG plots into `out_dir`; return the path of report.md.

    rescore: recompute every eval from the generations beside its results.json (`publish.rescore`).
    ablations: models shown in their own Rouge-L table beside `ablation_base` (deltas against it), not in the
    main table and its plots.
    order: model names in the order of every table's rows; models not listed follow in the order found."""
    evals, exposures, calibrations, costs = _load(run_dirs, rescore)
    found = {x["name"] for x in evals + exposures + calibrations}
    if unknown := [n for n in order if n not in found]:
        raise ValueError(f"--order names {unknown}, which no result has; models: {', '.join(sorted(found))}")
    rank = {name: i for i, name in enumerate(order)}
    for group in (evals, exposures, calibrations):
        group.sort(key=lambda x: rank.get(x["name"], len(rank)))  # stable: the rest keep their order
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [e["name"] for e in evals] + [x["name"] for x in exposures + calibrations]
    base = _match_baseline(baseline, list(dict.fromkeys(names)))
    ablated = [_match_baseline(a, [e["name"] for e in evals]) for a in ablations]
    ablation_ref = _match_baseline(ablation_base, [e["name"] for e in evals]) if ablated else None
    main = [e for e in evals if e["name"] not in ablated]
    sets: list[str] = []
    for e in evals:
        sets += [s for s in e["sets"] if s not in sets]

    md = [
        "# minillm evaluation report",
        "",
        f"Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} from {', '.join(run_dirs)}.",
        "",
    ]
    if evals:
        header, rows = _rouge_table(main, sets, base)
        md += [
            "## Rouge-L",
            "",
            "Sampled answers (the paper's protocol, minillm docs/design.md §3) scored by Rouge-L F x100 (rouge_score, stemmer, max over "
            "references), averaged over prompts, then mean ± sample std over seeds. **Bold**: best in the column. "
            + (f"In brackets: difference to the baseline `{base}`." if base else "No baseline given."),
            "",
            _markdown(header, rows),
            "",
            "![Rouge-L per set](rougeL_by_set.png)",
            "",
        ]
        if ablated:
            by_name = {e["name"]: e for e in evals}
            header, rows = _rouge_table([by_name[n] for n in [ablation_ref, *ablated]], sets, ablation_ref)
            md += [
                "## Ablations",
                "",
                f"Rouge-L as above; in brackets: difference to `{ablation_ref}`.",
                "",
                _markdown(header, rows),
                "",
            ]
        md += [
            "## LM loss on gold responses and Dist-4",
            "",
            "LM loss: token-averaged cross-entropy of the gold response and its EOS (nats; lower is better); "
            "Dist-4: distinct word 4-grams / all 4-grams of the answers x100, mean over seeds.",
            "",
        ]
        hdr = ["model"] + [f"{s} loss" for s in sets] + [f"{s} Dist-4" for s in sets]
        rows2 = []
        for e in evals:
            row = [e["name"]]
            row += [_fmt(e["sets"].get(s, {}).get("lm_loss"), 3) for s in sets]
            row += [_fmt(_mean(e, s, "dist4"), 1) for s in sets]
            rows2.append(row)
        md += [_markdown(hdr, rows2), ""]
        rows_len = [[e["name"]] + [_length_cell(e, s) for s in sets] for e in evals]
        md += [
            "## Answer length",
            "",
            "New tokens per answer and, in brackets, the share of answers that ended with EOS rather than at the "
            "token cap; mean over seeds. Rouge-L F falls with an answer much longer than its reference.",
            "",
            _markdown(["model", *sets], rows_len),
            "",
        ]
        buckets = [b for b, _, _ in metrics.BUCKETS]
        rows3 = []
        for e in evals:
            for s in sets:
                bs = e["sets"].get(s, {}).get("buckets", {})
                rows3.append(
                    [e["name"], s]
                    + [f"{_fmt(_bucket_value(e, s, b))} (n={bs.get(b, {}).get('n', 0)})" for b in buckets]
                )
        md += [
            "## Rouge-L per gold-response length",
            "",
            "Buckets by the length of the (first) reference in the evaluated model's tokens.",
            "",
            _markdown(["model", "set"] + buckets, rows3),
            "",
            "![Rouge-L per length bucket](length_buckets.png)",
            "",
        ]
        _plot_rouge(main, sets, out / "rougeL_by_set.png")
        _plot_buckets(main, sets, base, out / "length_buckets.png")
        _write_csv(evals, sets, base, out / "report.csv")
    if exposures:
        T = max(len(x["l"]) for x in exposures)
        at = [la for la in EXPOSURE_AT if la <= T]
        rows4 = [
            [x["name"], x["teacher"]]
            + [_fmt(x["exacc_err"][la - 1], 1) if la <= len(x["l"]) else "–" for la in at]
            for x in exposures
        ]
        md += [
            "## Exposure bias (ExAccErr, %)",
            "",
            "ExAccErr(l) = (R(l) − eps(l)) / eps(l) x 100: accumulated KL(teacher || student) on student-sampled "
            "prefixes R versus teacher-sampled prefixes eps, at length l (lower is better).",
            "",
            _markdown(["model", "teacher"] + [f"l={la}" for la in at], rows4),
            "",
            "![ExAccErr](exacc_err.png)",
            "",
        ]
        md += _exposure_explained([x for x in exposures if "reverse_kl_R" in x])
        _plot_exposure(exposures, out / "exacc_err.png")
    if calibrations:
        best = min(x["ece"] for x in calibrations)
        rows5 = [
            [
                x["name"],
                x["task"],
                str(x["n"]),
                _fmt(x["accuracy"], 3),
                (f"**{x['ece']:.3f}**" if x["ece"] == best else f"{x['ece']:.3f}"),
            ]
            for x in calibrations
        ]
        md += [
            "## Calibration",
            "",
            "ECE of the label-word probabilities normalised over the two labels, equal-width bins (lower is better).",
            "",
            _markdown(["model", "task", "n", "accuracy", "ECE"], rows5),
            "",
            "![Reliability diagrams](reliability.png)",
            "",
        ]
        _plot_reliability(calibrations, out / "reliability.png")
    for c in costs:
        md += _cost_section(c)
    md += _settings_section(evals, exposures, calibrations)
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path


def _write_csv(evals: list[dict], sets: list[str], base: str | None, path: Path) -> None:
    buckets = [b for b, _, _ in metrics.BUCKETS]
    ref = next((e for e in evals if e["name"] == base), None)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "model",
                "set",
                "rougeL_mean",
                "rougeL_std",
                f"rougeL_minus_{base}" if base else "rougeL_minus_baseline",
                "n_seeds",
                "n_prompts",
                "skipped_long",
                "lm_loss",
                "lm_loss_per_example",
                "dist4_mean",
            ]
            + [f"rougeL_{b}" for b in buckets]
        )
        for e in evals:
            for s in sets:
                v = e["sets"].get(s)
                if v is None:
                    continue
                r = v.get("rougeL") or {}
                rr = (ref["sets"].get(s, {}).get("rougeL") or {}) if ref is not None else {}
                delta = r["mean"] - rr["mean"] if r and rr else None
                w.writerow(
                    [
                        e["name"],
                        s,
                        r.get("mean"),
                        r.get("std"),
                        delta,
                        len(r.get("per_seed", {})),
                        v["n_prompts"],
                        v["skipped_long"],
                        v.get("lm_loss"),
                        v.get("lm_loss_per_example"),
                        (v.get("dist4") or {}).get("mean"),
                    ]
                    + [_bucket_value(e, s, b) for b in buckets]
                )
