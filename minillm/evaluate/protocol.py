"""The paper's evaluation protocol (docs/design.md §3): `minillm eval`.

For each test set and each seed, every prompt (the training template, no BOS) gets one sampled answer
(temperature 1, top_p 1, top_k 0, <= 256 new tokens, no_repeat_ngram_size 6: the official defaults, all
configurable). Each answer is scored by Rouge-L against its references (max over them; S-NI carries several).
A set's score is the mean over prompts; the table value is the mean over seeds, with the sample std over seeds
as the spread. Also: the LM loss on the gold responses (once per set: it has no randomness), Dist-4 of the
answers (per seed, then averaged) and Rouge-L per gold-length bucket ([0,5], [6,10], [11,inf) tokens of the
first reference in the evaluated model's tokenizer, EOS excluded).

Sampling is the project's one sampler (`minillm.rollout`, through `generate.sample`): static KV cache,
inverse-CDF draws, HF's n-gram ban. Its randomness is a `torch.Generator` per (prompt, seed): the answer to
prompt `id` of a set under seed s draws from a generator seeded with `generate.stable_seed(s, set, id)`, one
uniform per step, and nothing else. So an answer is the same whatever ran before it in the process (other
sets, seeds, models, the global RNG) and whatever rows are sampled beside it, on a given device (fp32
rounding of another batch shape could move a draw that falls within rounding of a CDF boundary, so the
(prompt, seed) rows are batched in a fixed partition: sorted by prompt length, ties in file order, a
prompt's seeds side by side, at most `batch_size` rows a batch, the batches as even as possible). The seeds
of a prompt share one prefill of it.

Files under `output_dir/<model slug>/`:
- `generations.jsonl`: one line per (set, id, seed): prompt, output, reference(s), score and lengths. A rerun
  skips every (set, id, seed) already there; a batch with any missing line is regenerated whole, so a resumed
  run writes exactly what an uninterrupted one would.
- `settings.json`: the decoding-relevant settings of the first run and the sampler that made its generations;
  a rerun that changes any raises instead of mixing generations made under two settings (a folder made by HF
  `generate`, before this sampler, has no sampler entry and raises too).
- `lm_loss.json`: the cached gold loss per set; `results.json`: the summary (what `minillm report` reads).

Departures from the official code (LMOps `minillm/evaluate_main.py`, `rouge_metric.py`):
- LM loss is token-averaged over the set; the official code averages per-example means. Both are reported
  (`lm_loss`, `lm_loss_per_example`). Prompt + gold is capped at max_prompt_length + max_new_tokens tokens
  (official: 512 = 256 + 256).
- At most `max_new_tokens` new tokens (the paper: 256); the official code allows 512 minus the padded prompt length.
- Prompts over `max_prompt_length` tokens are skipped and counted (`skipped_long`), not truncated; the official
  data was filtered with the same rule beforehand (with GPT-2's tokenizer).
- The answer is cut at the first EOS id (official: at the text "<|endoftext|>" after decoding without special
  tokens). The official code also reports exact match; we do not.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import itertools
import json
import math
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from minillm import models
from minillm.config import ConfigError, EvalConfig
from minillm.data import instructions
from minillm.data.instructions import load_records
from minillm.data.template import build_prompt
from minillm.data.tokenize import encode_records
from minillm.environment import environment
from minillm.evaluate import generate, metrics

GENERATIONS = "generations.jsonl"
RESULTS = "results.json"
SETTINGS = "settings.json"
LM_LOSS = "lm_loss.json"

# EvalConfig fields that change what a generation is; a rerun into the same folder must keep them.
FROZEN_FIELDS = (
    "model",
    "dtype",
    "template",
    "field_instruction",
    "field_input",
    "field_output",
    "max_prompt_length",
    "batch_size",
    "temperature",
    "top_p",
    "top_k",
    "max_new_tokens",
    "no_repeat_ngram_size",
)
# Names the sampler behind generations.jsonl; change it whenever the tokens a seed gives change.
SAMPLER = "minillm.rollout inverse-CDF, one generator per (prompt, seed)"


@dataclass
class Item:
    id: str
    prompt: str
    prompt_ids: list[int]
    references: list[str]
    gold_tokens: int  # first reference, in the model's tokens, EOS excluded
    record: dict[str, Any]


@dataclass
class EvalSet:
    name: str
    spec: str
    revision: str
    n_records: int  # after the SelfInst-242 filter and max_per_set
    skipped_long: int
    items: list[Item]


# ------------------------------------------------------------------------------------------------
# names and provenance


def slug(spec: str) -> str:
    """A folder name for a model or data spec: runs of characters outside [A-Za-z0-9._-] become '_'."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", spec.strip().strip("/")).strip("_.")
    if not out:
        raise ValueError(f"cannot make a name from {spec!r}")
    return out


