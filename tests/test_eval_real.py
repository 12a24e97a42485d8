"""The real embedded teacher (SmolLM2-135M-Instruct) beats a random model of its shape on DollyEval.

20 DollyEval prompts, one seed, the paper's decoding except max_new_tokens = 64 (not 256) to keep the test
near a minute on 2 CPU cores. Rouge-L of 64-token answers is lower than at 256 for long references, but the
gap to random weights (which emit unrelated sub-words) stays wide.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from minillm import models
from minillm.config import EvalConfig
from minillm.evaluate.protocol import evaluate_model

pytestmark = pytest.mark.slow


def test_teacher_rouge_far_above_random_weights(tmp_path):
    teacher = models.load_model(models.EMBEDDED_ALIAS)
    tok = models.load_tokenizer(models.EMBEDDED_ALIAS)
    torch.manual_seed(0)
    random_model = AutoModelForCausalLM.from_config(teacher.config)  # same shape, initializer weights
    kw = dict(
        model=models.EMBEDDED_ALIAS,
        sets=["dolly"],
        seeds=[10],
        max_per_set=20,
        max_new_tokens=64,
        batch_size=10,
    )
    got = {}
    for name, model, lm_loss in (("teacher", teacher, True), ("random", random_model, False)):
        res = evaluate_model(model, tok, EvalConfig(**kw, lm_loss=lm_loss), tmp_path / name, progress=False)
        got[name] = res["sets"]["dolly"]
    print({k: (v["rougeL"]["mean"], v.get("lm_loss")) for k, v in got.items()})
    assert got["teacher"]["n_prompts"] == 20
    # measured on this machine (alpaca template, 64 tokens): teacher 12.3 (HF generate), 10.7 (minillm.rollout),
    # random 0.2. SmolLM2 is chat-tuned, not Dolly-tuned like the paper's teachers, and 64 tokens cut most answers
    # short; the mean over 20 prompts has a standard error of about 2 points, so the bar sits at 5 points above
    # random (and 5x it)
    assert got["teacher"]["rougeL"]["mean"] > got["random"]["rougeL"]["mean"] + 5.0
    assert got["teacher"]["rougeL"]["mean"] > 5 * got["random"]["rougeL"]["mean"]
    # gold loss of the teacher (measured 2.25 nats; random weights would sit near ln(49152) = 10.8)
    assert got["teacher"]["lm_loss"] < 4.0
