"""Every training stage for 3 steps at the docs/design.md §5 shape, timed per phase (meant for one GPU).

GPT-2-XL-shaped teacher (48 layers, width 1600, 1.56B) and GPT-2-shaped student (12 x 768, 124M), random
weights, V = 50257, 64 prompts of 128 tokens, 256 new tokens. SFT, KD, SeqKD, GKD (always on-policy) and
MiniLLM (α = 0.2) each run 3 optimizer steps through their real trainers (`minillm.train.*`, default
settings: fp32 master weights under bf16 autocast on a GPU, every fast path on) on models saved to a
temporary folder with an offline word-level tokenizer whose 50257 ids are all reachable; no download.
Prints, per stage and step, the phase times the trainer logs (`metrics.jsonl`) with the peak GPU memory
of each phase, then MiniLLM's figures against design §5's targets over steps 2-3 (step 1 also holds
warm-up and, in SFT, KD and SeqKD, the step-0 validation). The whole check takes under 8 minutes on one
H100 (not yet run on one).

    python bench/gpu_check.py                      # the design shape, on the GPU
    python bench/gpu_check.py --device cpu --tiny  # tiny shapes on a CPU, to check the script
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast

from minillm import config as config_lib
from minillm.config import GKDConfig, KDConfig, MiniLLMConfig, SeqKDConfig, SFTConfig
from minillm.data.template import ALPACA_NO_INPUT, build_prompt
from minillm.train import engine, gkd, kd, seqkd, sft
from minillm.train import minillm as minillm_train

EOS, UNK = "<|endoftext|>", "<unk>"

STAGES = ("sft", "kd", "seqkd", "gkd", "minillm")
# design §5's targets for one MiniLLM iteration at the full shape on one H100
TARGET_ITERATION_S, TARGET_SAMPLING_S, TARGET_PEAK_GIB = 1.5, 1.0, 16.0
FSDP_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp.yaml"
FSDP_TIMEOUT_S = 300  # a rank waiting in a collective never ends
FSDP_RTOL = 2e-2  # bf16 compute on both sides (autocast; FSDP's mixed-precision policy), summed differently


@dataclass(frozen=True)
class Shape:
    vocab: int
    prompts: int  # per optimizer step (MiniLLM: per collection), = batch_size x grad_accum
    prompt_tokens: int
    new_tokens: int
    teacher: tuple[int, int, int]  # layers, width, heads
    student: tuple[int, int, int]
    batch_size: int
    pt_block: int  # MiniLLM's PT-loss block length (default 512)
    valid: int  # validation prompts, answered with valid_tokens new tokens (MiniLLM)
    valid_tokens: int


DESIGN = Shape(50257, 64, 128, 256, (48, 1600, 25), (12, 768, 12), 16, 512, 8, 32)
TINY = Shape(256, 4, 32, 8, (3, 48, 4), (2, 32, 4), 2, 32, 2, 4)


def gpt2_config(layers: int, width: int, heads: int, vocab: int) -> GPT2Config:
    """A GPT-2 of this shape, id 0 its EOS, BOS and pad, dropout as GPT-2's (0.1)."""
    return GPT2Config(
        vocab_size=vocab,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        n_positions=1024,
        eos_token_id=0,
        bos_token_id=0,
        pad_token_id=0,
    )


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of exactly `vocab` ids: EOS (id 0, also pad), UNK, the Alpaca template's words
    and punctuation, then w0, w1, ... Whitespace splits words, so a text of n w-words is n tokens."""
    split = pre_tokenizers.Whitespace()
    words = [EOS, UNK] + sorted(
        {w for w, _ in split.pre_tokenize_str(ALPACA_NO_INPUT.format(instruction=""))}
    )
    words += [f"w{i}" for i in range(vocab - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    tok.pre_tokenizer = split
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, unk_token=UNK)


def write_data(path: Path, tokenizer: PreTrainedTokenizerFast, shape: Shape) -> None:
    """`shape.prompts` records whose Alpaca prompts are exactly `prompt_tokens` long, gold answers
    `new_tokens` long, of random w-words (seeded)."""
    template = len(tokenizer(build_prompt(""))["input_ids"])
    if template >= shape.prompt_tokens:
        raise ValueError(f"the template alone is {template} tokens, the prompts {shape.prompt_tokens}")
    g = torch.Generator().manual_seed(0)
    n_words = tokenizer.vocab_size - tokenizer.convert_tokens_to_ids("w0")

    def text(n: int) -> str:
        return " ".join(f"w{i}" for i in torch.randint(n_words, (n,), generator=g).tolist())

    with open(path, "w") as fh:
        for _ in range(shape.prompts):
            record = {
                "instruction": text(shape.prompt_tokens - template),
                "input": "",
                "output": text(shape.new_tokens),
            }
            assert len(tokenizer(build_prompt(record["instruction"]))["input_ids"]) == shape.prompt_tokens
            fh.write(json.dumps(record) + "\n")


def save_models(root: Path, shape: Shape, device: str) -> tuple[Path, Path]:
    """Random student (fp32) and teacher (bf16 on a GPU, as the trainers load it) folders with the tokenizer."""
    tokenizer = word_tokenizer(shape.vocab)
    out = []
    for name, dims, seed, dtype in (
        ("student", shape.student, 0, torch.float32),
        ("teacher", shape.teacher, 1, torch.bfloat16 if device == "cuda" else torch.float32),
    ):
        torch.manual_seed(seed)
        with torch.device(device):  # initialising 1.56B weights on a CPU takes a minute
            model = AutoModelForCausalLM.from_config(gpt2_config(*dims, shape.vocab), dtype=dtype)
        model.save_pretrained(root / name, safe_serialization=True)
        tokenizer.save_pretrained(root / name)
        out.append(root / name)
        del model
    write_data(root / "data.jsonl", tokenizer, shape)
    return out[0], out[1]


class PeakMemory:
    """Peak memory of each phase of a run: a wrapped phase function resets the device's peak counter,
    runs, and records the peak it reached; `clip_and_step` closes an update, which spans everything since
    the previous phase ended. NaN on a CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self.phases: list[tuple[str, float]] = []

    def _mark(self, label: str | None) -> None:
        if not self.cuda:
            if label is not None:
                self.phases.append((label, math.nan))
            return
        torch.cuda.synchronize()
        if label is not None:
            self.phases.append((label, torch.cuda.max_memory_allocated() / 2**30))
        torch.cuda.reset_peak_memory_stats()

    @contextlib.contextmanager
    def watch(self, spots: list[tuple[Any, str, str]]) -> Iterator[None]:
        """While inside, each (module, function name, label) is wrapped: a sampling-type phase when its
        label is not "update", else the end of an update."""
        saved = [(owner, name, getattr(owner, name)) for owner, name, _ in spots]
        for (owner, name, label), (_, _, fn) in zip(spots, saved, strict=True):
            setattr(owner, name, self._wrapped(fn, label))
        self._mark(None)
        try:
            yield
        finally:
            for owner, name, fn in saved:
                setattr(owner, name, fn)

    def _wrapped(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            if label != "update":
                self._mark(None)
            out = fn(*args, **kwargs)
            self._mark(label)
            return out

        return run


def stage_setup(
    stage: str, student: Path, teacher: Path, root: Path, shape: Shape, out: Path
) -> tuple[Callable[[Any], Path], Any, list[tuple[Any, str, str]]]:
    """`stage`'s trainer, its config for 3 optimizer steps at `shape` writing to `out`, and its phases."""
    data = str(root / "data.jsonl")
    common = dict(
        model=str(student),
        output_dir=str(out),
        train_data=data,
        valid_data=data,
        max_train_examples=shape.prompts,
        max_valid_examples=shape.valid,
        batch_size=shape.batch_size,
        grad_accum=shape.prompts // shape.batch_size,
        max_steps=3,
        eval_every=0,
        save_every=0,
        max_prompt_length=shape.prompt_tokens,
        max_length=shape.prompt_tokens + shape.new_tokens + 1,  # the gold answer and its EOS
    )
    taught = dict(teacher=str(teacher), valid_forward_kl=False)
    sampled = dict(max_new_tokens=shape.new_tokens)
    update = (engine, "clip_and_step", "update")
    train, cfg, spots = {
        "sft": (sft.train_sft, SFTConfig(**common), [update]),
        "kd": (kd.train_kd, KDConfig(**common, **taught), [update]),
        "seqkd": (
            seqkd.train_seqkd,
            SeqKDConfig(
                **common,
                **taught,
                **sampled,
                teacher_data_cache=str(root / "seqkd-cache"),
                sample_batch_size=shape.prompts,
            ),
            [(seqkd, "teacher_data", "teacher answers"), update],
        ),
        "gkd": (
            gkd.train_gkd,
            GKDConfig(**common, **taught, **sampled, lmbda=1.0),
            [(gkd, "sample_responses", "sampling"), update],
        ),
        "minillm": (
            minillm_train.train_minillm,
            MiniLLMConfig(
                **common,
                teacher=str(teacher),
                **sampled,
                num_rollouts=shape.prompts,
                ppo_epochs=1,  # one mini-batch per collection: every step samples
                pt_block_length=shape.pt_block,
                valid_max_new_tokens=shape.valid_tokens,
            ),
            [(minillm_train, "collect", "sampling + teacher"), update],
        ),
    }[stage]
    return train, cfg, spots


def run_stage(
    stage: str, student: Path, teacher: Path, root: Path, shape: Shape
) -> tuple[list[dict], PeakMemory]:
    """3 optimizer steps of `stage` at `shape`; its metrics lines and the peak memory of its phases."""
    out = root / stage
    train, cfg, spots = stage_setup(stage, student, teacher, root, shape, out)
    memory = PeakMemory("cuda" if torch.cuda.is_available() else "cpu")
    with memory.watch(spots):
        train(cfg)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], memory