def set_name(spec: str) -> str:
    """Shipped names stay; a file is named by its stem (x.jsonl.gz -> x); hf:NAME[:SPLIT] is slugged."""
    if spec in instructions.SHIPPED:
        return spec
    if spec.startswith("hf:"):
        return slug(spec)
    name = Path(spec).name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return slug(name)


def data_revision(spec: str) -> str:
    """sha256 (first 16 hex digits) of a set's file; Hugging Face datasets are named, not hashed."""
    if spec.startswith("hf:"):
        return f"{spec} (not hashed)"
    digest = hashlib.sha256(instructions.resolve(spec).read_bytes()).hexdigest()
    return f"sha256:{digest[:16]}"


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def write_json(path: Path, obj: Any) -> None:
    """Atomic write; NaN and inf become null (strict JSON)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False))
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------
# data


def load_eval_set(spec: str, cfg: EvalConfig, tokenizer: Any) -> EvalSet:
    """Records of one set, filtered (SelfInst 242, max_per_set, then prompts over max_prompt_length skipped)."""
    records = load_records(
        spec,
        field_instruction=cfg.field_instruction,
        field_input=cfg.field_input,
        field_output=cfg.field_output,
    )
    for i, rec in enumerate(records):
        rec.setdefault("id", str(i))
        rec["id"] = str(rec["id"])
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError(f"set {spec!r}: record ids are not unique")
    if cfg.selfinst_242 and records and "in_minillm_242" in records[0]:
        records = [r for r in records if r.get("in_minillm_242")]
    if cfg.max_per_set is not None:
        records = records[: cfg.max_per_set]
    items, skipped = [], 0
    for rec in records:
        prompt = build_prompt(rec["instruction"], rec["input"], cfg.template, tokenizer)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(prompt_ids) > cfg.max_prompt_length:
            skipped += 1
            continue
        refs = rec.get("references")
        if not (isinstance(refs, list) and refs and all(isinstance(r, str) for r in refs)):
            refs = [rec["output"]]
        gold = len(tokenizer(refs[0], add_special_tokens=False)["input_ids"])
        items.append(Item(rec["id"], prompt, prompt_ids, refs, gold, rec))
    return EvalSet(set_name(spec), spec, data_revision(spec), len(records), skipped, items)


# ------------------------------------------------------------------------------------------------
# files


def read_generations(path: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Lines of generations.jsonl (or a published .jsonl.gz) keyed by (set, id, seed). A torn last line (a killed
    run) is dropped."""
    if not path.is_file():
        return {}
    gz = path.suffix == ".gz"
    data = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    # split on "\n" only: str.splitlines would also cut answers that contain U+2028 and other line separators
    lines = data.decode("utf-8").removesuffix("\n").split("\n")
    out = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) and not gz:  # torn final write: rewrite the file without it
                path.write_text("".join(x + "\n" for x in lines[:-1]), encoding="utf-8")
                break
            raise ValueError(f"{path}:{n}: malformed line; delete the file to regenerate") from None
        out[(row["set"], row["id"], int(row["seed"]))] = row
    return out


