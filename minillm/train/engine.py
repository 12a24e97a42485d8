"""The one training engine every stage uses: plain helpers, no hooks to override.

accelerate runs the same code in one CPU process and under `accelerate launch` on many GPUs. Checkpoints
hold the model (save_pretrained, safetensors), optimizer and scheduler state (tensors and numbers, loaded
with `weights_only=True`), and a JSON trainer state; they are written to a temp folder and renamed, so a
killed run never leaves a half-written checkpoint. Randomness comes from generators seeded by
(seed, step, rank), so the data position and every random draw follow from the step alone and a resumed
run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from minillm import config as config_lib
from minillm import sharding, zero
from minillm.config import GKDConfig, MiniLLMConfig, SeqKDConfig, TrainConfig
from minillm.environment import environment
from minillm.errors import InputError

CKPT_PREFIX = "ckpt-"


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The run's accelerator. It creates nothing on disk: output_dir and its TensorBoard logs appear with
    the first metrics line (`MetricsLog`), so a run refused at start leaves no folder behind. Under a
    launcher (WORLD_SIZE > 1) on a machine without an accelerator it asks for the CPU: accelerate sets up a
    gloo process group only then, and otherwise gives every process DistributedType.NO, i.e. independent
    runs racing on one output folder (docs/distributed.md)."""
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    check_engine(os.environ, torch.accelerator.is_available())
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()
    deepspeed = _flag(os.environ, "ACCELERATE_USE_DEEPSPEED")
    acc = Accelerator(
        mixed_precision=mp,
        # accelerate runs DeepSpeed only when not asked for the CPU; without an accelerator it then needs
        # gloo named, or every process calls itself rank 0 of 1
        cpu=launched and not deepspeed,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if launched and deepspeed else None,
        log_with="tensorboard",
        project_dir=cfg.output_dir,
    )
    if deepspeed and acc.distributed_type != DistributedType.DEEPSPEED:
        raise InputError(
            f"the launch asks for DeepSpeed but accelerate set up {acc.distributed_type}: start minillm with "
            "`accelerate launch --config_file configs/accelerate/deepspeed-zero2.yaml` (docs/distributed.md)"
        )
    if deepspeed:
        zero.configure(
            acc.state.deepspeed_plugin, cfg.batch_size, cfg.grad_accum, cfg.max_grad_norm, cfg.lora_r > 0
        )
    if _flag(os.environ, "ACCELERATE_USE_FSDP") and acc.distributed_type != DistributedType.FSDP:
        raise InputError(
            f"the launch asks for FSDP but accelerate set up {acc.distributed_type}: start minillm with "
            "`accelerate launch --config_file configs/accelerate/fsdp.yaml` (docs/distributed.md)"
        )
    return acc


def check_engine(env: Mapping[str, str], accelerator: bool) -> None:
    """Refuse the launcher settings (`accelerate launch` exports them) of an engine minillm does not run:
    FSDP1 (minillm reads sharded parameters the FSDP2 way, `minillm.sharding`) and FSDP on a machine without
    an accelerator (accelerate 1.15 then quietly runs DDP under the FSDP name). DeepSpeed's own refusals are
    `zero.configure`'s."""
    if _flag(env, "ACCELERATE_USE_FSDP"):
        if env.get("FSDP_VERSION", "1") != "2":
            raise InputError(
                "FSDP1 is not supported: set `fsdp_config: fsdp_version: 2` in the accelerate config "
                "(configs/accelerate/fsdp.yaml)"
            )
        if not accelerator:
            raise InputError(
                "FSDP needs GPUs: on a CPU accelerate gives every process plain DDP instead; use "
                "configs/accelerate/cpu-2proc.yaml there (docs/distributed.md)"
            )


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "false").lower() == "true"


def generator(seed: int, *keys: int, device: torch.device | str) -> torch.Generator:
    """A generator seeded from (seed, *keys), e.g. (seed, step, rank): independent streams per use.

    `device` has no default: a generator must live where its draws are made (the sampler draws on its
    model's device, and torch refuses a CPU generator for a CUDA draw), so each caller says which."""
    g = torch.Generator(device=device)
    h = seed
    for k in keys:
        h = (h * 1_000_003 + k + 1) % (2**63 - 1)
    return g.manual_seed(h)


