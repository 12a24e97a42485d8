"""Instruction records: shipped sets, user JSONL(.gz) files and Hugging Face datasets.

A record is a dict with at least instruction / input / output (field names configurable) plus any extra
keys the source carries. A malformed line, a field of the wrong type or an empty file raises `InputError`
naming the file and the line or record.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from minillm.errors import InputError

# The data shipped with the project (sources and licences in data/README.md).
DATA_DIR = Path(__file__).resolve().parents[2] / "data"
SHIPPED = {
    "dolly_train": "dolly_train.jsonl.gz",
    "dolly_valid": "dolly_valid.jsonl",
    "dolly_test": "dolly_test.jsonl",
    "dolly": "dolly_test.jsonl",
    "selfinst": "selfinst.jsonl",
    "sni": "sni.jsonl",
    "unni": "unni.jsonl",
    "pretrain": "pretrain_sample.jsonl.gz",
}


def resolve(spec: str) -> Path:
    """Path of a shipped set name or a user file; raises if it does not exist."""
    path = DATA_DIR / SHIPPED[spec] if spec in SHIPPED else Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"data {spec!r} not found at {path}; use a shipped name ({', '.join(SHIPPED)}), an existing "
            ".jsonl/.jsonl.gz file, or hf:NAME[:SPLIT]"
        )
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All JSON objects of a .jsonl or .jsonl.gz file; blank lines are skipped."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(
                    f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); fix or delete that line"
                ) from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            out.append(obj)
    return out


def load_records(
    spec: str,
    *,
    field_instruction: str = "instruction",
    field_input: str = "input",
    field_output: str = "output",
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Records with the canonical keys instruction / input / output (+ the source's extra keys)."""
    if spec.startswith("hf:"):
        import datasets

        name, _, split = spec[3:].partition(":")
        rows = [dict(r) for r in datasets.load_dataset(name, split=split or "train")]
        where = [f"{spec} row {i}" for i in range(len(rows))]
    else:
        path = resolve(spec)
        rows = read_jsonl(path)
        if not rows:
            raise InputError(f"data file {path} is empty: it holds no JSON record")
        where = [f"{path} record {i + 1}" for i in range(len(rows))]
    if limit is not None:
        rows, where = rows[:limit], where[:limit]
    out = []
    for row, loc in zip(rows, where, strict=True):
        for key in (field_instruction, field_output):
            if key not in row:
                raise InputError(f"{loc}: missing string field {key!r} (keys: {', '.join(row)})")
            if not isinstance(row[key], str):
                raise InputError(f"{loc}: field {key!r} must be a string, got {type(row[key]).__name__}")
        inp = row.get(field_input) or ""
        if not isinstance(inp, str):
            raise InputError(f"{loc}: field {field_input!r} must be a string, got {type(inp).__name__}")
        rec = {k: v for k, v in row.items() if k not in (field_instruction, field_input, field_output)}
        rec.update(instruction=row[field_instruction], input=inp, output=row[field_output])
        out.append(rec)
    return out
