"""Data: template text, exact token masks, the length rule, PT blocks and malformed input."""

from __future__ import annotations

import gzip
import json

import pytest

from minillm.data.instructions import load_records, read_jsonl
from minillm.data.pretrain import load_pt_blocks
from minillm.data.template import build_prompt
from minillm.data.tokenize import Example, collate, collate_prompts, encode_records, position_ids


def test_alpaca_template_matches_the_paper():
    assert build_prompt("Name a colour.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a colour.\n\n### Response:\n"
    )
    assert build_prompt("Sum.", "1 and 2").endswith(
        "### Instruction:\nSum.\n\n### Input:\n1 and 2\n\n### Response:\n"
    )
    assert "paired with an input that provides further context" in build_prompt("Sum.", "1 and 2")
    with pytest.raises(ValueError, match="unknown template 'x'"):
        build_prompt("a", template="x")


def test_shipped_sets_load_with_their_sizes():
    assert len(load_records("dolly_test")) == 500
    assert len(load_records("dolly_valid")) == 1000
    assert len(load_records("dolly_train")) == 11435
    sni = load_records("sni", limit=3)
    assert all(isinstance(r["references"], list) for r in sni)


def test_encode_masks_prompt_and_keeps_eos(tokenizer):
    eos = tokenizer.eos_token_id
    rec = {"instruction": "Say hi.", "input": "", "output": "hi"}
    (ex,), dropped = encode_records(
        [rec], tokenizer, template="alpaca", max_prompt_length=256, max_length=512
    )
    prompt = tokenizer(build_prompt("Say hi."), add_special_tokens=False)["input_ids"]
    assert dropped == 0 and ex.prompt_ids == prompt
    assert ex.response_ids == tokenizer("hi", add_special_tokens=False)["input_ids"] + [eos]
    batch = collate([ex, Example([7, 8], [9, eos])], pad_id=eos)
    n = len(prompt) + len(ex.response_ids)
    L = batch["input_ids"].shape[1]
    assert L == n
    # row 1: prompt [7, 8], response [9, eos], then pads (= eos) that are neither attended nor targets
    assert batch["input_ids"][1].tolist() == [7, 8, 9, eos] + [eos] * (L - 4)
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1] + [0] * (L - 4)
    assert batch["target_mask"][1].tolist() == [False, False, True, True] + [False] * (L - 4)
    assert batch["target_mask"][0].sum() == len(ex.response_ids) and batch["target_mask"][0, n - 1]


def test_length_rule_drops_long_prompts_and_caps_total(tokenizer):
    recs = [{"instruction": "word " * n, "input": "", "output": "answer " * 50} for n in (1, 5, 200)]
    lengths = [
        len(tokenizer(build_prompt(r["instruction"]), add_special_tokens=False)["input_ids"]) for r in recs
    ]
    limit = lengths[1]  # keeps the first two prompts, drops the third
    exs, dropped = encode_records(
        recs, tokenizer, template="alpaca", max_prompt_length=limit, max_length=limit + 10
    )
    assert dropped == 1 and len(exs) == 2
    assert all(len(e.prompt_ids) + len(e.response_ids) == limit + 10 for e in exs)
    assert all(e.response_ids[-1] != tokenizer.eos_token_id for e in exs)  # cut by the cap: no EOS target


def test_left_padded_prompts_and_positions():
    batch = collate_prompts([[5, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids(batch["attention_mask"]).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: malformed JSON"):
        read_jsonl(path)
    path.write_text('["not", "an", "object"]\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a JSON object"):
        read_jsonl(path)
    path.write_text('{"instruction": "a"}\n')
    with pytest.raises(ValueError, match=r"record 1: missing string field 'output'"):
        load_records(str(path))
    with pytest.raises(FileNotFoundError, match="use a shipped name"):
        load_records(str(tmp_path / "nope.jsonl"))


def test_custom_field_names_and_gzip(tmp_path):
    path = tmp_path / "mine.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(json.dumps({"q": "Why?", "ctx": "", "a": "Because.", "extra": 1}) + "\n")
    (rec,) = load_records(str(path), field_instruction="q", field_input="ctx", field_output="a")
    assert rec == {"instruction": "Why?", "input": "", "output": "Because.", "extra": 1}


def test_pt_blocks_join_documents_with_eos(tokenizer, tmp_path):
    path = tmp_path / "pt.jsonl"
    docs = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota kappa"]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    eos = tokenizer.eos_token_id
    stream = sum((tokenizer(d, add_special_tokens=False)["input_ids"] + [eos] for d in docs), [])
    blocks = load_pt_blocks(str(path), tokenizer, 4)
    assert blocks.shape == (len(stream) // 4, 4)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    assert (blocks == eos).sum() >= 2
    with pytest.raises(ValueError, match="cannot fill one block of 1000"):
        load_pt_blocks(str(path), tokenizer, 1000)
    assert load_pt_blocks("pretrain", tokenizer, 64, max_blocks=3).shape == (3, 64)