def seed_step(seed: int, step: int, rank: int) -> None:
    """Reseed the global RNG (dropout) per step so a resumed run draws the same masks."""
    torch.manual_seed(generator(seed, step, rank, device="cpu").initial_seed())


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.weight_decay,
        fused=params[0].device.type in ("cpu", "cuda"),
    )


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> Any:
    """Linear warm-up, then constant (official MiniLLM) or cosine decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=generator(seed, epoch, 0, device="cpu")).tolist()


def step_indices(n: int, per_step: int, seed: int, step: int) -> list[int]:
    """The example indices of optimizer step `step` (all ranks, all micro-batches): epochs are reshuffled
    permutations, the last partial batch of an epoch is dropped, and the position follows from the step."""
    steps_per_epoch = n // per_step
    if steps_per_epoch == 0:
        raise InputError(f"{n} training examples cannot fill one optimizer step of {per_step}")
    epoch, i = divmod(step, steps_per_epoch)
    return epoch_order(n, seed, epoch)[i * per_step : (i + 1) * per_step]


def total_steps(n: int, cfg: TrainConfig, world: int) -> int:
    per_step = cfg.batch_size * cfg.grad_accum * world
    return min(cfg.max_steps, cfg.epochs * (n // per_step))


def rank_micro_batches(indices: list[int], acc: Accelerator, cfg: TrainConfig) -> list[list[int]]:
    """This rank's share of a step's indices, cut into `grad_accum` micro-batches."""
    mine = indices[acc.process_index :: acc.num_processes]
    return [mine[i * cfg.batch_size : (i + 1) * cfg.batch_size] for i in range(cfg.grad_accum)]


def global_count(acc: Accelerator, count: Tensor | int) -> float:
    """Sum of a count over ranks: token losses are divided by the step's global valid-token count, counted
    before the micro-batch loop, so 1x8 and 4x2 micro-batches give equal gradients (docs/design.md §4)."""
    t = torch.as_tensor(count, dtype=torch.float64, device=acc.device)
    return float(acc.reduce(t, reduction="sum")) if acc.num_processes > 1 else float(t)


def loss_scale(acc: Accelerator, n_tokens: float) -> float:
    """The factor of a rank's token-loss sum: processes / the step's global token count. DDP averages
    gradients over ranks, so the averaged gradient is then the single-process gradient of the global
    batch (and `max_grad_norm` clips the same norm)."""
    return acc.num_processes / n_tokens


def backward(acc: Accelerator, model: torch.nn.Module, loss: Tensor, sync: bool) -> None:
    """Backward of a loss already normalised for the whole step; `sync`: the step's last backward, whose
    gradients are reduced over ranks. Under DDP and FSDP the caller's `acc.no_sync` decides that; DeepSpeed
    is told here, and does not step inside backward as accelerate's `backward` would make it (`zero`)."""
    if zero.is_engine(model):
        zero.backward(model, loss, sync)
    else:
        acc.backward(loss)


def clip_and_step(
    acc: Accelerator, model: torch.nn.Module, optimizer: Any, scheduler: Any, cfg: TrainConfig
) -> float:
    """Clip, step and return the gradient norm. A non-finite norm (every loss term is differentiated, so a
    non-finite loss or reward gives one) skips the update: the gradients are dropped, weights, optimizer
    and schedule stay as they were (`NonFiniteSteps` counts it). DeepSpeed's engine clips (at
    `max_grad_norm`, `zero.configure`), skips and steps itself."""
    if zero.is_engine(model):
        grad_norm = zero.step(model)
        if math.isfinite(grad_norm):
            scheduler.step()
        return grad_norm
    grad_norm = float(
        sharding.full_norm(
            acc.clip_grad_norm_(
                model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            )
        )
    )
    if math.isfinite(grad_norm):
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


class NonFiniteSteps:
    """Counts optimizer steps skipped by `clip_and_step` and stops the run after `limit` in a row: one bad
    batch is skipped, a run that diverged is not trained on."""

    def __init__(self, limit: int = 3):
        self.limit, self.total, self.in_row = limit, 0, 0

    def update(self, step: int, grad_norm: float) -> float:
        """The number of steps skipped so far (logged as `skipped`), counting step `step`."""
        bad = not math.isfinite(grad_norm)
        self.total += bad
        self.in_row = self.in_row + 1 if bad else 0
        if self.in_row >= self.limit:
            raise FloatingPointError(
                f"steps {step - self.limit + 1} to {step} had a non-finite loss or gradient, {self.limit} in a "
                "row, and were skipped; stopping: lower lr, check the data, or resume from the last checkpoint"
            )
        return float(self.total)


