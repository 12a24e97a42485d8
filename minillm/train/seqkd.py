"""SeqKD (Kim & Rush 2016; docs/design.md §2): fine-tune the student on one teacher-sampled response per prompt.

First the teacher answers every training prompt once (sampling, defaults as the official
minillm/scripts/gpt2/tools/generate_data_seqkd.sh: temperature 1, top_k 0, top_p 1, 256 new tokens,
seed 10); the responses are cached on disk. Then the student is trained on (prompt, teacher response),
in SFT's loop (`loop.fit`): with plain cross-entropy, as the MiniLLM paper describes SeqKD
(`seqkd_loss: ce`, default), or with the word-level KD loss of `kd.py` (`supervised.kd_loss`) on those
responses, as the official scripts run it (scripts/gpt2/seqkd/seqkd_base.sh: --type kd --kd-ratio 0.5 on
the pseudo data; `seqkd_loss: kd`).
Validation is on the gold validation responses (valid/loss, valid/forward_kl), comparable across stages.

The cache. `teacher_data_cache/<key>/` holds settings.json (what the key hashes: the teacher's weights,
the data spec and the sampling settings) and responses.jsonl, one line per training record:
{"index": record index in train_data, "batch": [number, size], "prompt_sha1", "response_ids", "truncated", "instruction",
"input", "output": the decoded teacher response}, so the file is itself a valid `train_data` for `kd`/`gkd`.
Any change of teacher, data spec or sampling setting gives a new key, hence a new folder: the cache is
regenerated there and the old one is kept for runs that still match it. Prompts are cut into fixed
batches of sample_batch_size in record order, and batch k samples from generator(sample_seed, k), so a
record's response does not depend on which run, rank or resume produced it. Lines are appended (and
fsynced) batch by batch; a rerun regenerates only the batches that are incomplete, whose prompt hashes no
longer match or whose lines were sampled in another layout (max_train_examples changes the last
batch), and a line cut by a kill is dropped. Later lines win for an index.

Generation reuses `minillm.rollout.sample_responses` (`sample_rollout`) with the teacher as the sampled model and α = 0: the
same seeded inverse-CDF sampler, static-cache decode and EOS/mask rules as MiniLLM's rollouts, no new
code. Departures from the official pipeline: the student trains on the sampled token ids themselves
(the official code decodes them to text and re-tokenises, appending an EOS even to truncated answers);
a response cut at max_new_tokens has no EOS target here.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import Tensor, nn

from minillm.config import SeqKDConfig
from minillm.data.instructions import load_records
from minillm.data.tokenize import Example, encode_prompt
from minillm.rollout import sample_responses
from minillm.train import engine
from minillm.train.loop import fit, rouge_validation, validation_metrics
from minillm.train.setup import load_split, load_student, load_teacher
from minillm.train.supervised import ce_loss_sum, kd_loss, make_divergence

CACHE_FORMAT = 2  # 2: lines record their batch


def weights_sha1(model: nn.Module) -> str:
    """Content hash of a model's parameters and buffers (names, dtypes, shapes, bytes); tied tensors once."""
    h, seen = hashlib.sha1(), set()
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def cache_settings(cfg: SeqKDConfig, teacher: nn.Module) -> dict[str, Any]:
    """Everything a cached response depends on; its hash names the cache folder."""
    return {
        "format": CACHE_FORMAT,
        "teacher_sha1": weights_sha1(teacher),
        "data": {
            k: getattr(cfg, k)
            for k in ("train_data", "field_instruction", "field_input", "template", "max_prompt_length")
        },
        "sampling": {
            k: getattr(cfg, k)
            for k in (
                "sample_temperature",
                "top_k",
                "top_p",
                "max_new_tokens",
                "sample_batch_size",
                "sample_seed",
            )
        },
    }


