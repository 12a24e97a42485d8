"""One timed run of a TRL peer trainer (MiniLLMTrainer, GKDTrainer or DistillationTrainer); prints one JSON line.

Runs under a benchmark venv: `.venv-bench` holds TRL 1.14.2 (the last release with `MiniLLMTrainer`),
`.venv-bench-116` TRL 1.16.0 (its stable `DistillationTrainer`), each beside our package installed without
its dependencies (`bench/compare_trl.py` describes the setup):

    .venv-bench/bin/python bench/trl_worker.py --pair tiny --trainer minillm --batch 8 --new-tokens 128
    .venv-bench-116/bin/python bench/trl_worker.py --pair tiny --trainer distill --batch 8 --new-tokens 128

The workload is the one `minillm distill` gets from `bench/compare_trl.py`: the first `--batch` x (steps + 1)
Dolly training instructions whose Alpaca prompt fits in `--prompt-tokens` tokens (longer prompts are dropped,
our `max_prompt_length` rule), taken in order (no shuffle), one generation per prompt, `--new-tokens` sampled
tokens at most (temperature 1, top-k 0, top-p 1), one optimizer step per generated batch (one inner epoch, no
accumulation), fp32 weights and maths (bf16 off: on this CPU fp32 is ~3x faster), TRL's defaults otherwise
(gradient checkpointing on, AdamW, lr 1e-6 linear decay). The first optimizer step is a warm-up and is reported
apart. A step is timed from `on_step_begin` to `on_step_end`, so it includes sampling, scoring, backward and
the optimizer; completion tokens are counted from the trainer's own completion mask (up to and including the
first EOS).

What each trainer optimises per step (TRL 1.14.2 source, `trl/experimental/...`), for mapping our config:
- MiniLLMTrainer (`minillm/minillm_trainer.py`, a GRPOTrainer subclass; `compute_loss` L348-411):
  loss = PG + single-step. Single-step (L273-283, L398-405): full-vocabulary KL(q‖p) summed over V, averaged
  over *every* completion position, padding after the first EOS included (its mask `shifted_labels != -100`
  at L383 is all-True: `shifted_labels` come from `input_ids`, never -100). PG: GRPOTrainer `_compute_loss`
  with loss_type "dapo" (sum over valid completion tokens / their count), ratio clipped at 1 ± 0.2 (a no-op
  with one inner epoch: ratio = 1), advantage A_t = GRPO advantage (0: the dummy reward is constant) +
  `_compute_advantage` (L291-346): r_t = log p(y_t) − log q(y_t); with the default gamma 0, A_t = r_t (no
  discount, no length normalisation, no whitening, no reward scale, no clip); with gamma > 0, the discounted
  reverse cumsum divided by the *discounted* count of remaining positions (L338-342; padding after an early
  EOS counted, since its mask is all-True). A_t is *not detached* (it comes
  from the student's differentiable forward at L355), which adds the zero-mean term ∇log q(y_t) per token.
  No PT loss, no teacher mixing, no importance weight. The student runs two differentiable forwards per
  step (L355 for the single-step term and rewards, GRPO `_compute_loss` for the PG log-probs and entropy).
- GKDTrainer (`gkd/gkd_trainer.py`): with lmbda 1 every step samples from the student (L416-429; with
  gradient checkpointing on, `use_cache=False`, so sampling re-runs the whole sequence per token, L221),
  then generalized JSD with beta 1 = full-vocabulary KL(q‖p) per completion token (L281), summed over
  completion tokens up to the first EOS and divided by `num_items_in_batch` (L305-310), which the Trainer
  counts from the collated batch's labels (here the gold responses), not from the sampled completions.
- DistillationTrainer (TRL 1.16.0, `trl/trainer/distillation_trainer.py`, a prompt-only trainer): every step
  samples from the student (`_generate_and_score_completions`), then `_compute_loss` (L1818-1922) runs the
  student's and the teacher's backbones over prompt + completion (left-padded, `logits_to_keep` = the
  completion width) and `_chunked_divergence_loss` (L101-213) the generalized JSD with `beta` (1 = reverse
  KL(q‖p), its default) over the valid completion positions, summed and divided by the step's valid
  completion tokens (`num_items_in_batch` from the sampled completions, L1795-1797). Temperature applies to
  sampling and loss alike. `minillm gkd --lmbda 1 --divergence reverse_kl --kd_ratio 1` computes the same
  loss (`bench/check_trl_distill_objective.py`).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PAIRS_DIR = ROOT / "runs" / "bench" / "pairs"
TINY_SEEDS = {"teacher": 1234, "student": 5678}


# ------------------------------------------------------------------------------------------------
# model pairs and prompts (also imported by compare_trl.py, so no TRL import at module level)


def pair_dirs(pair: str, root: Path = PAIRS_DIR) -> tuple[Path, Path]:
    """(teacher folder, student folder) of a prepared pair."""
    return root / pair / "teacher", root / pair / "student"


def prepare_pair(pair: str, root: Path = PAIRS_DIR) -> tuple[Path, Path]:
    """Build the pair's folders once (Hugging Face format, SmolLM2 tokenizer); return (teacher, student).
    Run it in our venv: the GGUF cache key is the GGUF's path, so another venv would convert it again.

    tiny:     random Llama teacher (hidden 64, 4 layers) and student (hidden 64, 2 layers), vocabulary 49152
    embedded: SmolLM2-135M-Instruct teacher (30 layers) and the student of its layers 0,5,10,15,20,25
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from minillm import models

    teacher_dir, student_dir = pair_dirs(pair, root)
    if (teacher_dir / "config.json").is_file() and (student_dir / "config.json").is_file():
        return teacher_dir, student_dir
    embedded = models.resolve(models.EMBEDDED_ALIAS)  # cached safetensors folder, with the tokenizer
    tokenizer = AutoTokenizer.from_pretrained(embedded)
    if pair == "tiny":
        for name, layers in (("teacher", 4), ("student", 2)):
            config = LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=64,
                intermediate_size=256,
                num_hidden_layers=layers,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=2048,
                tie_word_embeddings=True,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.eos_token_id,
            )
            with torch.random.fork_rng():
                torch.manual_seed(TINY_SEEDS[name])
                model = LlamaForCausalLM(config)
            out = teacher_dir if name == "teacher" else student_dir
            model.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
    elif pair == "embedded":
        teacher = models.load_model(embedded)
        student = models.derive_student(teacher, models.spread_layers(teacher.config.num_hidden_layers, 6))
        teacher_dir.parent.mkdir(parents=True, exist_ok=True)
        if not teacher_dir.exists():
            teacher_dir.symlink_to(Path(embedded).resolve(), target_is_directory=True)
        student.save_pretrained(student_dir, safe_serialization=True)
        tokenizer.save_pretrained(student_dir)
    else:
        raise ValueError(f"unknown pair {pair!r}; valid: tiny, embedded")
    return teacher_dir, student_dir