# loss(model, batch) -> (loss summed over the batch's target tokens, its named parts as sums)
LossFn = Callable[[torch.nn.Module, dict[str, Tensor]], tuple[Tensor, dict[str, float]]]


def supervised_step(
    acc: Accelerator,
    cfg: TrainConfig,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    step: int,
    micro: list[dict[str, Tensor]],
    loss: LossFn,
) -> dict[str, float]:
    """Optimizer step `step` on this rank's collated micro-batches (SFT, KD, SeqKD, GKD).

    The micro-batches' loss sums and parts are divided by the step's global target-token count (docs/design.md §4),
    the backward sums scaled by `loss_scale`; gradients sync on the last micro-batch only. Returns "loss",
    the parts (per token), "lr", "grad_norm" and "tokens".
    """
    n_tokens = global_count(acc, sum(int(b["target_mask"].sum()) for b in micro))
    scale = loss_scale(acc, n_tokens)
    seed_step(cfg.seed, step, acc.process_index)
    sums: dict[str, float] = {"loss": 0.0}
    for k, batch in enumerate(micro):
        batch = {key: v.to(acc.device) for key, v in batch.items()}
        last = k == len(micro) - 1
        with acc.no_sync(model) if not last else nullcontext(), acc.autocast():
            micro_sum, parts = loss(model, batch)
        backward(acc, model, micro_sum * scale, sync=last)
        for key, value in {"loss": float(micro_sum.detach()), **parts}.items():
            sums[key] = sums.get(key, 0.0) + value / n_tokens
    lr = scheduler.get_last_lr()[0]
    grad_norm = clip_and_step(acc, model, optimizer, scheduler, cfg)
    release_freed_memory()  # the step's activations and gradients, before the next step maps its own
    return {
        **{key: global_count(acc, v) for key, v in sums.items()},
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": n_tokens,
    }


# ------------------------------------------------------------------------------------------------
# checkpoints


@dataclass
class TrainerState:
    step: int = 0
    best_value: float | None = None
    best_step: int | None = None
    # one entry per start or resume: the step it began at and what it ran with (threads among them)
    attempts: list[dict[str, Any]] = field(default_factory=list)


