"""Calibration of label-word probabilities (paper section 3.3, ECE with 10 bins): `minillm eval-calibration`.

The paper measures ECE on SST2 and BoolQ, which are not shipped here. Our binary task is built from shipped data:

- `unni-yesno`: the UnNI records (data/unni.jsonl) whose output is exactly "Yes" or "No" (case and punctuation
  as written; "YES", "No." and the like are left out): 396 records, 268 Yes and 128 No. They come from many
  different Unnatural Instructions tasks (palindromes, ordering of steps, ...), each asking for Yes/No.
- or any .jsonl in the data format whose outputs take exactly two distinct values (the two label words).

For each record, prompt = the template (the one used in training, `template`) and each label word w is scored
as a response: log p(w | prompt) = sum of its tokens' log-probabilities, the word tokenised on its own as SFT
tokenises responses (`data/tokenize.py`). The two probabilities are normalised over the two words;
confidence = the larger one, prediction = its word, correct = prediction == the gold output. ECE uses `bins`
equal-width bins of [0, 1] (`metrics.ece`); with two classes every confidence is >= 0.5, so only the upper half
of the bins can fill. Also reported: accuracy and `label_mass`, the mean unnormalised p(Yes) + p(No), which says
how much the model's next words look like either label at all.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from minillm import models
from minillm.config import CalibrationConfig, ConfigError
from minillm.data.instructions import load_records
from minillm.data.tokenize import Example, encode_prompt
from minillm.environment import environment
from minillm.evaluate import generate, metrics
from minillm.evaluate.protocol import data_revision, device, json_safe, slug, write_json

RESULT = "calibration.json"
PLOT = "reliability.png"
YES_NO = ("No", "Yes")


def build_task(task: str, max_examples: int | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of a binary task and its two label words (sorted)."""
    if task == "unni-yesno":
        records = [r for r in load_records("unni") if r["output"] in YES_NO]
        labels = list(YES_NO)
    else:
        records = load_records(task)
        labels = sorted({r["output"] for r in records})
        if len(labels) != 2:
            shown = ", ".join(repr(x) for x in labels[:5])
            raise ConfigError(
                f"task {task}: outputs must take exactly two values (the label words); got {len(labels)}: {shown}"
            )
    if max_examples is not None:
        records = records[:max_examples]
    if not records:
        raise ConfigError(f"task {task} has no examples")
    return records, labels


@torch.no_grad()
def label_logprobs(
    model: Any,
    tokenizer: Any,
    records: list[dict[str, Any]],
    labels: list[str],
    *,
    template: str,
    batch_size: int,
) -> torch.Tensor:
    """[N, K] fp64 log p(label k | prompt of record n), each label scored as a whole response (all its tokens)."""
    prompts = [encode_prompt(r, tokenizer, template) for r in records]
    cols = []
    for word in labels:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"label word {word!r} tokenises to nothing")
        nll = generate.gold_nll(
            model, [Example(p, ids) for p in prompts], tokenizer.pad_token_id, batch_size=batch_size
        )
        cols.append(torch.tensor([-s for s, _ in nll], dtype=torch.float64))
    return torch.stack(cols, 1)  # [N, K]


def calibration_result(logprobs: torch.Tensor, gold: list[int], bins: int) -> dict[str, Any]:
    """ECE, accuracy, per-bin table and label mass from [N, K] label log-probabilities and gold label indices."""
    N, K = logprobs.shape
    assert len(gold) == N
    probs = logprobs.softmax(-1)  # [N, K], normalised over the label words
    conf, pred = probs.max(-1)
    correct = [int(p) == g for p, g in zip(pred.tolist(), gold, strict=True)]
    confidences = conf.tolist()
    return {
        "n": N,
        "ece": metrics.ece(confidences, correct, bins),
        "accuracy": sum(correct) / N,
        "mean_confidence": sum(confidences) / N,
        "label_mass": float(logprobs.exp().sum(-1).mean()),
        "bins": metrics.ece_bins(confidences, correct, bins),
    }


def draw_reliability(result: dict[str, Any], ax: Any) -> None:
    """The reliability diagram of one calibration result on a matplotlib axis: accuracy per confidence bin
    (blue), its gap to the bin's mean confidence (red) and the count of each bin."""
    width = 1.0 / len(result["bins"])
    for b in result["bins"]:
        if not b["count"]:
            continue
        mid = (b["lo"] + b["hi"]) / 2
        ax.bar(mid, b["accuracy"], width=width, edgecolor="black", color="C0")
        ax.bar(mid, b["confidence"] - b["accuracy"], bottom=b["accuracy"], width=width, color="C3", alpha=0.3)
        ax.text(mid, 0.02, str(b["count"]), ha="center", fontsize=7)
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(
        f"{result['name']} on {result['task']}\nECE {result['ece']:.3f}, accuracy {result['accuracy']:.3f}",
        fontsize=9,
    )


def plot_reliability(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    draw_reliability(result, ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_calibration(cfg: CalibrationConfig) -> dict:
    """`minillm eval-calibration`: calibration.json + reliability.png in output_dir/<model slug>/."""
    dev = device()
    dtype = models.torch_dtype(cfg.dtype, dev)
    model = models.load_model(cfg.model, dtype=dtype, trust_remote_code=cfg.trust_remote_code).to(dev)
    tokenizer = models.load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    t0 = time.perf_counter()
    records, labels = build_task(cfg.task, cfg.max_examples)
    gold = [labels.index(r["output"]) for r in records]
    lp = label_logprobs(model, tokenizer, records, labels, template=cfg.template, batch_size=cfg.batch_size)
    result = {
        "kind": "calibration",
        "name": cfg.name or slug(cfg.model),
        "model": cfg.model,
        "task": cfg.task,
        "labels": labels,
        "gold_counts": {w: gold.count(i) for i, w in enumerate(labels)},
        "data_revision": data_revision("unni" if cfg.task == "unni-yesno" else cfg.task),
        "config": dataclasses.asdict(cfg),
    } | calibration_result(lp, gold, cfg.bins)
    result |= {"seconds": time.perf_counter() - t0, "environment": environment(dev, dtype)}
    result = json_safe(result)
    out_dir = Path(cfg.output_dir) / slug(result["name"])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / RESULT, result)
    plot_reliability(result, out_dir / PLOT)
    print(json.dumps({k: result[k] for k in ("name", "task", "n", "ece", "accuracy")}))
    return result