def check_settings(out_dir: Path, cfg: EvalConfig) -> None:
    """Write settings.json on the first run; on a rerun, raise if a generation-relevant field changed."""
    path = out_dir / SETTINGS
    now = {k: getattr(cfg, k) for k in FROZEN_FIELDS} | {"sampler": SAMPLER}
    if path.is_file():
        before = json.loads(path.read_text())
        changed = [k for k in FROZEN_FIELDS if k in before and before[k] != now[k]]
        if before.get("sampler") != SAMPLER:
            changed.append("sampler")
        if changed:
            diff = ", ".join(f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in changed)
            raise ConfigError(
                f"{out_dir} holds generations made with other settings ({diff}); "
                "use another output_dir or delete that folder"
            )
    else:
        write_json(path, now)


# ------------------------------------------------------------------------------------------------
# answers


def answer(
    model: Any, tokenizer: Any, prompts: list[list[int]], seeds: list[int], cfg: EvalConfig
) -> list[tuple[str, int, bool]]:
    """The protocol's answer to each prompt, sampled as one batch, prompt b from a generator seeded with
    seeds[b], with cfg's decoding: its text (cut at the first EOS, special tokens dropped, stripped), its
    token count before that EOS and whether an EOS came."""
    eos = tokenizer.eos_token_id
    responses = generate.sample(
        model,
        prompts,
        seed=seeds,
        eos_id=eos,
        pad_id=tokenizer.pad_token_id,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        max_new_tokens=cfg.max_new_tokens,
        no_repeat_ngram_size=cfg.no_repeat_ngram_size,
    )  # [len(prompts), T]
    out = []
    for ids in responses.tolist():
        tokens, finished = generate.trim_at_eos(ids, eos)
        out.append((tokenizer.decode(tokens, skip_special_tokens=True).strip(), len(tokens), finished))
    return out


def validation_rouge_l(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    references: list[str],
    *,
    seed: int,
    rank: int,
    batch_size: int,
    max_new_tokens: int,
) -> list[float]:
    """Rouge-L of each prompt's answer under `minillm eval`'s decoding (EvalConfig's defaults, the paper's:
    temperature 1, top_p 1, top_k 0, no_repeat_ngram_size 6), so that training picks its best checkpoint by
    the protocol's own metric. Batches of batch_size in the given order; prompt i draws from
    stable_seed(seed, "valid", rank, i), the same answers at every evaluation of the same weights."""
    cfg = EvalConfig(max_new_tokens=max_new_tokens)
    scores = []
    for start in range(0, len(prompts), batch_size):
        part = prompts[start : start + batch_size]
        seeds = [generate.stable_seed(seed, "valid", rank, start + i) for i in range(len(part))]
        texts = [text for text, _, _ in answer(model, tokenizer, part, seeds, cfg)]
        refs = references[start : start + batch_size]
        scores += [metrics.rouge_l(text, [ref]) for text, ref in zip(texts, refs, strict=True)]
    return scores


# ------------------------------------------------------------------------------------------------
# the loop


