"""The main job on the embedded default (`make demo`): SmolLM2-135M-Instruct teacher, a 6-layer student cut
from it, Dolly data. Derive → SFT → MiniLLM, then before/after figures and answers to three DollyEval
prompts. Every stage resumes, so a rerun after an interruption continues where it stopped."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from minillm import config as config_lib
from minillm import models
from minillm.config import MiniLLMConfig, SFTConfig
from minillm.data.instructions import load_records
from minillm.data.tokenize import encode_prompt
from minillm.evaluate.generate import sample, trim_at_eos

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"
TEACHER = models.EMBEDDED_ALIAS


def answer(
    model_spec: str,
    records: list[dict[str, Any]],
    *,
    template: str = "alpaca",
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 10,
    trust_remote_code: bool = False,
) -> list[str]:
    """Sampled answers (the paper's decoding by default) of one model to instruction records."""
    tok = models.load_tokenizer(model_spec, trust_remote_code=trust_remote_code)
    model = models.load_model(model_spec, trust_remote_code=trust_remote_code)
    prompts = [encode_prompt({"input": "", **r}, tok, template) for r in records]
    out = sample(
        model,
        prompts,
        seed=seed,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        no_repeat_ngram_size=6,
    )
    return [
        tok.decode(trim_at_eos(row.tolist(), tok.eos_token_id)[0], skip_special_tokens=True).strip()
        for row in out
    ]


def _metric(run: Path, key: str) -> tuple[float, float]:
    values = [m[key] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in m]
    return values[0], values[-1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="minillm demo", description=__doc__)
    p.add_argument("--out", default="runs/demo", help="Folder for every stage's output.")
    args = p.parse_args(argv)
    out = Path(args.out)
    student_init = out / "student-init"
    if not (student_init / "config.json").is_file():
        teacher = models.load_model(TEACHER)
        student = models.derive_student(teacher, models.spread_layers(teacher.config.num_hidden_layers, 6))
        student.save_pretrained(student_init, safe_serialization=True)
        models.load_tokenizer(TEACHER).save_pretrained(student_init)
        print(f"derived a 6-layer student → {student_init}")

    from minillm.train.minillm import train_minillm
    from minillm.train.sft import train_sft

    sft_cfg = config_lib.parse(
        SFTConfig,
        str(CONFIGS / "sft.yaml"),
        ["--model", str(student_init), "--output_dir", str(out / "sft"), "--resume", "true"],
    )
    sft_best = train_sft(sft_cfg)
    distill_cfg = config_lib.parse(
        MiniLLMConfig,
        str(CONFIGS / "distill.yaml"),
        [
            "--model",
            str(sft_best),
            "--teacher",
            TEACHER,
            "--output_dir",
            str(out / "minillm"),
            "--resume",
            "true",
        ],
    )
    train_minillm(distill_cfg)

    records = load_records("dolly_test", limit=3)
    lines = ["# minillm demo", "", "| stage | metric | before | after |", "|---|---|---|---|"]
    lines.append(
        "| SFT | valid/loss (nats/token) | {:.3f} | {:.3f} |".format(*_metric(out / "sft", "valid/loss"))
    )
    for key in ("valid/rougeL", "valid/reverse_kl"):
        lines.append(
            f"| MiniLLM | {key} | " + " | ".join(f"{v:.3f}" for v in _metric(out / "minillm", key)) + " |"
        )
    models_shown = {
        "teacher": TEACHER,
        "student (SFT)": str(sft_best),
        "student (MiniLLM)": str(out / "minillm" / "best"),
    }
    replies = {name: answer(spec, records, max_new_tokens=64) for name, spec in models_shown.items()}
    for i, rec in enumerate(records):
        lines += ["", f"## {rec['instruction']}"]
        lines += [f"- **{name}**: {replies[name][i]!r}" for name in models_shown]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text)