def _atomic_write(path: Path, text: str) -> None:
    """Write through a temporary file and rename: a run killed meanwhile keeps the previous file whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, json.dumps(obj, indent=2))


def save_checkpoint(
    acc: Accelerator,
    cfg: TrainConfig,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: Any,
    scheduler: Any,
    state: TrainerState,
    extra: dict[str, Tensor] | None = None,
) -> Path:
    """Write `ckpt-STEP/` atomically, point `latest.json` at it, prune older periodic checkpoints.

    `extra` tensors (e.g. MiniLLM's rollout store mid-collection) are this rank's own: every rank writes
    its `extra-rank{r}.safetensors` into the temp folder before the main process renames it."""
    out = Path(cfg.output_dir)
    final = out / f"{CKPT_PREFIX}{state.step}"
    tmp = out / f".{CKPT_PREFIX}{state.step}.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    # A sharded model's full state dicts are gathered onto the main process, every rank taking part
    weights, optim_state = None, None
    if sharding.is_sharded(model):
        weights, optim_state = sharding.full_state(model, optimizer.optimizer)
    elif zero.is_engine(model):
        weights, optim_state = zero.full_state(model, optimizer.optimizer)
    try:
        if extra:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in extra.items()},
                tmp / f"extra-rank{acc.process_index}.safetensors",
            )
        if acc.is_main_process:
            acc.unwrap_model(model).save_pretrained(tmp, state_dict=weights, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            torch.save(optimizer.state_dict() if optim_state is None else optim_state, tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            _atomic_write_json(tmp / "trainer_state.json", state.__dict__)
            config_lib.save(cfg, tmp / "minillm_config.json")
    except Exception as e:  # a full disk, a lost mount: drop the partial copy, keep the previous one
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(
            f"writing checkpoint {final} failed ({e}); {out / 'latest.json'} still names the previous "
            "checkpoint, which --resume true continues from"
        ) from e
    acc.wait_for_everyone()  # every rank's extra is in tmp
    if acc.is_main_process:
        _replace_dir(tmp, final)
        _atomic_write_json(out / "latest.json", {"checkpoint": final.name, "step": state.step})
        keep = {final.name} | ({f"{CKPT_PREFIX}{state.best_step}"} if state.best_step is not None else set())
        periodic = sorted(
            (p for p in out.glob(f"{CKPT_PREFIX}*") if p.is_dir()),
            key=lambda p: int(p.name[len(CKPT_PREFIX) :]),
        )
        for p in periodic[: max(0, len(periodic) - cfg.keep_last)]:
            if p.name not in keep:
                shutil.rmtree(p)
    acc.wait_for_everyone()
    return final


def latest_checkpoint(output_dir: str) -> Path | None:
    pointer = Path(output_dir) / "latest.json"
    if not pointer.is_file():
        return None
    path = Path(output_dir) / json.loads(pointer.read_text())["checkpoint"]
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def load_checkpoint(
    path: Path, acc: Accelerator, model: torch.nn.Module, optimizer: Any, scheduler: Any
) -> TrainerState:
    """Restore weights, optimizer, scheduler and trainer state written by `save_checkpoint`. A sharded model
    (FSDP2, DeepSpeed ZeRO) takes them from the same full files: every rank reads them and keeps its
    slices."""
    sharded = sharding.is_sharded(model) or zero.is_engine(model)
    # gloo ranks run on "cpu:0", which safetensors and torch.load refuse as a target; full files for a
    # sharded model stay on the CPU, only each rank's slices move to its device
    device = "cpu" if acc.device.type == "cpu" or sharded else str(acc.device)
    optim_state = torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
    inner = acc.unwrap_model(model)
    lora = (path / "adapter_model.safetensors").is_file()  # a LoRA run: the checkpoint holds its adapters
    if sharded:
        weights = _read_adapters(path, inner, device) if lora else _read_weights(path, device)
        load = zero.load_full_state if zero.is_engine(model) else sharding.load_full_state
        load(model, optimizer.optimizer, weights, optim_state)
    else:
        if lora:
            _load_adapters(path, inner, device)
        else:
            _load_weights(path, inner, device)
        optimizer.load_state_dict(optim_state)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    return TrainerState(**json.loads((path / "trainer_state.json").read_text()))


def _read_weights(path: Path, device: str) -> dict[str, Tensor]:
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no .safetensors weights")
    weights: dict[str, Tensor] = {}
    for f in files:
        weights.update(load_file(f, device=device))
    return weights


def _load_weights(path: Path, model: torch.nn.Module, device: str) -> None:
    missing, unexpected = model.load_state_dict(_read_weights(path, device), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise InputError(
            f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}; "
            "resume with the model that run started from, or choose another output_dir"
        )
    model.tie_weights()


def _read_adapters(path: Path, model: torch.nn.Module, device: str) -> dict[str, Tensor]:
    """A checkpoint's LoRA adapter weights keyed by the `PeftModel`'s own parameter names: peft's files drop
    the adapter's name (`get_peft_model_state_dict` removes ".default" from every key), which is put back
    here so that a sharded model can load them through torch's state-dict API (`sharding.load_full_state`);
    peft's own loader copies into the parameters, which FSDP2's DTensors refuse."""
    saved = load_file(path / "adapter_model.safetensors", device=device)
    suffix = f".{model.active_adapter}"
    names = {name.replace(suffix, ""): name for name, p in model.named_parameters() if p.requires_grad}
    if saved.keys() != names.keys():
        raise ValueError(
            f"checkpoint {path} adapters do not match the model: missing {sorted(names.keys() - saved.keys())}, "
            f"unexpected {sorted(saved.keys() - names.keys())}"
        )
    return {names[key]: value for key, value in saved.items()}


def _load_adapters(path: Path, model: torch.nn.Module, device: str) -> None:
    """The LoRA adapter weights of a checkpoint into the run's `PeftModel` (its base is loaded already)."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors", device=device))
    if result.unexpected_keys:
        raise ValueError(f"checkpoint {path} adapters do not match the model: {result.unexpected_keys}")


def load_extra(path: Path, acc: Accelerator) -> dict[str, Tensor]:
    """This rank's `extra` tensors saved with a checkpoint (empty when there were none)."""
    files = sorted(path.glob("extra-rank*.safetensors"))
    if not files:
        return {}
    if len(files) != acc.num_processes:
        raise ValueError(
            f"{path} was written mid-collection by {len(files)} processes; resume it with as many, "
            f"not {acc.num_processes}"
        )
    return load_file(path / f"extra-rank{acc.process_index}.safetensors")


def resume(
    acc: Accelerator, cfg: TrainConfig, model: torch.nn.Module, optimizer: Any, scheduler: Any
) -> tuple[TrainerState, Path | None]:
    """The state to start from (the latest checkpoint's when `cfg.resume` is set and one exists), with this
    attempt's start step and environment appended to its `attempts`."""
    state, ckpt = _saved_state(acc, cfg, model, optimizer, scheduler)
    state.attempts.append(
        {
            "from_step": state.step,
            "processes": acc.num_processes,
            "mixed_precision": acc.mixed_precision,
            **environment(acc.device, next(model.parameters()).dtype),
        }
    )
    return state, ckpt


def _saved_state(
    acc: Accelerator, cfg: TrainConfig, model: torch.nn.Module, optimizer: Any, scheduler: Any
) -> tuple[TrainerState, Path | None]:
    ckpt = latest_checkpoint(cfg.output_dir) if cfg.resume else None
    if ckpt is None:
        if acc.is_main_process:  # a fresh start: lines of an attempt killed before its first checkpoint go
            truncate_metrics(cfg, -1)
        return TrainerState(), None
    saved = json.loads((ckpt / "minillm_config.json").read_text())["stage"]
    if saved != type(cfg).__name__:
        command = next((c.command for c in config_lib.ALL_CONFIGS if c.__name__ == saved), saved)
        raise InputError(
            f"output_dir {cfg.output_dir} holds a `minillm {command}` run ({ckpt}/minillm_config.json "
            f"records stage {saved}), not a `minillm {cfg.command}` one: resume it with `minillm {command}` "
            "or give this run another output_dir"
        )
    state = load_checkpoint(ckpt, acc, model, optimizer, scheduler)
    if acc.is_main_process:  # one writer: a rank reading while another rewrote the file read it empty
        truncate_metrics(cfg, state.step)
    acc.print(f"resumed from {ckpt} at step {state.step}")
    return state, ckpt


def is_eval_step(cfg: TrainConfig, step: int, total: int) -> bool:
    return step == total or (cfg.eval_every > 0 and step % cfg.eval_every == 0)


def checkpoint_if_due(
    acc: Accelerator,
    cfg: TrainConfig,
    state: TrainerState,
    metrics: dict[str, float],
    evaluated: bool,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: Any,
    scheduler: Any,
    extra: dict[str, Tensor] | None = None,
) -> None:
    """Checkpoint after every evaluation (refreshing `best/` on a new best) and every `save_every` steps."""
    if not (evaluated or (cfg.save_every > 0 and state.step % cfg.save_every == 0)):
        return
    best = evaluated and update_best(state, metrics, cfg)
    save_checkpoint(acc, cfg, model, tokenizer, optimizer, scheduler, state, extra)
    if best and acc.is_main_process:
        mark_best(cfg, state)


def update_best(state: TrainerState, metrics: dict[str, float], cfg: TrainConfig) -> bool:
    """Whether `metrics` holds a new best `cfg.best_metric`; records it in `state`."""
    if cfg.best_metric not in metrics:
        raise KeyError(f"best_metric {cfg.best_metric!r} is not among the metrics: {', '.join(metrics)}")
    value = metrics[cfg.best_metric]
    better = state.best_value is None or (
        value < state.best_value if cfg.best_mode == "min" else value > state.best_value
    )
    if better:
        state.best_value, state.best_step = value, state.step
    return better


def mark_best(cfg: TrainConfig, state: TrainerState) -> None:
    """`best/` is a copy of the best checkpoint (a plain Hugging Face folder for the next stage)."""
    out = Path(cfg.output_dir)
    src = out / f"{CKPT_PREFIX}{state.best_step}"
    tmp = out / ".best.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(
        src, tmp, ignore=shutil.ignore_patterns("optimizer.pt", "scheduler.pt", "extra-rank*.safetensors")
    )
    _replace_dir(tmp, out / "best")


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the complete folder `src` to `dst`, replacing what is there only once `src` is in place."""
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# logging


class MetricsLog:
    """One JSON line per logged step (same keys in every stage), TensorBoard through accelerate, a bar."""

    def __init__(self, acc: Accelerator, cfg: TrainConfig, total: int, start: int):
        self.acc, self.cfg = acc, cfg
        self.path = Path(cfg.output_dir) / "metrics.jsonl"
        self.bar = tqdm(total=total, initial=start, disable=not acc.is_main_process, desc=cfg.command)
        self.t0 = time.perf_counter()
        self.started = False
        if 0 < start >= total:
            acc.print(
                f"{cfg.output_dir} holds a finished run ({start} of {total} steps): nothing to train; "
                f"its best checkpoint is {Path(cfg.output_dir) / 'best'}"
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.acc.is_main_process:
            return
        if not self.started:  # the first line creates output_dir and the TensorBoard logs
            Path(self.cfg.output_dir).mkdir(parents=True, exist_ok=True)
            hparams = {
                k: v
                for k, v in config_lib.to_dict(self.cfg).items()
                if v is not None and not isinstance(v, list)
            }
            self.acc.init_trackers("tb", config=hparams)
            self.started = True
        line = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
        self.acc.log(line, step=step)
        shown = {k: f"{v:.4g}" for k, v in line.items() if k in ("loss", "valid/loss", "tokens/s", "reward")}
        self.bar.set_postfix(shown)

    def advance(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        """Close the bar and the TensorBoard writer. Not `acc.end_training()`: the process group must outlive
        the stage's DDP model, and is destroyed once the stage has returned (`end_process_group`)."""
        self.bar.close()
        for tracker in self.acc.trackers:
            tracker.finish()