def _lm_loss(
    model: Any, tokenizer: Any, eval_set: EvalSet, cfg: EvalConfig, out_dir: Path
) -> dict[str, float | int | None]:
    """Gold loss of a set, cached in lm_loss.json under a key of the ids and length rules."""
    max_length = cfg.max_prompt_length + cfg.max_new_tokens
    ids = [it.id for it in eval_set.items]
    key_text = json.dumps([ids, cfg.template, max_length, eval_set.revision])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    path = out_dir / LM_LOSS
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if cache.get(eval_set.name, {}).get("key") == key:
        return cache[eval_set.name]["value"]
    if not eval_set.items:
        value: dict[str, float | int | None] = {"lm_loss": None, "lm_loss_per_example": None, "lm_tokens": 0}
    else:
        examples, dropped = encode_records(
            [it.record for it in eval_set.items],
            tokenizer,
            template=cfg.template,
            max_prompt_length=cfg.max_prompt_length,
            max_length=max_length,
        )
        assert dropped == 0, "items were filtered by the same prompt-length rule"
        # sorted by length: less padding, and the sums below do not depend on the order
        examples.sort(key=lambda e: len(e.prompt_ids) + len(e.response_ids))
        nll = generate.gold_nll(model, examples, tokenizer.pad_token_id, batch_size=cfg.batch_size)
        total, tokens = sum(s for s, _ in nll), sum(n for _, n in nll)
        value = {
            "lm_loss": total / tokens,
            "lm_loss_per_example": sum(s / n for s, n in nll) / len(nll),
            "lm_tokens": tokens,
        }
    cache[eval_set.name] = {"key": key, "value": value}
    write_json(path, cache)
    return value


def summarise(eval_set: EvalSet, rows: dict[tuple[str, str, int], dict[str, Any]], seeds: list[int]) -> dict:
    """Per-set results from the generation lines: per-seed means, then mean and std over seeds."""
    items = eval_set.items
    out: dict[str, Any] = {
        "spec": eval_set.spec,
        "revision": eval_set.revision,
        "n_records": eval_set.n_records,
        "n_prompts": len(items),
        "skipped_long": eval_set.skipped_long,
    }
    if not items:
        return out | {"rougeL": None, "dist4": None, "gen_tokens": None, "eos_rate": None, "buckets": {}}
    per_seed: dict[str, dict[int, float]] = {"rougeL": {}, "dist4": {}, "gen_tokens": {}, "eos_rate": {}}
    by_bucket: dict[str, list[Item]] = {name: [] for name, _, _ in metrics.BUCKETS}
    for it in items:
        by_bucket[metrics.length_bucket(it.gold_tokens)].append(it)
    bucket_seed: dict[str, dict[int, float]] = {name: {} for name in by_bucket}
    for seed in seeds:
        lines = [rows[(eval_set.name, it.id, seed)] for it in items]
        per_seed["rougeL"][seed] = sum(r["score"] for r in lines) / len(lines)
        per_seed["dist4"][seed] = metrics.distinct_n([r["output"] for r in lines], 4)
        per_seed["gen_tokens"][seed] = sum(r["new_tokens"] for r in lines) / len(lines)
        per_seed["eos_rate"][seed] = sum(bool(r["finished"]) for r in lines) / len(lines)
        for name, members in by_bucket.items():
            if members:
                scores = [rows[(eval_set.name, it.id, seed)]["score"] for it in members]
                bucket_seed[name][seed] = sum(scores) / len(scores)

    def agg(values: dict[int, float]) -> dict[str, Any]:
        m, s = metrics.mean_std([values[seed] for seed in seeds])
        return {"mean": m, "std": s, "per_seed": {str(k): v for k, v in values.items()}}

    for key, values in per_seed.items():
        out[key] = agg(values)
    out["buckets"] = {
        name: ({"n": len(by_bucket[name])} | agg(bucket_seed[name]) if by_bucket[name] else {"n": 0})
        for name in by_bucket
    }
    return out


