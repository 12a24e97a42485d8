"""`make demo` end to end on a tiny pair: cut and heal, SFT, MiniLLM, and a summary that says what ran."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from minillm import demo


def test_demo_runs_and_summarises(teacher, tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    configs.mkdir()
    shrink = {  # the shipped recipes, cut to seconds
        "sft.yaml": dict(
            max_train_examples=16, max_valid_examples=4, max_steps=2, eval_every=1, save_every=1
        ),
        "distill.yaml": dict(
            max_valid_examples=4,
            num_rollouts=4,
            batch_size=2,
            grad_accum=1,
            max_steps=4,
            max_new_tokens=6,
            valid_max_new_tokens=6,
            eval_every=2,
            save_every=2,
        ),
    }
    for name, small in shrink.items():
        recipe = yaml.safe_load((demo.CONFIGS / name).read_text())
        (configs / name).write_text(yaml.safe_dump(recipe | small))
    monkeypatch.setattr(demo, "CONFIGS", configs)
    monkeypatch.setattr(demo, "TEACHER", str(teacher))
    monkeypatch.setattr(demo, "LAYERS", [0, 2])
    monkeypatch.setattr(
        demo, "HEAL", dict(heal_steps=2, heal_lr=1e-3, heal_batch_size=2, heal_block_length=32)
    )

    out = tmp_path / "demo"
    demo.main(["--out", str(out)])
    made = json.loads((out / "student-init" / "minillm_derivation.json").read_text())
    assert made["layers"] == [0, 2] and len(made["heal_kl"]) == 2
    text = (out / "summary.md").read_text()
    assert "keeps layers [0, 2] of the teacher's 3" in text
    for row in ("| teacher |", "| student, cut and healed |", "| student after SFT |", "| Rouge-L against"):
        assert row in text
    assert text.count("- *reference*:") == 3 and text.count("- **student (MiniLLM)**:") == 3

    mtime = Path(out / "student-init" / "model.safetensors").stat().st_mtime
    demo.main(["--out", str(out)])  # a rerun resumes: nothing is cut or trained again
    assert Path(out / "student-init" / "model.safetensors").stat().st_mtime == mtime
