"""What minillm does differently when accelerate runs the student under DeepSpeed ZeRO-2 or ZeRO-3
(`configs/accelerate/deepspeed-zero2.yaml`, `deepspeed-zero3.yaml`; docs/distributed.md, "DeepSpeed").

accelerate hands DeepSpeed the optimizer step: its `backward` runs the engine's `step` (the update, clipped
by the DeepSpeed config), and DeepSpeed divides every loss by its gradient-accumulation steps. minillm keeps
its own contract instead (`minillm.train.engine`):
- `configure` fills the DeepSpeed config's "auto" entries from minillm's config before `acc.prepare`
  (micro-batch `batch_size`, accumulation `grad_accum`, `gradient_clipping` = `max_grad_norm`) and refuses
  a number that disagrees, and the settings minillm has not run (offload, ZeRO-3 init, fp16/bf16, LoRA);
- `backward` runs the engine's backward with the caller's accumulation boundary (gradients sync on the
  step's last micro-batch) and without the division: the loss is already divided by the step's global
  token count and multiplied by the number of processes (`engine.loss_scale`), and DeepSpeed averages
  gradients over ranks as DDP does;
- `step` runs the engine's step: clipping at `max_grad_norm`, the update, and a non-finite gradient norm
  skipped (DeepSpeed discards the gradients, leaves weights and optimizer state as they were and reports
  an infinite norm; the learning-rate schedule, minillm's, is not stepped either).
ZeRO-3 also partitions every parameter, and minillm reads weights outside forwards in three places, as
under FSDP2 (`minillm.sharding`):
- the chunked head losses read the LM head's weight after the model's forward: `hold` all-gathers it and
  keeps it whole through the rest of the forward and the backward, whose gradient reaches the partitioned
  parameter through DeepSpeed's own gradient hook (registered while the parameter was whole, so autograd
  accepts a full-shape gradient); the engine's step partitions every parameter again before the update;
- sampling and evaluation run different numbers of forwards on each rank: `gathered` makes every
  parameter whole and keeps it whole through the forwards inside, so no collective runs there;
- checkpoints: `full_state` / `load_full_state` gather and set the fp32 weights and AdamW state through
  DeepSpeed's tensor-fragment API (ZeRO-2 partitions the optimizer state as well), in the files a
  one-process run writes.
tests/test_deepspeed.py runs SFT and MiniLLM at both stages in 2 CPU processes against one process, and a
MiniLLM resume; nothing here has run on a GPU (docs/distributed.md).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from minillm.errors import InputError

# An id no module has: while it is in a parameter's `ds_active_sub_modules`, DeepSpeed's module hooks do
# not release (re-partition) it after a forward or backward (deepspeed 0.19.8,
# runtime/zero/partitioned_param_coordinator.py `__release_param`). The step's `partition_all_parameters`
# clears the set and partitions everything.
_HELD = -1


def is_engine(model: nn.Module) -> bool:
    """Whether `model` is a DeepSpeed engine (what `acc.prepare` returns under DeepSpeed)."""
    deepspeed = sys.modules.get("deepspeed")
    return deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine)


def is_partitioned(param: Tensor) -> bool:
    """Whether `param` is a ZeRO-3 parameter (its data whole only while gathered)."""
    return hasattr(param, "ds_id")


def configure(plugin: Any, batch_size: int, grad_accum: int, max_grad_norm: float, lora: bool) -> None:
    """Fill the "auto" entries of accelerate's DeepSpeed config from minillm's config and refuse what
    minillm does not run under DeepSpeed. Before `acc.prepare`, which builds the engine from the config."""
    config = plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": ("batch_size", batch_size),
        "gradient_accumulation_steps": ("grad_accum", grad_accum),
        "gradient_clipping": ("max_grad_norm", max_grad_norm),
    }
    for key, (field, value) in wanted.items():
        have = config.get(key, "auto")
        if have == "auto":
            config[key] = value
        elif float(have) != float(value):
            raise InputError(
                f"the DeepSpeed config sets {key}: {have}, but minillm's {field} is {value}: set it to auto "
                f"(minillm fills it from {field}) or make the two agree"
            )
    zero = config.get("zero_optimization", {})
    if zero.get("stage") not in (2, 3):
        raise InputError(
            f"DeepSpeed ZeRO stage {zero.get('stage')} is not supported: use configs/accelerate/"
            "deepspeed-zero2.yaml or deepspeed-zero3.yaml (stage 2 or 3)"
        )
    for part in ("offload_optimizer", "offload_param"):
        if str(zero.get(part, {}).get("device", "none")).lower() != "none":
            raise InputError(f"DeepSpeed {part} is not supported (untested): set its device to none")
    if plugin.zero3_init_flag:
        raise InputError(
            "DeepSpeed zero3_init_flag is not supported: under it transformers partitions every model "
            "from_pretrained loads, the teacher too, which minillm keeps whole; set zero3_init_flag: false"
        )
    for precision in ("fp16", "bf16", "bfloat16"):
        if config.get(precision, {}).get("enabled") in (True, "true"):
            raise InputError(
                f"DeepSpeed's {precision} mode is not supported (untested): run with --mixed_precision no "
                "(fp32 weights and compute) under DeepSpeed, or use FSDP (configs/accelerate/fsdp.yaml) for "
                "bf16 compute"
            )
    if lora:
        raise InputError("LoRA students under DeepSpeed are not supported (untested): use DDP or lora_r 0")
    # accelerate registers a ZeRO-3 config with transformers even when zero3_init_flag is false, and
    # from_pretrained then partitions every model it loads (under deepspeed.zero.Init), the teacher too,
    # whose forwards no engine gathers. minillm loads both whole; `acc.prepare` partitions the student.
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def backward(model: nn.Module, loss: Tensor, sync: bool) -> None:
    """The engine's backward of `loss`, already normalised (not divided by the accumulation steps);
    `sync`: the step's last backward, at which DeepSpeed reduces the accumulated gradients."""
    model.set_gradient_accumulation_boundary(sync)
    model.backward(loss, scale_wrt_gas=False)