def select_records(tokenizer: Any, n: int, prompt_tokens: int) -> tuple[list[dict[str, Any]], int]:
    """The first `n` Dolly training records whose Alpaca prompt has at most `prompt_tokens` tokens, and how
    many records were skipped for a longer prompt (our `max_prompt_length` rule: drop, never truncate)."""
    from minillm.data.instructions import load_records
    from minillm.data.template import build_prompt

    out, skipped = [], 0
    for rec in load_records("dolly_train"):
        text = build_prompt(rec["instruction"], rec["input"], "alpaca")
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > prompt_tokens:
            skipped += 1
            continue
        out.append({"instruction": rec["instruction"], "input": rec["input"], "output": rec["output"]})
        if len(out) == n:
            return out, skipped
    raise ValueError(f"only {len(out)} Dolly training prompts fit in {prompt_tokens} tokens; {n} needed")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------
# the timed run


def _peak_rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from minillm.data.template import build_prompt

    teacher_dir, student_dir = pair_dirs(args.pair)
    if not (student_dir / "config.json").is_file() or not (teacher_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"pair {args.pair!r} is not prepared under {PAIRS_DIR}; run `.venv/bin/python bench/compare_trl.py "
            "--prepare-only` first (our venv has gguf, which the embedded teacher's one-time conversion needs)"
        )
    tokenizer = AutoTokenizer.from_pretrained(student_dir, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    total_steps = args.steps + args.warmup
    n = args.batch * total_steps
    if args.records:
        records = read_jsonl(args.records)[:n]
        skipped = None
    else:
        records, skipped = select_records(tokenizer, n, args.prompt_tokens)
    if len(records) < n:
        raise ValueError(f"{args.records} has {len(records)} records, {n} needed")
    prompts = [build_prompt(r["instruction"], r["input"], "alpaca") for r in records]

    torch.manual_seed(args.seed)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    common = dict(
        output_dir=str(ROOT / "runs" / "bench" / "trl-out" / f"{args.pair}-{args.trainer}"),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=total_steps,
        gradient_checkpointing=args.gradient_checkpointing == "on",
        bf16=False,
        fp16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        seed=args.seed,
        dataloader_num_workers=0,
        use_cpu=True,
    )
    tokens: list[int] = []  # valid completion tokens (up to and including the first EOS) per step
    padded: list[int] = []  # batch x longest completion per step: positions the trainer computes on
    eos_ended: list[int] = []  # completions that ended with EOS per step

    if args.trainer == "minillm":
        from trl.experimental.minillm import MiniLLMConfig, MiniLLMTrainer

        config = MiniLLMConfig(
            **common,
            num_generations=1,  # one completion per prompt, as MiniLLM samples (GRPO groups are not used)
            max_completion_length=args.new_tokens,
            num_iterations=1,  # one inner epoch: sample, one update, sample again
            steps_per_generation=1,
            shuffle_dataset=False,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            use_vllm=False,
            beta=0.0,  # no KL to a reference model (TRL default)
            single_step_decomposition=True,
            rkl_advantage=True,
            gamma=args.gamma,
            length_normalization=True,
            kd_temperature=1.0,
        )
        trainer = MiniLLMTrainer(
            model=student,
            teacher_model=teacher,
            args=config,
            train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
            processing_class=tokenizer,
        )
    elif args.trainer == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        config = GKDConfig(
            **common,
            lmbda=1.0,  # always on-policy: sample from the student every step
            beta=1.0,  # generalized JSD with beta 1 = reverse KL(q‖p)
            temperature=1.0,
            max_new_tokens=args.new_tokens,
            seq_kd=False,
        )
        rows = []
        for p, r in zip(prompts, records, strict=True):
            ids = tokenizer(p, add_special_tokens=False)["input_ids"]
            out = tokenizer(r["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append({"prompt_ids": ids, "response_ids": out[: args.new_tokens]})
        trainer = GKDTrainer(
            model=student,
            teacher_model=teacher,
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            data_collator=PromptCollator(tokenizer.pad_token_id),
        )
        generate_gkd = trainer.generate_on_policy_outputs

        def counted_gkd(model, inputs, generation_config):
            ids, mask, labels = generate_gkd(model, inputs, generation_config)
            completion = labels[:, inputs["prompts"].shape[1] :] != -100
            tokens.append(int(completion.sum()))
            padded.append(int(completion.numel()))
            is_eos = labels[:, inputs["prompts"].shape[1] :] == tokenizer.eos_token_id
            eos_ended.append(int((is_eos & completion).any(1).sum()))
            return ids, mask, labels

        trainer.generate_on_policy_outputs = counted_gkd
    elif args.trainer == "distill":
        from trl import DistillationConfig, DistillationTrainer

        config = DistillationConfig(
            **common,
            learning_rate=args.lr,
            max_completion_length=args.new_tokens,
            shuffle_dataset=False,
            temperature=1.0,  # sampling and loss
            top_p=1.0,
            top_k=0,
            use_vllm=False,
            beta=1.0,  # generalized JSD with beta 1 = reverse KL(q‖p) (TRL's default)
        )
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=config,
            train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
            processing_class=tokenizer,
        )
    else:
        raise ValueError(f"unknown trainer {args.trainer!r}; valid: minillm, gkd, distill")
    if args.trainer in (
        "minillm",
        "distill",
    ):  # GRPO-style: completions from `_generate_and_score_completions`
        generate = trainer._generate_and_score_completions
        eos_ids = torch.tensor(getattr(trainer, "eos_token_ids", [tokenizer.eos_token_id]))

        def counted(inputs):
            out = generate(inputs)
            mask = out["completion_mask"]
            tokens.append(int(mask.sum()))
            padded.append(int(mask.numel()))
            is_eos = torch.isin(out["completion_ids"], eos_ids)
            eos_ended.append(int((is_eos & mask.bool()).any(1).sum()))
            return out

        trainer._generate_and_score_completions = counted

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.t0 = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t0)

    timer = StepTimer()
    trainer.add_callback(timer)
    rss_before_train = _peak_rss_kb()
    load_s = time.perf_counter() - t_start
    trainer.train()
    if len(timer.times) != total_steps or len(tokens) != total_steps:
        raise RuntimeError(f"expected {total_steps} steps, timed {len(timer.times)}, sampled {len(tokens)}")
    w = args.warmup
    return {
        "impl": f"trl-{args.trainer}",
        "pair": args.pair,
        "batch": args.batch,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "gamma": args.gamma if args.trainer == "minillm" else None,
        "gradient_checkpointing": args.gradient_checkpointing,
        "warmup_s": timer.times[:w],
        "step_s": timer.times[w:],
        "tokens": tokens[w:],
        "padded_tokens": padded[w:],
        "eos_ended": eos_ended[w:],
        "prompt_lens": [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts],
        "skipped_long_prompts": skipped,
        "load_s": load_s,
        "peak_rss_before_train_kb": rss_before_train,
        "peak_rss_kb": _peak_rss_kb(),
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    }


class PromptCollator:
    """GKD batches from token ids: left-padded prompts for sampling (`prompts`, `prompt_attention_mask`) and
    prompt + gold response with labels on the response (replaced by the sample, since lmbda is 1)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        P = max(len(r["prompt_ids"]) for r in rows)
        L = max(len(r["prompt_ids"]) + len(r["response_ids"]) for r in rows)
        B = len(rows)
        prompts = torch.full((B, P), self.pad_id, dtype=torch.long)
        prompt_mask = torch.zeros(B, P, dtype=torch.long)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(B, L, dtype=torch.long)
        labels = torch.full((B, L), -100, dtype=torch.long)
        for b, r in enumerate(rows):
            p, full = r["prompt_ids"], r["prompt_ids"] + r["response_ids"]
            prompts[b, P - len(p) :] = torch.tensor(p)
            prompt_mask[b, P - len(p) :] = 1
            input_ids[b, L - len(full) :] = torch.tensor(full)
            attention_mask[b, L - len(full) :] = 1
            labels[b, L - len(r["response_ids"]) :] = torch.tensor(r["response_ids"])
        return {
            "prompts": prompts,
            "prompt_attention_mask": prompt_mask,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
        }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", choices=["tiny", "embedded"], required=True, help="Teacher/student pair.")
    p.add_argument(
        "--trainer",
        choices=["minillm", "gkd", "distill"],
        required=True,
        help="TRL trainer to time: 1.14.2's MiniLLMTrainer or GKDTrainer, or 1.16.0's DistillationTrainer.",
    )
    p.add_argument("--batch", type=int, default=8, help="Prompts per step (one completion each).")
    p.add_argument("--prompt-tokens", type=int, default=256, help="Prompts longer than this are skipped.")
    p.add_argument("--new-tokens", type=int, default=128, help="Sampled completion tokens at most.")
    p.add_argument("--steps", type=int, default=5, help="Timed optimizer steps (after the warm-up).")
    p.add_argument("--warmup", type=int, default=1, help="Untimed optimizer steps first.")
    p.add_argument("--gamma", type=float, default=0.0, help="MiniLLMConfig.gamma (TRL default 0).")
    p.add_argument("--gradient-checkpointing", choices=["on", "off"], default="on", help="TRL default: on.")
    p.add_argument("--records", default=None, help="JSONL of records to use (default: select them here).")
    p.add_argument("--seed", type=int, default=10, help="Trainer seed (sampling).")
    p.add_argument("--lr", type=float, default=5e-6, help="DistillationTrainer's learning rate.")
    args = p.parse_args(argv)
    result = run(args)
    sys.stdout.flush()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