def read_cache(path: Path) -> dict[int, dict[str, Any]]:
    """Cached lines by record index (later lines win); a last line cut by a kill is ignored."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1].decode()
    return {line["index"]: line for line in map(json.loads, complete.splitlines())}


def drop_partial_line(path: Path) -> None:
    """Cut a last line left incomplete by a kill, so appended lines start on a line of their own."""
    if path.is_file():
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with path.open("r+b") as fh:
                fh.truncate(end)


def _prompt_sha1(prompt: list[int]) -> str:
    return hashlib.sha1(json.dumps(prompt).encode()).hexdigest()[:16]


def teacher_data(
    cfg: SeqKDConfig, teacher: nn.Module, tokenizer: Any, acc: Accelerator
) -> tuple[list[Example], dict[str, float]]:
    """Training examples (prompt, teacher response), generating what the cache lacks; and generation stats."""
    records = load_records(
        cfg.train_data,
        field_instruction=cfg.field_instruction,
        field_input=cfg.field_input,
        field_output=cfg.field_output,
        limit=cfg.max_train_examples,
    )
    prompts = {}  # record index -> prompt ids, for prompts within the official length rule
    for i, rec in enumerate(records):
        prompt = encode_prompt(rec, tokenizer, cfg.template)
        if len(prompt) <= cfg.max_prompt_length:
            prompts[i] = prompt
    acc.print(
        f"{cfg.train_data}: {len(prompts)} prompts, {len(records) - len(prompts)} dropped "
        f"(prompt > {cfg.max_prompt_length} tokens)"
    )
    if not prompts:
        raise ValueError(f"{cfg.train_data}: no prompt left after the length rule")
    settings = cache_settings(cfg, teacher)
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cfg.teacher_data_cache) / key
    path = folder / "responses.jsonl"
    if acc.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "settings.json").is_file():
            (folder / "settings.json").write_text(json.dumps({**settings, "teacher": cfg.teacher}, indent=2))
    acc.wait_for_everyone()
    cached = read_cache(path)
    acc.wait_for_everyone()
    if acc.is_main_process:
        drop_partial_line(path)
    batches = list(engine.chunks(sorted(prompts), cfg.sample_batch_size))

    def done(i: int, k: int) -> bool:  # cached from this prompt, sampled in this very batch (number, size)
        line = cached.get(i)
        return (
            line is not None
            and line["prompt_sha1"] == _prompt_sha1(prompts[i])
            and line["batch"] == [k, len(batches[k])]
        )

    todo = [k for k, batch in enumerate(batches) if not all(done(i, k) for i in batch)]
    acc.print(f"teacher data {folder}: {len(batches) - len(todo)} of {len(batches)} batches cached")
    t0 = time.perf_counter()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for r in range(0, len(todo), acc.num_processes):  # one batch per rank per round
        lines = []
        if r + acc.process_index < len(todo):
            k = todo[r + acc.process_index]
            responses, truncated = sample_responses(
                teacher,
                [prompts[i] for i in batches[k]],
                eos_id=eos,
                pad_id=pad,
                generator=engine.generator(cfg.sample_seed, k, device=acc.device),
                **engine.sampling_settings(cfg),
            )
            for i, resp, cut in zip(batches[k], responses, truncated, strict=True):
                lines.append(
                    {
                        "index": i,
                        "batch": [k, len(batches[k])],
                        "prompt_sha1": _prompt_sha1(prompts[i]),
                        "response_ids": resp,
                        "truncated": cut,
                        "instruction": records[i]["instruction"],
                        "input": records[i]["input"],
                        "output": tokenizer.decode(resp, skip_special_tokens=True),
                    }
                )
        if acc.num_processes > 1:
            lines = gather_object(lines)
        if acc.is_main_process:
            with path.open("a") as fh:
                fh.write("".join(json.dumps(line) + "\n" for line in lines))
                fh.flush()
                os.fsync(fh.fileno())
        cached.update({line["index"]: line for line in lines})
        acc.print(f"teacher data: batch {min(r + acc.num_processes, len(todo))}/{len(todo)}")
    examples = [
        Example(prompts[i], cached[i]["response_ids"][: cfg.max_length - len(prompts[i])])
        for i in sorted(prompts)
    ]
    stats = {
        "teacher_data/generated": float(sum(len(batches[k]) for k in todo)),
        "teacher_data/cached": float(len(prompts) - sum(len(batches[k]) for k in todo)),
        "time/generate": time.perf_counter() - t0,
    }
    return examples, stats


def train_seqkd(cfg: SeqKDConfig) -> Path:
    """Generate (or reuse) the teacher's responses, then fine-tune on them; returns the best checkpoint."""
    acc, tokenizer, model = load_student(cfg)
    teacher = load_teacher(cfg, tokenizer, model, acc)
    train, generation = teacher_data(cfg, teacher, tokenizer, acc)
    valid = load_split(cfg.valid_data, cfg.max_valid_examples, cfg, tokenizer, acc)
    if cfg.seqkd_loss == "ce" and not cfg.valid_forward_kl:
        del teacher  # not needed any more: free its memory for training
        teacher = None
    divergence = make_divergence(cfg)
    pad = tokenizer.pad_token_id

    def loss(m: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        if cfg.seqkd_loss == "kd":
            return kd_loss(m, teacher, batch, divergence, cfg)
        return ce_loss_sum(m, batch, cfg.chunk_size), {}

    rouge = rouge_validation(cfg, tokenizer, acc)

    def validate(m: nn.Module) -> dict[str, float]:
        return validation_metrics(m, teacher, valid, pad, cfg, acc) | rouge(m)

    return fit(acc, cfg, tokenizer, model, train, loss, validate, start_metrics=generation)