def evaluate_model(
    model: Any, tokenizer: Any, cfg: EvalConfig, out_dir: str | Path, *, progress: bool = True
) -> dict:
    """Generate what is missing, score, summarise; writes the three files above into `out_dir`."""
    out_dir = Path(out_dir)
    sets = [load_eval_set(spec, cfg, tokenizer) for spec in cfg.sets]  # bad data: fail before any folder
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise ConfigError(f"two sets share a name: {names}; rename a file")
    out_dir.mkdir(parents=True, exist_ok=True)
    check_settings(out_dir, cfg)
    gen_path = out_dir / GENERATIONS
    rows = read_generations(gen_path)
    B = cfg.batch_size

    todo = []  # (set, [(item, seed)]) for every batch with a missing line
    for s in sets:
        by_length = sorted(s.items, key=lambda it: len(it.prompt_ids))  # stable: less left padding to prefill
        pairs = [(it, seed) for it in by_length for seed in cfg.seeds]  # a prompt's seeds share its prefill
        # at most B rows a batch, as even as possible: no small last batch decoding at a poor rate per row
        n = max(1, -(-len(pairs) // B))  # a set left empty by the length rule: one empty part
        ends = [len(pairs) * k // n for k in range(n + 1)]
        for lo, hi in itertools.pairwise(ends):
            part = pairs[lo:hi]
            if any((s.name, it.id, seed) not in rows for it, seed in part):
                todo.append((s, part))

    gen_seconds, gen_prompts, gen_tokens = 0.0, 0, 0
    bar = tqdm(todo, desc="eval", unit="batch", disable=not progress or not todo)
    with gen_path.open("a", encoding="utf-8") as fh:
        for s, part in bar:
            bar.set_postfix_str(s.name)
            t0 = time.perf_counter()
            answers = answer(
                model,
                tokenizer,
                [it.prompt_ids for it, _ in part],
                [generate.stable_seed(seed, s.name, it.id) for it, seed in part],
                cfg,
            )
            gen_seconds += time.perf_counter() - t0
            gen_prompts += len(part)
            for (it, seed), (text, n_tokens, finished) in zip(part, answers, strict=True):
                gen_tokens += n_tokens + finished
                key = (s.name, it.id, seed)
                if key in rows:
                    continue
                row = {
                    "set": s.name,
                    "id": it.id,
                    "seed": seed,
                    "prompt": it.prompt,
                    "output": text,
                    "reference": it.references[0],
                    "score": metrics.rouge_l(text, it.references),
                    "new_tokens": n_tokens,
                    "finished": finished,
                    "gold_tokens": it.gold_tokens,
                    "bucket": metrics.length_bucket(it.gold_tokens),
                }
                if len(it.references) > 1:
                    row["references"] = it.references
                rows[key] = row
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()

    results_sets = {}
    for s in sets:
        summary = summarise(s, rows, cfg.seeds)
        if cfg.lm_loss:
            summary |= _lm_loss(model, tokenizer, s, cfg, out_dir)
        results_sets[s.name] = summary
    param = next(model.parameters())
    results = {
        "kind": "eval",
        # the name as given (reports match ablations by it), not its folder's slug ("w/o" -> "w_o")
        "name": cfg.name or out_dir.name,
        "model": cfg.model,
        "config": dataclasses.asdict(cfg),
        "sets": results_sets,
        "timing": {
            "generated_prompts": gen_prompts,
            "generated_tokens": gen_tokens,
            "generate_seconds": gen_seconds,
            "seconds_per_100_prompts": 100 * gen_seconds / gen_prompts if gen_prompts else None,
        },
        "environment": environment(param.device, param.dtype),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    results = json_safe(results)
    write_json(out_dir / RESULTS, results)
    return results


def json_safe(obj: Any) -> Any:
    """`obj` with every NaN or infinite float replaced by None, so it serialises as strict JSON."""
    if isinstance(obj, float):
        return _finite(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_eval(cfg: EvalConfig) -> dict:
    """`minillm eval`: load the model and tokenizer, evaluate into output_dir/<model slug>/, return the results."""
    dev = device()
    dtype = models.torch_dtype(cfg.dtype, dev)
    model = models.load_model(cfg.model, dtype=dtype, trust_remote_code=cfg.trust_remote_code).to(dev)
    tokenizer = models.load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    models.use_vocab(model, len(tokenizer))  # never sample an id past the tokenizer's
    out_dir = Path(cfg.output_dir) / (slug(cfg.name) if cfg.name else slug(cfg.model))
    print(f"minillm eval: {cfg.model} -> {out_dir}")
    return evaluate_model(model, tokenizer, cfg, out_dir)
