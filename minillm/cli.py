"""`minillm <command> [--config FILE.yaml] [--field value ...]`.

Stage commands take a YAML config and flags named exactly as their config dataclass's fields (generated,
never written by hand). The tool commands (derive-student, generate, report) take plain flags.

Errors are reported here, once, as one line `minillm <command>: <message>` on stderr: bad input (a config
value, a data file, a model or output folder) exits with status 2, a runtime failure (a write that failed,
a run that diverged) with 1. `--debug`, anywhere on the line, shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from collections.abc import Callable

from minillm import config as config_lib
from minillm.errors import InputError

# command → (config class name, "module:function" that runs it)
STAGE_COMMANDS: dict[str, tuple[str, str, str]] = {
    "sft": ("SFTConfig", "minillm.train.sft:train_sft", "Supervised fine-tuning on response tokens."),
    "kd": (
        "KDConfig",
        "minillm.train.kd:train_kd",
        "Word-level KD: kd_ratio·D(teacher, student) + CE on gold.",
    ),
    "seqkd": (
        "SeqKDConfig",
        "minillm.train.seqkd:train_seqkd",
        "SeqKD: cached teacher responses, then fine-tuning.",
    ),
    "gkd": (
        "GKDConfig",
        "minillm.train.gkd:train_gkd",
        "On-policy KD (GKD): student samples with probability lmbda.",
    ),
    "distill": (
        "MiniLLMConfig",
        "minillm.train.minillm:train_minillm",
        "MiniLLM: reverse-KL policy-gradient distillation on the student's own samples.",
    ),
    "eval": (
        "EvalConfig",
        "minillm.evaluate.protocol:run_eval",
        "The paper's evaluation: sampled answers, Rouge-L.",
    ),
    "eval-exposure": (
        "ExposureConfig",
        "minillm.evaluate.exposure:run_exposure",
        "Exposure bias (ExAccErr).",
    ),
    "eval-calibration": (
        "CalibrationConfig",
        "minillm.evaluate.calibration:run_calibration",
        "Calibration (ECE) of label-word probabilities.",
    ),
}


def _load(target: str) -> Callable:
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)


def _run_stage(command: str, argv: list[str]) -> None:
    cls_name, target, about = STAGE_COMMANDS[command]
    cls = getattr(config_lib, cls_name)
    if "-h" in argv or "--help" in argv:
        print(
            f"usage: minillm {command} [--config FILE.yaml] [--field value ...]\n\n{about}\n\nfields:\n"
            f"{config_lib.help_text(cls)}"
        )
        return
    config_file = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise config_lib.ConfigError("--config needs a file")
        config_file, argv = argv[i + 1], argv[:i] + argv[i + 2 :]
    cfg = config_lib.parse(cls, config_file, argv)
    _load(target)(cfg)
    _load("minillm.train.engine:end_process_group")()  # once the stage's models are freed


def _derive_student(argv: list[str]) -> None:
    p = argparse.ArgumentParser(
        prog="minillm derive-student",
        description="Cut a student from a teacher by keeping some of its layers.",
    )
    p.add_argument("--teacher", required=True, help="Teacher: hub id, folder, .gguf or alias.")
    p.add_argument(
        "--output", required=True, help="Folder for the student (Hugging Face format, safetensors)."
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--num-layers", type=int, help="Keep this many layers, spread evenly from layer 0.")
    g.add_argument("--layers", help="Comma-separated layer indices to keep, e.g. 0,5,10,15,20,25.")
    h = p.add_argument_group("healing: KD towards the teacher on pre-training text after the cut")
    h.add_argument("--heal-steps", type=int, default=0, help="AdamW steps (0 = no healing).")
    h.add_argument("--heal-lr", type=float, default=5e-4, help="Learning rate of the healing steps.")
    h.add_argument("--heal-batch-size", type=int, default=8, help="Blocks per healing step.")
    h.add_argument("--heal-block-length", type=int, default=256, help="Tokens per pre-training block.")
    h.add_argument("--heal-data", default="pretrain", help="Shipped name or .jsonl(.gz) with a 'text' field.")
    h.add_argument("--seed", type=int, default=10, help="Seed of the healing blocks' draws.")
    p.add_argument("--trust-remote-code", action="store_true", help="Allow model code from the hub.")
    args = p.parse_args(argv)
    from minillm.train.heal import cut_student, describe

    made = cut_student(
        args.teacher,
        args.output,
        layers=[int(x) for x in args.layers.split(",")] if args.layers else None,
        num_layers=args.num_layers,
        heal_steps=args.heal_steps,
        heal_lr=args.heal_lr,
        heal_batch_size=args.heal_batch_size,
        heal_block_length=args.heal_block_length,
        heal_data=args.heal_data,
        seed=args.seed,
        trust_remote_code=args.trust_remote_code,
    )
    print(f"{describe(made)} → {args.output}")


def _export(argv: list[str]) -> None:
    p = argparse.ArgumentParser(
        prog="minillm export", description="Write a checkpoint as a Hugging Face folder (safetensors)."
    )
    p.add_argument(
        "--model", required=True, help="Checkpoint folder (full weights or LoRA adapters) or model."
    )
    p.add_argument("--output", required=True, help="Folder to write (weights, config, tokenizer).")
    p.add_argument(
        "--merge",
        action="store_true",
        help="Merge LoRA adapters into their base (peft merge_and_unload): a plain model folder. Without it "
        "an adapter checkpoint is written as its adapters (peft format, loaded over the base).",
    )
    p.add_argument("--trust-remote-code", action="store_true", help="Allow model code from the hub.")
    args = p.parse_args(argv)
    from minillm import models

    models.export(args.model, args.output, merge=args.merge, trust_remote_code=args.trust_remote_code)
    print(f"{args.model} → {args.output}")


def _generate(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="minillm generate", description="Answer prompts with any model.")
    p.add_argument("--model", required=True, help="Hub id, folder, .gguf or alias.")
    p.add_argument("--prompt", required=True, action="append", help="Instruction text (repeatable).")
    p.add_argument("--input", default="", help="Optional input/context for the instruction.")
    p.add_argument(
        "--template",
        choices=["alpaca", "chat"],
        help="Prompt template. Default: the one a minillm run trained the model with, else the tokenizer's "
        "chat template when it has one, else alpaca.",
    )
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--temperature",
        type=float,
        help="0 = greedy, > 0 samples. Default: the model's generation config, greedy when it has none "
        "(the paper's evaluation decoding, `minillm eval`: 1 with --top-k 0 --top-p 1).",
    )
    p.add_argument("--top-p", type=float, help="Nucleus mass when sampling. Default: the model's.")
    p.add_argument("--top-k", type=int, help="Top-k when sampling (0 = off). Default: the model's.")
    p.add_argument("--no-repeat-ngram-size", type=int, help="Ban repeated n-grams. Default: the model's.")
    p.add_argument("--seed", type=int, default=10)
    p.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args(argv)
    if args.temperature is not None and args.temperature < 0:
        raise InputError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    from minillm.demo import answer

    records = [{"instruction": text, "input": args.input} for text in args.prompt]
    answers, used = answer(
        args.model,
        records,
        template=args.template,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        seed=args.seed,
        trust_remote_code=args.trust_remote_code,
    )
    print(used, file=sys.stderr)
    for text, reply in zip(args.prompt, answers, strict=True):
        print(f"### {text}\n{reply}\n")


def _report(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="minillm report", description="Tables and plots from evaluation runs.")
    p.add_argument("run_dirs", nargs="+", help="Evaluation output folders (one per model).")
    p.add_argument("--out", default="runs/report", help="Folder for report.md, report.csv and plots.")
    p.add_argument("--baseline", default=None, help="Model name the others are compared with (e.g. SFT).")
    p.add_argument(
        "--rescore",
        action="store_true",
        help="Recompute every score from the generations beside each results.json (no weights needed); "
        "a recorded score they do not reproduce is an error.",
    )
    p.add_argument("--ablations", default="", help="Comma-separated model names shown in their own table.")
    p.add_argument("--ablation-base", default=None, help="The model the ablations are compared with.")
    p.add_argument("--order", default="", help="Comma-separated model names: the tables' row order.")
    args = p.parse_args(argv)
    from minillm.report import make_report

    ablations = [a for a in args.ablations.split(",") if a]
    if ablations and not args.ablation_base:
        raise InputError("--ablations needs --ablation-base, the model they are compared with")
    path = make_report(
        args.run_dirs,
        args.out,
        args.baseline,
        rescore=args.rescore,
        ablations=ablations,
        ablation_base=args.ablation_base,
        order=[n for n in args.order.split(",") if n],
    )
    print(path)


def _publish(argv: list[str]) -> None:
    p = argparse.ArgumentParser(
        prog="minillm publish",
        description="Copy evaluation results, without weights, into one folder per model: the JSON results and "
        "the generations as generations.jsonl.gz, from which `minillm report --rescore` rebuilds every score.",
    )
    p.add_argument(
        "run_dirs",
        nargs="+",
        help="Folders holding results/exposure/calibration JSON files, or training runs' folders (their "
        "metrics.jsonl goes to OUT/training/).",
    )
    p.add_argument("--out", default="results", help="Destination folder.")
    args = p.parse_args(argv)
    from minillm.publish import publish

    for folder in publish(args.run_dirs, args.out):
        print(folder)


TOOL_COMMANDS = {
    "derive-student": (_derive_student, "Cut a student from a teacher by keeping some of its layers."),
    "export": (_export, "A checkpoint as a Hugging Face folder; --merge folds LoRA adapters in."),
    "generate": (_generate, "Answer prompts with any model."),
    "report": (_report, "Markdown/CSV tables and PNG plots from evaluation runs."),
    "publish": (
        _publish,
        "Evaluation results and generations, without weights, ready to commit and rescore.",
    ),
    "experiment": (
        lambda argv: _load("minillm.experiment:main")(argv),
        "Run a comparison plan (configs/experiments/comparison.yaml), resuming what is not done.",
    ),
    "demo": (lambda argv: _load("minillm.demo:main")(argv), "The main job on the embedded pair (make demo)."),
}


def _exit_status(error: BaseException) -> int | None:
    """2 for input the user can fix, 1 for a runtime failure, None for a bug (shown with its traceback)."""
    if isinstance(error, (InputError, FileNotFoundError)):
        return 2
    if isinstance(error, (OSError, FloatingPointError, MemoryError)):
        return 1
    return None


def _close_progress_bars() -> None:
    """A run stopped inside its loop leaves its progress bar open: close it, so the message gets its own line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if argv[:1] == ["--version"]:
        print(f"minillm {importlib.metadata.version('minillm')}")
        return
    commands = {**{k: v[2] for k, v in STAGE_COMMANDS.items()}, **{k: v[1] for k, v in TOOL_COMMANDS.items()}}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        listing = "\n".join(f"  {k:<18}{v}" for k, v in commands.items())
        print(
            "usage: minillm <command> [--help] [--debug] ...\n       minillm --version\n\n"
            f"commands:\n{listing}\n\n--debug: show the traceback of an error instead of its one-line message"
        )
        if argv and argv[0] not in ("-h", "--help"):
            sys.exit(f"unknown command {argv[0]!r}")
        return
    command, rest = argv[0], argv[1:]
    try:
        if command in STAGE_COMMANDS:
            _run_stage(command, rest)
        else:
            TOOL_COMMANDS[command][0](rest)
    except Exception as e:
        status = _exit_status(e)
        if debug or status is None:
            raise
        _close_progress_bars()
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"minillm {command}: {message}", file=sys.stderr)
        sys.exit(status)


if __name__ == "__main__":
    main()