def step(model: nn.Module) -> float:
    """The engine's step: clip at `gradient_clipping`, update, zero the gradients. Returns the gradient
    norm before clipping, infinite when the step was skipped for a non-finite gradient."""
    model.step()
    norm = model.get_global_grad_norm()
    return float(norm)


def hold(params: list[Tensor]) -> None:
    """All-gather the ZeRO-3 parameters among `params` that are partitioned now and keep them whole until
    the engine's next step (a collective: every rank calls it at the same point)."""
    zero = [p for p in params if is_partitioned(p)]
    if not zero:
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    missing = [p for p in zero if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if missing:
        missing[0].all_gather(param_list=missing)
    for p in zero:
        p.ds_active_sub_modules.add(_HELD)


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Every ZeRO-3 parameter of the engine `model` whole for the duration and kept whole through the
    forwards inside: ranks may then run different numbers of forwards (sampling) and read weights
    directly. Costs the whole model's memory on each rank meanwhile; partitioned again on exit."""
    params = list(model.module.parameters())
    if not any(is_partitioned(p) for p in params) or any(_HELD in p.ds_active_sub_modules for p in params):
        yield  # ZeRO-2 (parameters whole), or inside an enclosing `gathered`
        return
    hold(params)
    try:
        yield
    finally:
        for p in params:
            p.ds_active_sub_modules.discard(_HELD)
        model.optimizer.parameter_offload.partition_all_parameters()


def _trained(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trained parameters by name, in `engine.make_optimizer`'s order (tied ones once)."""
    return [(n, p) for n, p in model.module.named_parameters() if p.requires_grad]


def _buffers(model: nn.Module) -> dict[str, Tensor]:
    """The module's persistent buffers by state-dict name (DeepSpeed never partitions buffers)."""
    params = {name for name, _ in model.module.named_parameters(remove_duplicate=False)}
    return {k: v.detach().cpu() for k, v in model.module.state_dict().items() if k not in params}


def _base_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's ZeRO optimizer (its parameters: flat fp32 partitions)."""
    return optimizer.optimizer


def _flat_partitions(optimizer: Any) -> list[Tensor]:
    """This rank's flat fp32 partitions, the tensors AdamW's state is keyed by (ZeRO-3 puts them in AdamW's
    param groups only during its step)."""
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
        return optimizer.fp32_partitioned_groups_flat
    return optimizer.single_partition_of_fp32_groups


def full_state(model: nn.Module, optimizer: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The fp32 weights by name and the AdamW state in torch's own layout (parameters numbered in
    `make_optimizer`'s order), as a one-process run's `optimizer.state_dict()`; a collective, every rank
    gets both. `optimizer`: DeepSpeed's ZeRO optimizer (accelerate's wrapper's `.optimizer`)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    base = _base_optimizer(optimizer)
    trained = _trained(model)
    weights = _buffers(model) | {name: safe_get_full_fp32_param(p).detach().cpu() for name, p in trained}
    steps = [s["step"] for s in base.state.values() if "step" in s]
    state: dict[int, dict[str, Tensor]] = {}
    if steps:  # AdamW creates its state at its first step
        for i, (_, p) in enumerate(trained):
            state[i] = {"step": steps[0].detach().cpu().clone()}
            for key in ("exp_avg", "exp_avg_sq"):
                state[i][key] = safe_get_full_optimizer_state(p, key).detach().cpu()
    group = {k: v for k, v in base.param_groups[0].items() if k != "params"}
    return weights, {"state": state, "param_groups": [{**group, "params": list(range(len(trained)))}]}


def load_full_state(
    model: nn.Module, optimizer: Any, weights: dict[str, Tensor], optim_state: dict[str, Any]
) -> None:
    """Load what `full_state` wrote (or a one-process run's files) into the engine: every rank sets its
    fragments of the fp32 master weights and AdamW state, and the module's weights (whole under ZeRO-2,
    each rank's partition under ZeRO-3). `weights` may lack tied entries (save_pretrained drops them)."""
    from deepspeed import zero
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    trained = _trained(model)
    buffers = _buffers(model)
    known = {name for name, _ in model.module.named_parameters(remove_duplicate=False)} | set(buffers)
    unexpected = set(weights) - known
    missing = [name for name, _ in trained if name not in weights]
    if unexpected or missing:
        raise InputError(
            f"checkpoint weights do not match the model: missing {missing}, unexpected {unexpected}"
        )
    base = _base_optimizer(optimizer)
    saved = optim_state["state"]
    # AdamW's state, which it creates at its first step (ZeRO-3 starts with empty entries), filled below
    if saved:
        step = next(iter(saved.values()))["step"]
        for flat in _flat_partitions(optimizer):
            state = base.state[flat]
            if "exp_avg" not in state:
                state |= {"exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
            state["step"] = step.clone().to(flat.device)
        # ZeRO-2 links each parameter to its fragments of that state only after its first step (ZeRO-3 reads
        # the state directly); the setters below need the link now
        link = getattr(optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:
            link()
    with torch.no_grad():
        for name, buffer in model.module.named_buffers():
            if name in buffers and name in weights:
                buffer.copy_(weights[name])
    for i, (name, p) in enumerate(trained):
        value = weights[name].to(torch.float32)
        safe_set_full_fp32_param(p, value)
        with zero.GatheredParameters([p], modifier_rank=0, enabled=is_partitioned(p)), torch.no_grad():
            p.data.copy_(value)  # the module's copy, which forwards read
        for key, v in saved.get(i, {}).items():
            if key != "step":
                safe_set_full_optimizer_state(p, v.to(torch.float32), key)
    saved_group = {k: v for k, v in optim_state["param_groups"][0].items() if k != "params"}
    for group in base.param_groups:  # the learning rate and the rest, one group in a one-process run
        group.update(saved_group)
