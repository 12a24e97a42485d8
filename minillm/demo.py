"""The main job on the embedded default (`make demo`): SmolLM2-135M-Instruct teacher, a 6-layer student cut
from it, Dolly data. Cut and heal → SFT → MiniLLM, then `summary.md`: what ran, the validation figures with
the teacher and a uniform guess beside them, and answers to three DollyEval prompts with their references.
Every stage resumes, so a rerun after an interruption continues where it stopped (an interrupted cut is
redone: it takes minutes)."""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path
from typing import Any

from transformers import GenerationConfig

from minillm import config as config_lib
from minillm import models
from minillm.config import MiniLLMConfig, SFTConfig
from minillm.data.instructions import load_records
from minillm.data.tokenize import encode_prompt, encode_records
from minillm.evaluate.generate import decode, gold_nll, trim_at_eos
from minillm.train.heal import DERIVATION, cut_student, describe

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"
TEACHER = models.EMBEDDED_ALIAS
# How the student is cut (bench/RESULTS.md, "Cutting a student"): of the 6-of-30 layer sets measured, 0, 1,
# 15, 27, 28, 29 starts closest to the teacher (11.4 nats/token on Dolly validation; every fifth layer: 17.3),
# and 30 steps of KD on pre-training text take it to 6.7 before any SFT.
LAYERS = [0, 1, 15, 27, 28, 29]
HEAL = dict(heal_steps=30, heal_lr=5e-4, heal_batch_size=8, heal_block_length=256)


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


def _lines(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _metric(run: Path, key: str) -> tuple[float, float]:
    values = [m[key] for m in _lines(run) if key in m]
    return values[0], values[-1]


def _valid_loss(model_spec: str, cfg: SFTConfig) -> float:
    """Token-averaged response cross-entropy on the SFT stage's validation records (as its valid/loss)."""
    tok = models.load_tokenizer(model_spec)
    records = load_records(cfg.valid_data, limit=cfg.max_valid_examples)
    examples, _ = encode_records(
        records,
        tok,
        template=cfg.template,
        max_prompt_length=cfg.max_prompt_length,
        max_length=cfg.max_length,
    )
    sums = gold_nll(models.load_model(model_spec), examples, tok.pad_token_id, batch_size=cfg.batch_size)
    return sum(s for s, _ in sums) / sum(n for _, n in sums)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="minillm demo", description=__doc__)
    p.add_argument("--out", default="runs/demo", help="Folder for every stage's output.")
    args = p.parse_args(argv)
    out = Path(args.out)
    student_init = out / "student-init"
    if not (student_init / DERIVATION).is_file():
        print(describe(cut_student(TEACHER, student_init, layers=LAYERS, **HEAL)) + f" → {student_init}")
    made = json.loads((student_init / DERIVATION).read_text())

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

    healed, after_sft = _metric(out / "sft", "valid/loss")
    evals = [m for m in _lines(out / "minillm") if "valid/rougeL" in m]
    start, best = evals[0], max(evals[1:], key=lambda m: m["valid/rougeL"])  # what best/ holds
    kl_heal = made["heal_kl"]
    n_valid, n_mini = sft_cfg.max_valid_examples, distill_cfg.max_valid_examples
    lines = [
        "# minillm demo: SmolLM2-135M-Instruct distilled into a 6-layer student",
        "",
        f"The student keeps layers {made['layers']} of the teacher's {made['teacher_layers']} "
        f"({made['parameters'] / 1e6:.1f}M parameters against the teacher's "
        f"{made['teacher_parameters'] / 1e6:.1f}M), is healed by "
        f"{made['heal_steps']} steps of KD towards the teacher on pre-training text (KL {kl_heal[0]:.2f} → "
        f"{kl_heal[-1]:.2f} nats/token), fine-tuned on Dolly for {sft_cfg.max_steps} steps of "
        f"{sft_cfg.batch_size} records (SFT), then trained by MiniLLM for {distill_cfg.max_steps} steps. "
        "A few CPU minutes, not the paper's hours: the student is still far from the teacher.",
        "",
        f"## Next-token loss on {n_valid} Dolly validation answers (nats/token, lower is better)",
        "",
        "| model | loss |",
        "|---|---:|",
        f"| a uniform guess over {len(models.load_tokenizer(TEACHER))} tokens | {math.log(len(models.load_tokenizer(TEACHER))):.2f} |",
        f"| teacher | {_valid_loss(TEACHER, sft_cfg):.2f} |",
        f"| student, cut and healed | {healed:.2f} |",
        f"| student after SFT | {after_sft:.2f} |",
        "",
        f"## MiniLLM on {n_mini} validation prompts (answers of at most {distill_cfg.valid_max_new_tokens} tokens)",
        "",
        f"| metric | SFT student | after MiniLLM (best checkpoint: step {best['step']}) |",
        "|---|---:|---:|",
        f"| Rouge-L against the reference answer (higher is better) | {start['valid/rougeL']:.2f} "
        f"| {best['valid/rougeL']:.2f} |",
        f"| reverse KL(student ‖ teacher) per answer, nats (lower is better) | {start['valid/reverse_kl']:.1f} "
        f"| {best['valid/reverse_kl']:.1f} |",
        "",
        "## Answers to three DollyEval prompts",
        "",
        "Sampled with the paper's decoding (temperature 1, no top-k/top-p, no repeated 6-grams, at most 64 "
        "tokens), so each run differs; `minillm generate` answers with a model's own settings instead.",
    ]
    records = load_records("dolly_test", limit=3)
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
        lines += ["", f"### {rec['instruction']}", f"- *reference*: {rec['output']!r}"]
        lines += [f"- **{name}**: {replies[name][i]!r}" for name in models_shown]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text)
