"""The main job on the embedded default (`make demo`): SmolLM2-135M-Instruct teacher, a 6-layer student cut
from it, Dolly data. Derive → SFT → MiniLLM, then before/after figures and answers to three DollyEval
prompts. Every stage resumes, so a rerun after an interruption continues where it stopped."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

from transformers import GenerationConfig

from minillm import config as config_lib
from minillm import models
from minillm.config import MiniLLMConfig, SFTConfig
from minillm.data.instructions import load_records
from minillm.data.tokenize import encode_prompt
from minillm.evaluate.generate import decode, trim_at_eos

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"
TEACHER = models.EMBEDDED_ALIAS


def prompt_template(model_path: str, tokenizer: Any) -> tuple[str, str]:
    """The template a model answers best in, and why: the one a minillm run trained it with (its
    minillm_config.json), else its tokenizer's chat template, else alpaca."""
    trained = Path(model_path) / "minillm_config.json"
    if trained.is_file():
        return json.loads(trained.read_text())["template"], "the template it was trained with"
    if getattr(tokenizer, "chat_template", None):
        return "chat", "the tokenizer's chat template"
    return "alpaca", "the tokenizer has no chat template"


def decoding(
    model: Any,
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    no_repeat_ngram_size: int | None = None,
) -> tuple[GenerationConfig, str]:
    """The model's own generation config (greedy when it has none) with the given settings on top, and a
    description. temperature 0 is greedy; any other sampling setting turns sampling on."""
    own = not getattr(model.generation_config, "_from_model_config", False)
    gen = copy.deepcopy(model.generation_config) if own else GenerationConfig(do_sample=False)
    if temperature is not None:
        gen.do_sample = temperature > 0
        if gen.do_sample:
            gen.temperature = temperature
    elif top_p is not None or top_k is not None:
        gen.do_sample = True
    if top_p is not None:
        gen.top_p = top_p
    if top_k is not None:
        gen.top_k = top_k
    if no_repeat_ngram_size is not None:
        gen.no_repeat_ngram_size = no_repeat_ngram_size
    source = "the model's generation config" if own else "the model has no generation config"
    if temperature is not None or top_p is not None or top_k is not None:
        source = "set by the caller"
    if not gen.do_sample:
        gen.temperature = gen.top_p = gen.top_k = None  # unused: HF warns about them under greedy
        return gen, f"greedy ({source})"
    return gen, f"sampling, temperature {gen.temperature}, top_p {gen.top_p}, top_k {gen.top_k} ({source})"


def answer(
    model_spec: str,
    records: list[dict[str, Any]],
    *,
    template: str | None = None,
    max_new_tokens: int = 128,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    no_repeat_ngram_size: int | None = None,
    seed: int = 10,
    trust_remote_code: bool = False,
) -> tuple[list[str], str]:
    """Answers of one model to instruction records and a line naming the template and decoding used.

    Defaults are the model's own (`prompt_template`, `decoding`); `minillm eval` keeps the paper's decoding.
    """
    path = models.resolve(model_spec, trust_remote_code)
    tok = models.load_tokenizer(model_spec, trust_remote_code=trust_remote_code)
    model = models.load_model(model_spec, trust_remote_code=trust_remote_code)
    why = "as asked"
    if template is None:
        template, why = prompt_template(path, tok)
    gen, how = decoding(
        model, temperature=temperature, top_p=top_p, top_k=top_k, no_repeat_ngram_size=no_repeat_ngram_size
    )
    if gen.eos_token_id is None:
        gen.eos_token_id = tok.eos_token_id
    gen.pad_token_id, gen.max_new_tokens = tok.pad_token_id, max_new_tokens
    prompts = [encode_prompt({"input": "", **r}, tok, template) for r in records]
    out = decode(model, prompts, gen, seed=seed)
    replies = [
        tok.decode(trim_at_eos(row.tolist(), tok.eos_token_id)[0], skip_special_tokens=True).strip()
        for row in out
    ]
    return replies, f"template {template} ({why}); decoding {how}"


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
    paper = dict(template="alpaca", temperature=1.0, top_p=1.0, top_k=0, no_repeat_ngram_size=6)
    replies = {
        name: answer(spec, records, max_new_tokens=64, **paper)[0] for name, spec in models_shown.items()
    }
    for i, rec in enumerate(records):
        lines += ["", f"## {rec['instruction']}"]
        lines += [f"- **{name}**: {replies[name][i]!r}" for name in models_shown]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text)