def end_process_group() -> None:
    """Destroy a launched run's process group, after the stage that trained in it has returned.

    DDP's C++ reducer holds the gloo group and is freed with the GIL held. Were it the group's last holder
    (the group destroyed first, as `Accelerator.end_training` does while the stage still holds its model),
    the group's destructor would join gloo's worker threads under the GIL, while a worker that is still
    freeing a finished collective's tensors waits for the GIL: a deadlock at exit, now and then on a busy
    machine (docs/distributed.md). With the model gone first, the last holder is torch's Python handle,
    whose destructor releases the GIL."""
    gc.collect()  # a model kept alive by a reference cycle is freed now, not after the group
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def truncate_metrics(cfg: TrainConfig, step: int) -> None:
    """Drop lines logged after `step` (the resumed checkpoint's; -1 for a fresh start, every line) so the
    log reads as one run."""
    path = Path(cfg.output_dir) / "metrics.jsonl"
    if path.is_file():
        kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        _atomic_write(path, "".join(ln + "\n" for ln in kept))


def chunks(seq: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def release_freed_memory() -> None:
    """Return the C allocator's freed pages to the OS (glibc `malloc_trim`; elsewhere a no-op).

    glibc keeps memory freed by one phase (the update's activations and chunk buffers) mapped, so whatever
    the next phase allocates fresh (the sampler's packed weights, new KV caches) lands on top of the last
    high-water mark (embedded pair, 3 MiniLLM steps in one process: peak 2.38 → 2.30 GiB with the trim).
    The trainers call it between phases: before a collection's sampling, after sampling, after a no-grad
    teacher pass and after each optimizer step (bench/RESULTS.md, "Against TRL's DistillationTrainer").
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc
        pass


def sampling_settings(cfg: MiniLLMConfig | SeqKDConfig | GKDConfig) -> dict[str, Any]:
    """A stage's sampling fields as the keyword arguments of `rollout.sample_rollout` / `sample_responses`
    (sample_temperature → temperature, fast_rollout → fast)."""
    return dict(
        temperature=cfg.sample_temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        fast=cfg.fast_rollout,
    )