def run_fsdp(stage: str, student: Path, teacher: Path, root: Path, shape: Shape) -> list[dict]:
    """`stage` as `run_stage` runs it, under accelerate's FSDP2 engine (configs/accelerate/fsdp.yaml) on
    every visible GPU, launched as docs/distributed.md says; its metrics lines. Its last checkpoint must
    load as a plain model: the full weights, gathered from the shards."""
    out = root / f"{stage}-fsdp"
    _, cfg, _ = stage_setup(stage, student, teacher, root, shape, out)
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", str(FSDP_CONFIG)]
    cmd += ["--num_processes", str(torch.cuda.device_count()), "-m", "minillm.cli", stage]
    subprocess.run([*cmd, *config_lib.to_argv(cfg)], check=True, timeout=FSDP_TIMEOUT_S)
    AutoModelForCausalLM.from_pretrained(out / "best")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def fsdp_rows(stage: str, one: list[dict], fsdp: list[dict]) -> list[tuple[str, int, float, float, str]]:
    """(stage, step, loss in one process, loss under FSDP, agree) per step. Step 1's loss is taken before
    any update, so the two differ by bf16 rounding only (FSDP_RTOL); later steps are shown, not judged."""
    rows = []
    for a, b in zip([m for m in one if m["step"] > 0], [m for m in fsdp if m["step"] > 0], strict=True):
        rel = abs(b["loss"] - a["loss"]) / max(abs(a["loss"]), 1e-12)
        verdict = ("yes" if rel <= FSDP_RTOL else "NO") if a["step"] == 1 else "-"
        rows.append((stage, int(a["step"]), a["loss"], b["loss"], verdict))
    return rows


