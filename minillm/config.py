"""Stage configs: one dataclass per stage, every field documented once in `metadata["help"]`.

Values come from the dataclass defaults, then a YAML file, then `--field value` flags (the flag is the
field name verbatim). Unknown keys and wrong types raise `ConfigError` naming the key and listing the
valid ones. Nothing here rewrites a user value: a conflict raises.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
import yaml

from minillm.errors import InputError


class ConfigError(InputError):
    """A config key, type or value that cannot be used; the message says which and what is valid."""


def _f(default: Any, help: str, bounds: str | None = None) -> Any:
    """A documented field; a numeric one names its valid range in `bounds` ("> 0", ">= 0", "[0, 1]",
    "(0, 1]", ...), checked by `check_bounds` for every value (each item of a list, None always allowed)."""
    metadata = {"help": help} | ({"bounds": bounds} if bounds else {})
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Fields every training stage shares (model, data, optimisation, checkpoints)."""

    command: ClassVar[str] = ""  # the stage's `minillm <command>`: progress bars and messages name it

    # --- models ---
    model: str = _f(
        "runs/student-init",
        "Student to train: hub id, local folder, .gguf file or alias (smollm2-135m-instruct).",
    )
    teacher: str | None = _f(None, "Teacher: hub id, folder, .gguf or alias. Unused by SFT.")
    teacher_device: str | None = _f(
        None,
        "Device of the teacher's decoder, e.g. cpu or cuda:1 (None = the student's). On another device its "
        "output head still sits beside the student, untied, so only final hidden states cross. Unused by SFT.",
    )
    teacher_dtype: str = _f(
        "auto",
        "Teacher weights' dtype: auto (bf16 on GPU, fp32 on CPU, where fp32 is 3x faster), float32 or "
        "bfloat16. It has no optimizer, so bf16 loses nothing; its log-probs are compared in fp32. Unused by SFT.",
    )
    trust_remote_code: bool = _f(False, "Allow model code from the hub. Off unless you trust the repository.")
    dtype: str = _f(
        "auto",
        "Student weights' dtype: auto or float32, the same (fp32 master weights for AdamW; on a GPU the "
        "forwards run in bf16 under autocast, mixed_precision). bfloat16 is refused: at lr 5e-6 an update is "
        "~1e-4 of a weight, below bf16's resolution (2^-8 relative), so most updates would round away.",
    )
    # --- data ---
    train_data: str = _f(
        "dolly_train",
        "Training instructions: shipped name (dolly_train, ...), a "
        ".jsonl/.jsonl.gz path, or hf:NAME[:SPLIT] for a Hugging Face dataset.",
    )
    valid_data: str = _f("dolly_valid", "Validation instructions, same forms as train_data.")
    max_train_examples: int | None = _f(
        None, "Keep only the first N training records (None = all).", bounds="> 0"
    )
    max_valid_examples: int | None = _f(
        500,
        "Keep only the first N validation records. Official: 500 for "
        "MiniLLM's validation generation, 1000 for SFT loss.",
        bounds="> 0",
    )
    field_instruction: str = _f("instruction", "Record key holding the instruction.")
    field_input: str = _f("input", "Record key holding the optional input/context.")
    field_output: str = _f("output", "Record key holding the reference response.")
    template: str = _f("alpaca", "Prompt template: alpaca (the paper's, no BOS) or chat (the tokenizer's).")
    max_prompt_length: int = _f(
        256, "Prompts longer than this many tokens are dropped (official rule).", bounds="> 0"
    )
    max_length: int = _f(
        512, "Prompt + response tokens are capped at this length (official: 512).", bounds="> 0"
    )
    # --- optimisation ---
    seed: int = _f(10, "Seed of every named generator (data order, sampling, PT blocks).", bounds=">= 0")
    lr: float = _f(5e-6, "Peak learning rate of AdamW.", bounds="> 0")
    weight_decay: float = _f(1e-6, "AdamW weight decay (official MiniLLM: 1e-6).", bounds=">= 0")
    adam_beta1: float = _f(0.9, "AdamW beta1.", bounds="[0, 1)")
    adam_beta2: float = _f(0.95, "AdamW beta2 (official MiniLLM: 0.95).", bounds="[0, 1)")
    lr_schedule: str = _f("constant", "constant (after warm-up; official MiniLLM) or cosine (to 0).")
    warmup_steps: int = _f(100, "Linear warm-up steps (official MiniLLM: 100).", bounds=">= 0")
    max_steps: int = _f(5000, "Optimizer steps at most.", bounds="> 0")
    epochs: int = _f(
        10, "Passes over the training data at most (whichever of max_steps/epochs ends first).", bounds="> 0"
    )
    batch_size: int = _f(8, "Sequences per micro-batch per process.", bounds="> 0")
    grad_accum: int = _f(1, "Micro-batches per optimizer step.", bounds="> 0")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).", bounds=">= 0")
    mixed_precision: str = _f("auto", "no, bf16 or auto (bf16 on a GPU that supports it, no on CPU).")
    chunk_size: int = _f(
        256,
        "Tokens per chunk of every full-vocabulary loss: peak loss memory is "
        "chunk_size x vocab, never batch x length x vocab.",
        bounds="> 0",
    )
    gradient_checkpointing: bool = _f(
        False, "Recompute the student's layer activations in backward: less memory for one more forward."
    )
    # --- LoRA (peft) ---
    lora_r: int = _f(
        0,
        "LoRA rank r: train low-rank adapters on the student (peft LoraConfig's r) and keep its weights "
        "frozen; checkpoints then hold the adapters only. 0 = off (full fine-tuning).",
        bounds=">= 0",
    )
    lora_alpha: int = _f(
        8,
        "LoRA scaling numerator: adapter updates are scaled by lora_alpha / lora_r (peft's lora_alpha, default 8).",
        bounds="> 0",
    )
    lora_dropout: float = _f(
        0.0,
        "Dropout on the adapters' input in [0, 1) (peft's lora_dropout, default 0). Like any dropout it is drawn "
        "in training passes only; > 0 forgoes MiniLLM's sampling cache.",
        bounds="[0, 1)",
    )
    lora_target_modules: list[str] | None = _f(
        None,
        "Module names that get adapters, e.g. q_proj,v_proj, or all-linear (peft's target_modules); "
        "None = peft's default for the architecture.",
    )
    # --- bookkeeping ---
    output_dir: str = _f("runs/out", "Run folder: checkpoints, metrics.jsonl, TensorBoard logs.")
    eval_every: int = _f(100, "Validate every N optimizer steps (0 = only at the end).", bounds=">= 0")
    save_every: int = _f(100, "Checkpoint every N optimizer steps (0 = only at the end).", bounds=">= 0")
    keep_last: int = _f(1, "Periodic checkpoints kept besides the best one.", bounds="> 0")
    best_metric: str = _f("valid/loss", "Metric that picks the best checkpoint.")
    best_mode: str = _f("min", "min or max: whether a lower or higher best_metric is better.")
    valid_rouge_l: bool = _f(
        False,
        "Also report valid/rougeL at each evaluation: Rouge-L of answers to the validation prompts, decoded as "
        "`minillm eval` decodes (the paper's settings), for best_metric valid/rougeL (the paper picks teachers "
        "and MiniLLM students by it). Costs one generation pass over the validation prompts per evaluation.",
    )
    valid_max_new_tokens: int = _f(
        256, "New tokens per sampled validation answer (paper: 256).", bounds="> 0"
    )
    log_every: int = _f(1, "Write a metrics line every N optimizer steps.", bounds="> 0")
    resume: bool = _f(False, "Continue from the latest checkpoint in output_dir, exactly.")

    def __post_init__(self) -> None:
        check_bounds(self)
        _choice(self, "template", ("alpaca", "chat"))
        _choice(self, "lr_schedule", ("constant", "cosine"))
        _choice(self, "mixed_precision", ("auto", "no", "bf16"))
        _choice(self, "dtype", ("auto", "float32", "bfloat16"))
        if self.dtype == "bfloat16":
            raise ConfigError(
                "dtype bfloat16 is refused for a trained student: AdamW's small updates (lr 5e-6 moves a "
                "weight by ~1e-4 of itself) round away in bf16 weights. Keep dtype auto (fp32 master weights) "
                "and set mixed_precision bf16 for bf16 compute."
            )
        _choice(self, "teacher_dtype", ("auto", "float32", "bfloat16"))
        if self.teacher_device is not None:
            try:
                torch.device(self.teacher_device)
            except RuntimeError:
                raise ConfigError(
                    f"teacher_device must name a torch device (cpu, cuda, cuda:1, ...), got {self.teacher_device!r}"
                ) from None
        _choice(self, "best_mode", ("min", "max"))
        if self.best_metric == "valid/rougeL" and not self.valid_rouge_l:
            raise ConfigError("best_metric valid/rougeL needs valid_rouge_l true (it is reported only then)")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"max_prompt_length ({self.max_prompt_length}) must be < max_length ({self.max_length})"
            )


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: cross-entropy on response tokens (prompt masked, first EOS a target)."""

    command: ClassVar[str] = "sft"

    lr: float = _f(
        5e-5, "Peak learning rate. Official Dolly SFT scripts use 5e-4 (GPT-2) to 1e-5 (large).", bounds="> 0"
    )
    warmup_steps: int = _f(0, "Linear warm-up steps.", bounds=">= 0")
    max_valid_examples: int | None = _f(
        1000, "Validation records for the loss (official: 1000).", bounds="> 0"
    )


@dataclass
class MiniLLMConfig(TrainConfig):
    """MiniLLM: reverse KL(student ‖ teacher) minimised by a PPO-style policy gradient on the student's own
    (teacher-mixed) samples. Defaults are the official schedule (LMOps minillm/scripts, all families)."""

    command: ClassVar[str] = "distill"

    teacher: str | None = _f("smollm2-135m-instruct", "Teacher (frozen): hub id, folder, .gguf or alias.")
    max_valid_examples: int | None = _f(
        500, "Validation prompts answered for Rouge-L (official: 500).", bounds="> 0"
    )
    num_rollouts: int = _f(
        256, "Prompts sampled per rollout collection, all processes together (official: 256).", bounds="> 0"
    )
    ppo_epochs: int = _f(
        4,
        "Passes over each collection (official: 4). Mini-batch = batch_size x grad_accum x processes.",
        bounds="> 0",
    )
    teacher_mix_alpha: float = _f(
        0.2,
        "Teacher weight α in the sampling mixture α·p + (1−α)·q_old (paper and official: 0.2; 0 = no mixing).",
        bounds="[0, 1]",
    )
    gamma: float = _f(
        0.95,
        "Discount γ of the long-horizon return (official: 0.95; the paper's formula has none, γ = 1).",
        bounds="[0, 1]",
    )
    return_inclusive: bool = _f(
        True,
        "Return from t inclusive (official) or from t+1 (paper Eq. 3, which pairs with the single-step term).",
    )
    length_norm: bool = _f(
        True, "Divide the return by the number of remaining tokens (paper and official). Ablation: off."
    )
    whiten: str = _f(
        "masked",
        "Advantage whitening: masked (valid tokens only, our default), official (padding counted, as LMOps) or off.",
    )
    reward_scale: float = _f(
        2.0,
        "Rewards are multiplied by this before clipping (official --reward-scaling 0.5 divides, i.e. x2).",
        bounds="> 0",
    )
    reward_clip: float = _f(100.0, "Rewards are clipped to ±this (official: 100).", bounds="> 0")
    clip_eps: float = _f(0.2, "PPO ratio clip ε (official: 0.2).", bounds="> 0")
    single_step: bool = _f(
        True,
        "Add the exact full-vocabulary KL(q‖p) at each sampled position (paper section 2.2). Ablation: off.",
    )
    single_step_weight: str = _f(
        "none",
        "Weight of the single-step KL at each sampled token: none (official code, unweighted) or token (paper "
        "Eq. 7: the rollout-time importance weight w_t = q_old(y_t)/p̃(y_t); equal to none at α = 0).",
    )
    pt_loss: str = _f(
        "ce+kd",
        "Loss on pre-training blocks: none, ce (paper) or ce+kd (official: (1-kd_ratio)·CE + kd_ratio·teacher soft-CE).",
    )
    kd_ratio: float = _f(0.5, "Teacher share of the ce+kd PT loss (official kd_ratio: 0.5).", bounds="[0, 1]")
    pt_coef: float = _f(1.0, "Weight of the PT loss in the total (official lm_coef: 1).", bounds=">= 0")
    pt_data: str = _f(
        "pretrain", "Pre-training text: shipped name 'pretrain' or a .jsonl(.gz) with a 'text' field."
    )
    pt_block_length: int = _f(
        512, "Tokens per pre-training block (official: 512); documents joined with EOS.", bounds="> 0"
    )
    max_new_tokens: int = _f(
        256, "Sampled response tokens at most (official: max_length 512 - prompt 256).", bounds="> 0"
    )
    sample_temperature: float = _f(1.0, "Sampling temperature of both models (official: 1).", bounds="> 0")
    top_k: int = _f(0, "Top-k of sampling (official: 0 = off).", bounds=">= 0")
    top_p: float = _f(1.0, "Top-p of sampling (official: 1 = off).", bounds="(0, 1]")
    fast_rollout: bool = _f(True, "Use the static-cache decode loop (same samples as the eager loop).")
    teacher_cache_mib: float = _f(
        256.0,
        "Keep a collection's teacher log-probs (fp32, exact) when rollouts x max_new_tokens x vocab x 4 B "
        "fits this many MiB; else each inner epoch recomputes them from cached hidden states (0 = always).",
        bounds=">= 0",
    )
    sampling_cache_mib: float = _f(
        256.0,
        "Keep what sampling computed for the first update of each collection (still at the sampling "
        "weights) when it fits this many MiB: the student's logits (rollouts x max_new_tokens x vocab x 4 B) "
        "and its decoder layers' outputs, which spare that update the student's head and layer forwards "
        "(0 = off).",
        bounds=">= 0",
    )
    valid_rouge_l: bool = _f(
        True,
        "Report valid/rougeL at each evaluation (answers decoded as `minillm eval` decodes), which picks the "
        "best checkpoint by default (the paper's rule). Off: only the reverse-KL figures, no generation pass.",
    )
    best_metric: str = _f(
        "valid/rougeL", "Metric that picks the best checkpoint (official: validation Rouge-L)."
    )
    best_mode: str = _f("max", "min or max.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.teacher:
            raise ConfigError("MiniLLM needs a teacher")
        _choice(self, "whiten", ("masked", "official", "off"))
        _choice(self, "pt_loss", ("none", "ce", "ce+kd"))
        _choice(self, "single_step_weight", ("none", "token"))


# --- baselines (KD, SeqKD, GKD) -------------------------------------------------------------------


@dataclass
class KDConfig(TrainConfig):
    """Word-level KD: kd_ratio·D(teacher, student) + (1 − kd_ratio)·CE on the gold responses (docs/design.md §2).
    Schedule defaults are the official KD scripts' (LMOps minillm/scripts/gpt2/kd/kd_base.sh) except lr."""

    command: ClassVar[str] = "kd"

    teacher: str | None = _f(
        "smollm2-135m-instruct",
        "Teacher (frozen): hub id, folder, .gguf or alias; must share the student's tokenizer and vocabulary.",
    )
    lr: float = _f(
        5e-5,
        "Peak learning rate. Official KD/SeqKD scripts: 5e-4 (GPT-2 base, from the pretrained model), "
        "1e-4 (GPT-2 large); 5e-5 suits a student that is already fine-tuned (as SFT's default).",
        bounds="> 0",
    )
    weight_decay: float = _f(1e-2, "AdamW weight decay (official KD/SeqKD scripts: 1e-2).", bounds=">= 0")
    lr_schedule: str = _f(
        "cosine", "constant or cosine (to 0 at the last step); official KD/SeqKD scripts: cosine."
    )
    warmup_steps: int = _f(0, "Linear warm-up steps (official KD/SeqKD scripts: 0).", bounds=">= 0")
    epochs: int = _f(
        20, "Passes over the training data at most (official: 20 for GPT-2 base, 10 for large).", bounds="> 0"
    )
    max_valid_examples: int | None = _f(1000, "Validation records (official --dev-num 1000).", bounds="> 0")
    divergence: str = _f(
        "forward_kl",
        "Token-level divergence D between teacher p and student q: forward_kl, reverse_kl, jsd, tvd, "
        "skew_forward_kl, skew_reverse_kl (minillm.objectives.divergences). Official KD: forward KL, written "
        "there as the teacher soft-CE −Σ p·log q, which has the same gradient.",
    )
    jsd_beta: float = _f(
        0.5,
        "β in [0, 1] of divergence jsd: the teacher's weight in the mixture m = β·p + (1 − β)·q; β = 0 is "
        "forward KL, β = 1 reverse KL (GKD paper Eq. 1; TRL GKDConfig beta default 0.5).",
        bounds="[0, 1]",
    )
    skew_alpha: float = _f(
        0.1,
        "α in [0, 1] of skew_forward_kl / skew_reverse_kl (DistiLLM --skew-alpha default 0.1).",
        bounds="[0, 1]",
    )
    loss_temperature: float = _f(
        1.0,
        "> 0. Both logits are divided by it inside D, with no T² factor (divergences.py); the CE term is "
        "never tempered. Official code: 1.",
        bounds="> 0",
    )
    kd_ratio: float = _f(
        0.5,
        "In [0, 1]: loss = kd_ratio·D + (1 − kd_ratio)·CE (official --kd-ratio 0.5; 1 = D only).",
        bounds="[0, 1]",
    )
    valid_forward_kl: bool = _f(
        True,
        "Also report valid/forward_kl, the token-averaged KL(teacher ‖ student) on valid_data's gold "
        "responses (costs one teacher forward over the validation set per evaluation).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        from minillm.objectives.divergences import DIVERGENCES

        if not self.teacher:
            raise ConfigError(f"{type(self).__name__} needs a teacher, got {self.teacher!r}")
        _choice(self, "divergence", tuple(DIVERGENCES))


@dataclass
class SeqKDConfig(KDConfig):
    """SeqKD: one teacher-sampled response per training prompt, cached on disk, then fine-tuning on those
    responses (paper: CE; official scripts: the KD loss). Schedule as the official SeqKD scripts."""

    command: ClassVar[str] = "seqkd"

    seqkd_loss: str = _f(
        "ce",
        "Loss on the teacher's responses: ce (the paper, §3.1: plain fine-tuning) or kd (official "
        "scripts/gpt2/seqkd/*.sh: --type kd --kd-ratio 0.5, i.e. kd_ratio·D + (1 − kd_ratio)·CE).",
    )
    teacher_data_cache: str = _f(
        "runs/teacher-data",
        "Folder of teacher-response caches: one subfolder per key (teacher weights, prompts, sampling "
        "settings), reused by any run with that key and resumed where a run stopped.",
    )
    sample_temperature: float = _f(
        1.0, "> 0: temperature of the teacher's sampling (official: 1.0).", bounds="> 0"
    )
    top_k: int = _f(0, ">= 0: top-k of the teacher's sampling (official: 0 = off).", bounds=">= 0")
    top_p: float = _f(
        1.0, "In (0, 1]: top-p of the teacher's sampling (official: 1.0 = off).", bounds="(0, 1]"
    )
    max_new_tokens: int = _f(
        256,
        "Teacher response tokens at most (official: --max-length 512 − --max-prompt-length 256).",
        bounds="> 0",
    )
    sample_batch_size: int = _f(
        16,
        "Prompts per generation batch (official --eval-batch-size 16). Part of the cache key: the rows of "
        "a batch share one random stream.",
        bounds="> 0",
    )
    sample_seed: int = _f(
        10,
        "Seed of the teacher's sampling, apart from seed so the training order can change without "
        "regenerating (official generate_data_seqkd.sh: --seed 10).",
        bounds=">= 0",
    )
    fast_rollout: bool = _f(True, "Static-cache decode loop (same tokens as the eager loop; not in the key).")

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice(self, "seqkd_loss", ("ce", "kd"))


@dataclass
class GKDConfig(KDConfig):
    """Token-level on-policy distillation (GKD, Agarwal et al. 2024; DistiLLM's on-policy baseline): with
    probability lmbda a step trains on the student's own samples, otherwise on train_data's responses."""

    command: ClassVar[str] = "gkd"

    divergence: str = _f(
        "jsd",
        "Token-level divergence D (names as KDConfig). GKD paper, TRL GKDTrainer and DistiLLM's GKD "
        "baseline (--type mixed-jsd): the generalised JSD.",
    )
    jsd_beta: float = _f(
        0.5,
        "β in [0, 1] of divergence jsd (TRL GKDConfig beta 0.5; DistiLLM's js_distance(lam=0.9) is β = 0.1).",
        bounds="[0, 1]",
    )
    kd_ratio: float = _f(
        1.0,
        "In [0, 1]: loss = kd_ratio·D + (1 − kd_ratio)·CE on the step's responses, whichever their source "
        "(TRL GKD: D only; DistiLLM gkd scripts: --kd-ratio 1.0).",
        bounds="[0, 1]",
    )
    lmbda: float = _f(
        0.5,
        "In [0, 1]: probability that an optimizer step trains on responses sampled from the student instead "
        "of train_data's (GKD λ; TRL GKDConfig lmbda 0.5; DistiLLM --mixed-alpha 0.5). One seeded coin per step.",
        bounds="[0, 1]",
    )
    sample_temperature: float = _f(
        1.0,
        "> 0: temperature of the student's sampling (DistiLLM gkd scripts: 1.0; TRL GKDConfig: 0.9).",
        bounds="> 0",
    )
    top_k: int = _f(0, ">= 0: top-k of the student's sampling (DistiLLM: 0 = off; TRL: 0).", bounds=">= 0")
    top_p: float = _f(
        1.0, "In (0, 1]: top-p of the student's sampling (DistiLLM: 1.0 = off).", bounds="(0, 1]"
    )
    max_new_tokens: int = _f(
        256,
        "Sampled response tokens at most (DistiLLM: max-length 512 − prompt 256; TRL GKDConfig: 128).",
        bounds="> 0",
    )
    fast_rollout: bool = _f(True, "Static-cache decode loop (same tokens as the eager loop).")
    sampling_cache_mib: float = _f(
        256.0,
        "On-policy steps of a student without dropout keep what sampling computed when it fits this many MiB "
        "per micro-batch: the student's logits (batch_size x max_new_tokens x vocab x 4 B) and its decoder "
        "layers' outputs, which spare the step's update the student's head and layer forwards (0 = off).",
        bounds=">= 0",
    )


@dataclass
class EvalConfig:
    """The paper's evaluation protocol (docs/design.md §3): sampled answers scored by Rouge-L."""

    model: str = _f("runs/student-init", "Model to evaluate: hub id, folder, .gguf or alias.")
    name: str | None = _f(
        None, "Display name in results and reports (e.g. SFT, MiniLLM); default: derived from the model path."
    )
    trust_remote_code: bool = _f(False, "Allow model code from the hub.")
    dtype: str = _f("auto", "auto (bf16 on GPU, fp32 on CPU), float32 or bfloat16.")
    sets: list[str] = _f(
        ["dolly", "selfinst", "sni", "unni"],
        "Test sets: shipped names (dolly, selfinst, "
        "sni, unni), .jsonl/.jsonl.gz paths or hf:NAME[:SPLIT], comma-separated.",
    )
    seeds: list[int] = _f(
        [10, 20, 30, 40, 50], "Sampling seeds; scores are averaged over them (paper).", bounds=">= 0"
    )
    max_per_set: int | None = _f(
        None, "Evaluate only the first N prompts of each set (None = all).", bounds="> 0"
    )
    selfinst_242: bool = _f(False, "SelfInst: only the 242 tasks of the paper's file (default: all 252).")
    field_instruction: str = _f("instruction", "Record key holding the instruction.")
    field_input: str = _f("input", "Record key holding the optional input/context.")
    field_output: str = _f("output", "Record key holding the reference response.")
    template: str = _f("alpaca", "Prompt template: alpaca (the paper's) or chat (the tokenizer's).")
    max_prompt_length: int = _f(
        256, "Prompts longer than this many tokens are skipped and counted.", bounds="> 0"
    )
    batch_size: int = _f(
        64,
        "(prompt, seed) rows per generation batch, a prompt's seeds side by side (they share its prefill), and "
        "examples per forward of the gold LM loss. Each row draws from its own generator: answers depend on it "
        "only through fp32 rounding. Teacher decode on one CPU core: ~6.4 ms of CPU per row-step at 16 rows, "
        "~5.0 at 64 (bench/RESULTS.md).",
        bounds="> 0",
    )
    temperature: float = _f(1.0, "Sampling temperature (paper: 1; 0 = greedy).", bounds=">= 0")
    top_p: float = _f(1.0, "Nucleus mass (paper: 1 = off).", bounds="(0, 1]")
    top_k: int = _f(0, "Top-k (paper: 0 = off).", bounds=">= 0")
    max_new_tokens: int = _f(256, "New tokens at most (paper: 256).", bounds="> 0")
    no_repeat_ngram_size: int = _f(
        6, "Ban repeated n-grams of this size (official code: 6; 0 = off).", bounds=">= 0"
    )
    lm_loss: bool = _f(True, "Also report the LM loss on the gold responses.")
    output_dir: str = _f("runs/eval", "Where generations (JSONL) and results (JSON) are written.")

    def __post_init__(self) -> None:
        check_bounds(self)
        _choice(self, "template", ("alpaca", "chat"))
        _choice(self, "dtype", ("auto", "float32", "bfloat16"))
        if not self.sets or not self.seeds:
            raise ConfigError("sets and seeds must each name at least one value")


@dataclass
class ExposureConfig:
    """Exposure bias (ExAccErr, paper section 3.3): excess accumulated error of the student's own prefixes."""

    student: str = _f("runs/student-init", "Student: hub id, folder, .gguf or alias.")
    name: str | None = _f(
        None, "Display name in results and reports; default: derived from the student path."
    )
    teacher: str = _f("smollm2-135m-instruct", "Teacher: hub id, folder, .gguf or alias.")
    trust_remote_code: bool = _f(False, "Allow model code from the hub.")
    dtype: str = _f("auto", "auto (bf16 on GPU, fp32 on CPU), float32 or bfloat16.")
    data: str = _f("dolly", "Prompts: shipped name, .jsonl path or hf:NAME[:SPLIT].")
    max_prompts: int = _f(50, "Prompts used.", bounds="> 0")
    samples_per_prompt: int = _f(4, "Responses sampled per prompt and per model.", bounds="> 0")
    max_new_tokens: int = _f(128, "Prefix length l goes up to this many tokens.", bounds="> 0")
    template: str = _f("alpaca", "Prompt template: alpaca or chat.")
    batch_size: int = _f(8, "Prompts per batch.", bounds="> 0")
    seed: int = _f(10, "Sampling seed.", bounds=">= 0")
    output_dir: str = _f("runs/exposure", "Where the JSON curve and PNG plot are written.")

    def __post_init__(self) -> None:
        check_bounds(self)
        _choice(self, "template", ("alpaca", "chat"))
        _choice(self, "dtype", ("auto", "float32", "bfloat16"))


@dataclass
class CalibrationConfig:
    """Calibration (ECE) of label-word probabilities on a binary task built from shipped data."""

    model: str = _f("runs/student-init", "Model: hub id, folder, .gguf or alias.")
    name: str | None = _f(None, "Display name in results and reports; default: derived from the model path.")
    trust_remote_code: bool = _f(False, "Allow model code from the hub.")
    dtype: str = _f("auto", "auto (bf16 on GPU, fp32 on CPU), float32 or bfloat16.")
    task: str = _f(
        "unni-yesno",
        "Binary task: unni-yesno (the Yes/No items of UnNI) or a .jsonl with "
        "instruction/input/output whose outputs are the two label words.",
    )
    max_examples: int | None = _f(None, "Use only the first N examples (None = all).", bounds="> 0")
    bins: int = _f(10, "Equal-width confidence bins of the ECE (paper: 10).", bounds="> 0")
    template: str = _f("alpaca", "Prompt template: alpaca or chat.")
    batch_size: int = _f(16, "Examples per forward.", bounds="> 0")
    output_dir: str = _f("runs/calibration", "Where the JSON result and the reliability diagram go.")

    def __post_init__(self) -> None:
        check_bounds(self)
        _choice(self, "template", ("alpaca", "chat"))
        _choice(self, "dtype", ("auto", "float32", "bfloat16"))


ALL_CONFIGS = (
    SFTConfig,
    MiniLLMConfig,
    KDConfig,
    SeqKDConfig,
    GKDConfig,
    EvalConfig,
    ExposureConfig,
    CalibrationConfig,
)


# ------------------------------------------------------------------------------------------------
# validation helpers


def _choice(cfg: Any, name: str, valid: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in valid:
        raise ConfigError(f"{name} must be one of {', '.join(valid)}; got {value!r}")


def in_bounds(value: float, bounds: str) -> bool:
    """Whether `value` lies in `bounds`: "> x", ">= x" or an interval "[lo, hi]" with ( ) for open ends.
    Written so that NaN is never inside."""
    if bounds[0] in "[(":
        lo, hi = (float(x) for x in bounds[1:-1].split(","))
        above = value >= lo if bounds[0] == "[" else value > lo
        return above and (value <= hi if bounds[-1] == "]" else value < hi)
    op, x = bounds.split()
    return value > float(x) if op == ">" else value >= float(x)


def check_bounds(cfg: Any) -> None:
    """Every numeric field within the range its metadata names; raises naming the field and the range."""
    for f in dataclasses.fields(cfg):
        bounds, value = f.metadata.get("bounds"), getattr(cfg, f.name)
        if bounds is None or value is None:
            continue
        for v in value if isinstance(value, list) else [value]:
            if not in_bounds(v, bounds):
                where = "in " if bounds[0] in "[(" else ""
                raise ConfigError(f"{f.name} must be {where}{bounds}, got {v!r}")


# ------------------------------------------------------------------------------------------------
# parsing

C = TypeVar("C")


def _convert(key: str, value: Any, tp: Any) -> Any:
    """Coerce a YAML or CLI value to the field's annotated type, or raise naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _convert(key, value, args[0])
    if origin is list:
        (inner,) = typing.get_args(tp)
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(key, v, inner) for v in items if v != ""]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{key}: expected int, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {tp}")  # pragma: no cover - a config-author error


def build(cls: type[C], values: dict[str, Any]) -> C:
    """Instantiate `cls` from a flat dict, checking every key and type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(unknown)} for {cls.__name__}; valid keys: {', '.join(names)}"
        )
    return cls(**{k: _convert(k, v, hints[k]) for k, v in values.items()})


def parse(cls: type[C], config_file: str | None = None, argv: list[str] | None = None) -> C:
    """Defaults < YAML file < `--key value` flags."""
    values: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {config_file} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            raise ConfigError(
                f"{config_file} is not a YAML file{at}; --config takes a YAML mapping of field: value"
            ) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{config_file}: expected a mapping of keys to values at the top level")
        values.update(loaded)
    argv = list(argv or [])
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --key value")
        key, eq, val = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key} needs a value")
            val, i = argv[i + 1], i + 1
        values[key.replace("-", "_")] = val
        i += 1
    return build(cls, values)


def to_argv(cfg: Any) -> list[str]:
    """The flags that rebuild `cfg` through `parse` (used by tests and to print a reproducible command)."""
    out = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out += [f"--{f.name}", ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps({"stage": type(cfg).__name__, **to_dict(cfg)}, indent=2))


def help_text(cls: type) -> str:
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        tp = getattr(hints[f.name], "__name__", str(hints[f.name]))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  --{f.name} {tp} (default {default!r})\n      {f.metadata['help']}")
    return "\n".join(lines)
