"""What minillm does differently when the student's parameters are sharded by FSDP2 (torch's `fully_shard`,
applied by accelerate with `fsdp_version: 2`, docs/distributed.md).

FSDP2 keeps each rank's slice of every parameter as a DTensor and all-gathers a unit's whole parameters
around that unit's forward (hooks on the module). minillm reads weights outside forwards in three places,
and each needs the whole tensor:
- the chunked head losses and `models.output_head` read the LM head's weight after the model's forward:
  `whole_head_unit` all-gathers the unit that owns it when it is sharded at that moment. Autograd then
  accumulates the head's gradient into that unit's unsharded parameter, which FSDP reduce-scatters in its
  post-backward (at the latest in the root's final backward callback), as it does for gradients made
  inside a forward (tests/test_sharding.py checks the gradients against one unsharded process);
- sampling and evaluation run the model step by step, with a different number of forwards on each rank
  (each stops when its own responses end), and the fast sampler reads layer weights directly:
  `gathered` makes every unit whole for the duration and keeps it whole through its forwards, so no
  collective runs inside;
- checkpoints: `full_state` / `load_full_state` gather and scatter the model's and optimizer's state
  dicts through torch.distributed.checkpoint, every rank taking part.
A model that is not sharded goes through each of these unchanged. DeepSpeed ZeRO-3 partitions parameters
too; `whole_head_unit` and `gathered` hand its engines to `minillm.zero`, which does the same for them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from minillm import zero


def units(model: nn.Module) -> list[FSDPModule]:
    """The FSDP2 units in `model` (root first), empty when its parameters are whole."""
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule) or bool(units(model))


def whole_head_unit(model: nn.Module, head: nn.Module) -> None:
    """All-gather the FSDP2 unit owning `head` (the innermost unit containing it) if its weight is a shard
    now. A collective: every rank calls it at the same point (the update's loss, evaluated on all ranks).
    FSDP reshards the unit in its post-backward, or after its next forward, as it would have anyway.
    A ZeRO-3 head is all-gathered and kept whole until the engine's step (`zero.hold`)."""
    zero.hold([p for p in (head.weight, getattr(head, "bias", None)) if p is not None])
    if not isinstance(head.weight, DTensor):
        return
    owners = [u for u in units(model) if any(m is head for m in u.modules())]
    min(owners, key=lambda u: sum(1 for _ in u.modules())).unshard()


_GATHERED: set[int] = set()  # ids of the root units `gathered` holds whole now


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Every FSDP2 unit of `model` whole for the duration, and kept whole through its forwards (no
    reshard after forward, so no all-gather inside): ranks may then run different numbers of forwards
    (sampling) and read weights directly. Costs the whole model's memory on each rank meanwhile. The
    per-unit reshard-after-forward settings are restored on exit, when every unit is resharded. Use it
    between optimizer steps only (`reset_iter_state` drops gradients accumulated under no_sync). A
    DeepSpeed engine's ZeRO-3 parameters likewise (`zero.gathered`)."""
    if zero.is_engine(model):
        with zero.gathered(model):
            yield
        return
    fsdp = units(model)
    if not fsdp or id(fsdp[0]) in _GATHERED:  # nothing sharded, or inside an enclosing `gathered`
        yield
        return
    _GATHERED.add(id(fsdp[0]))
    # torch 2.13 (_fully_shard/_fsdp_state.py): the root decides at its first forward whether it reshards
    # after forward; run that decision first so the settings saved below are the final ones
    fsdp[0]._get_fsdp_state()._lazy_init()
    groups = [g for u in fsdp for g in u._get_fsdp_state()._fsdp_param_groups]
    after_forward = [g.post_forward_mesh_info for g in groups]  # None: the group stays whole after forward
    for u in fsdp:
        u.set_reshard_after_forward(False, recurse=False)
        u.unshard()
    try:
        yield
    finally:
        for g, info in zip(groups, after_forward, strict=True):
            g.post_forward_mesh_info = info
        # Reshard every unit and forget the forwards inside: FSDP records each forward's order, gradients or
        # not, and prefetches the next backward's all-gathers from that record; the ranks ran different
        # numbers of forwards here, so their records would differ. Called between optimizer steps, so no
        # accumulated gradient is dropped.
        fsdp[0].reset_iter_state()
        _GATHERED.discard(id(fsdp[0]))


def full_norm(norm: Tensor) -> Tensor:
    """A gradient norm as a plain tensor: `clip_grad_norm_` over DTensor gradients returns a DTensor."""
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# Full (unsharded) state dicts, on the CPU, on rank 0 only: what a checkpoint file holds whatever the number
# of processes, so a sharded run writes the same files as a one-process run
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Every rank reads the checkpoint's files itself (output_dir is shared) and keeps its own slices
_SCATTER = StateDictOptions(full_state_dict=True, strict=False)


def full_state(model: nn.Module, optimizer: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The model's and optimizer's full state dicts on rank 0 (empty elsewhere); a collective.
    `optimizer` is the torch optimizer (accelerate's wrapper's `.optimizer`); the optimizer state is keyed
    by parameter name, as torch.distributed.checkpoint writes it."""
    weights = get_model_state_dict(model, options=_GATHER)
    # a tied weight comes out once per name, as separate copies: keep the first name, as save_pretrained
    # does with an unsharded model's state dict, whose tied entries share storage
    first = {name for name, _ in model.named_parameters()}
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - first
    return (
        {k: v for k, v in weights.items() if k not in tied},
        get_optimizer_state_dict(model, optimizer, options=_GATHER),
    )


def load_full_state(
    model: nn.Module, optimizer: Any, weights: dict[str, Tensor], optim_state: dict[str, Any]
) -> None:
    """Load full state dicts written by `full_state` into a sharded model and its optimizer: each rank
    keeps its slices. `weights` may lack tied entries (save_pretrained drops them)."""
    result = set_model_state_dict(model, weights, options=_SCATTER)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint weights do not match the model: unexpected {result.unexpected_keys}")
    set_optimizer_state_dict(model, optimizer, optim_state, options=_SCATTER)