def stage_rows(stage: str, lines: list[dict], memory: PeakMemory) -> list[tuple[str, int, str, float, float]]:
    """(stage, step, phase, seconds, peak GiB) per phase of steps 1-3."""
    steps = [m for m in lines if m["step"] > 0]
    peaks: dict[str, list[float]] = {}
    for label, peak in memory.phases:
        peaks.setdefault(label, []).append(peak)
    rows = []
    for i, m in enumerate(steps):
        step = int(m["step"])
        if stage == "minillm":
            sampling = peaks["sampling + teacher"][i]
            rows.append((stage, step, "mixed sampling", m["time/sample"] - m["time/teacher"], sampling))
            rows.append((stage, step, "teacher pass", m["time/teacher"], sampling))
        elif stage == "gkd":
            rows.append((stage, step, "sampling", m["time/sample"], peaks["sampling"][i]))
        elif stage == "seqkd" and i == 0:
            start = next(x for x in lines if x["step"] == 0)
            rows.append((stage, 0, "teacher answers", start["time/generate"], peaks["teacher answers"][0]))
        rows.append((stage, step, "update", m["time/update"], peaks["update"][i]))
    return rows


def minillm_targets(rows: list[tuple[str, int, str, float, float]]) -> list[tuple[str, float, float, str]]:
    """(figure, measured, target, unit) over MiniLLM's steps 2-3: the worse step of each."""
    later = [r for r in rows if r[0] == "minillm" and r[1] >= 2]
    per_step: dict[int, float] = {}
    for _, step, _, seconds, _ in later:
        per_step[step] = per_step.get(step, 0.0) + seconds
    sampling = max(r[3] for r in later if r[2] == "mixed sampling")
    peak = max(r[4] for r in later)
    return [
        ("full iteration (sampling + teacher + update)", max(per_step.values()), TARGET_ITERATION_S, "s"),
        ("mixed sampling (α = 0.2, both KV caches)", sampling, TARGET_SAMPLING_S, "s"),
        ("peak memory", peak, TARGET_PEAK_GIB, "GiB"),
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cuda: the first GPU.")
    p.add_argument("--tiny", action="store_true", help="Tiny shapes, to check the script on a CPU.")
    p.add_argument("--stages", default=",".join(STAGES), help="Comma-separated subset to run, in this order.")
    p.add_argument(
        "--fsdp-stages",
        default="minillm",
        help="Of --stages, those also run under accelerate's FSDP2 engine on every visible GPU ('' for none). "
        "CUDA only: accelerate runs FSDP on GPUs only.",
    )
    args = p.parse_args(argv)
    stages = args.stages.split(",")
    if not set(stages) <= set(STAGES):
        p.error(f"--stages takes {', '.join(STAGES)}; got {args.stages}")
    fsdp_stages = [s for s in args.fsdp_stages.split(",") if s] if args.device == "cuda" else []
    if not set(fsdp_stages) <= set(stages):
        p.error(f"--fsdp-stages takes stages of --stages ({args.stages}); got {args.fsdp_stages}")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the trainers take the GPU whenever one is visible
    elif not torch.cuda.is_available():
        raise SystemExit(
            "no CUDA device: run `python bench/gpu_check.py --device cpu --tiny` to check the script"
        )
    shape = TINY if args.tiny else DESIGN
    t0 = time.perf_counter()
    rows, walls, fsdp = [], [("random models and data", 0.0)], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        student, teacher = save_models(root, shape, args.device)
        walls[0] = (walls[0][0], time.perf_counter() - t0)
        for stage in stages:
            t1 = time.perf_counter()
            lines, memory = run_stage(stage, student, teacher, root, shape)
            rows += stage_rows(stage, lines, memory)
            walls.append((stage, time.perf_counter() - t1))  # loading, validation, checkpoint included
            if stage in fsdp_stages:
                t1 = time.perf_counter()
                fsdp += fsdp_rows(stage, lines, run_fsdp(stage, student, teacher, root, shape))
                walls.append((f"{stage} under FSDP", time.perf_counter() - t1))
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(
        f"\ndevice {name}, V={shape.vocab}, {shape.prompts} prompts of {shape.prompt_tokens} tokens, "
        f"{shape.new_tokens} new tokens, teacher {shape.teacher}, student {shape.student} (layers, width, heads)\n"
    )
    print("| stage | step | phase | seconds | peak GPU GiB |\n|---|---:|---|---:|---:|")
    for stage, step, phase, seconds, peak in rows:
        print(f"| {stage} | {step} | {phase} | {seconds:.3f} | {peak:.2f} |")
    if "minillm" in stages:
        print("\n| MiniLLM, worse of steps 2-3 | measured | target | met |\n|---|---:|---:|---|")
        for figure, value, target, unit in minillm_targets(rows):
            met = "n/a" if args.tiny or math.isnan(value) else ("yes" if value <= target else "NO")
            print(f"| {figure} | {value:.3f} {unit} | ≤ {target} {unit} | {met} |")
    if fsdp:
        print(
            f"\n| FSDP2, {torch.cuda.device_count()} GPU(s) | step | loss, one process | loss, FSDP | step 1 agrees |"
        )
        print("|---|---:|---:|---:|---|")
        for stage, step, one, sharded, verdict in fsdp:
            print(f"| {stage} | {step} | {one:.5f} | {sharded:.5f} | {verdict} |")
    else:
        print("\nFSDP2: not run (accelerate runs FSDP on GPUs only; --fsdp-stages)")
    print("\n| part | wall seconds |\n|---|---:|")
    for part, seconds in walls:
        print(f"| {part} | {seconds:.1f} |")
    print(f"| all (budget on one H100: 480) | {time.perf_counter() - t0:.1f} |")


if __name__ == "__main__":
    main()
