"""Pure evaluation maths against numbers worked out by hand: Rouge-L, Dist-4, buckets, ECE, ExAccErr."""

from __future__ import annotations

import math

import pytest
import torch

from minillm.evaluate.calibration import calibration_result
from minillm.evaluate.exposure import PrefixStats, accumulated_error, ex_acc_err, explain
from minillm.evaluate.metrics import distinct_n, ece, ece_bins, length_bucket, mean_std, rouge_l

# ------------------------------------------------------------------------------------------------ Rouge-L


def test_rouge_l_equal_lengths_by_hand():
    # pred: the cat sat on the mat (6 words); ref: the cat is on the mat (6 words)
    # LCS = the cat on the mat = 5 -> P = R = 5/6 -> F = 5/6 = 83.333...
    assert rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(500 / 6, abs=1e-9)


def test_rouge_l_unequal_lengths_by_hand():
    # pred: a b c d (4 words); ref: a c e (3). LCS = a c = 2 -> P = 2/4, R = 2/3
    # F = 2PR / (P + R) = (2 * 1/2 * 2/3) / (1/2 + 2/3) = (2/3) / (7/6) = 4/7 -> 57.142857...
    assert rouge_l("a b c d", ["a c e"]) == pytest.approx(400 / 7, abs=1e-9)


def test_rouge_l_stems_lowercases_and_drops_punctuation():
    # Porter stemmer (words > 3 chars): dogs -> dog, running -> run, runs -> run; case and "!" are ignored
    assert rouge_l("Dogs running!", ["dog runs"]) == pytest.approx(100.0)


def test_rouge_l_takes_the_max_over_references():
    # vs "x y z": 0; vs "the cat is on the mat": 83.33 (first test); vs "the cat": LCS 2, P 2/6, R 1 -> F = 50
    refs = ["x y z", "the cat is on the mat", "the cat"]
    assert rouge_l("the cat sat on the mat", refs) == pytest.approx(500 / 6, abs=1e-9)
    assert rouge_l("the cat sat on the mat", ["x y z", "the cat"]) == pytest.approx(50.0, abs=1e-9)


def test_rouge_l_empty_output_scores_zero():
    assert rouge_l("", ["the cat is on the mat"]) == 0.0
    assert rouge_l("!!! ...", ["the cat"]) == 0.0  # no [a-z0-9] token left after rouge_score's tokenizer


def test_rouge_l_rejects_missing_references():
    with pytest.raises(ValueError, match="non-empty list"):
        rouge_l("x", [])
    with pytest.raises(ValueError, match="non-empty list"):
        rouge_l("x", "a plain string is not a list of references")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ Dist-4, buckets


def test_distinct_4_by_hand():
    # "a b c d e" -> (a b c d), (b c d e); "A b c d" -> (a b c d) (lowercased); "x y" -> none
    # 3 four-grams, 2 distinct -> 66.67
    assert distinct_n(["a b c d e", "A b c d", "x y"], 4) == pytest.approx(200 / 3)
    # "a a a a a a": 3 four-grams, all (a a a a) -> 1/3
    assert distinct_n(["a a a a a a"], 4) == pytest.approx(100 / 3)
    assert distinct_n(["", "too short"], 4) == 0.0


@pytest.mark.parametrize(
    "n,bucket",
    [(0, "[0,5]"), (5, "[0,5]"), (6, "[6,10]"), (10, "[6,10]"), (11, "[11,inf)"), (300, "[11,inf)")],
)
def test_length_bucket_edges(n, bucket):
    assert length_bucket(n) == bucket


# ------------------------------------------------------------------------------------------------ ECE


def test_ece_by_hand():
    # bins of width 0.1, (lo, hi]:
    #   (0.9, 1.0]: 0.95 ok            -> acc 1,   conf 0.95  -> |gap| 0.05,  weight 1/5
    #   (0.8, 0.9]: 0.85 ok, 0.82 no   -> acc 0.5, conf 0.835 -> |gap| 0.335, weight 2/5
    #   (0.5, 0.6]: 0.60 ok, 0.55 no   -> acc 0.5, conf 0.575 -> |gap| 0.075, weight 2/5  (0.6 is in (0.5, 0.6])
    # ECE = 0.2 * 0.05 + 0.4 * 0.335 + 0.4 * 0.075 = 0.01 + 0.134 + 0.03 = 0.174
    conf = [0.95, 0.85, 0.82, 0.6, 0.55]
    ok = [True, True, False, True, False]
    assert ece(conf, ok, 10) == pytest.approx(0.174, abs=1e-12)
    bins = ece_bins(conf, ok, 10)
    assert [b["count"] for b in bins] == [0, 0, 0, 0, 0, 2, 0, 0, 2, 1]
    assert bins[5]["confidence"] == pytest.approx(0.575) and bins[5]["accuracy"] == 0.5
    assert math.isnan(bins[0]["accuracy"])


def test_ece_zero_when_calibrated_and_one_bin_case():
    # four predictions at 0.75, three right: accuracy 0.75 = confidence -> ECE 0
    assert ece([0.75] * 4, [True, True, True, False], 10) == pytest.approx(0.0, abs=1e-12)
    # one bin: |mean acc - mean conf| = |1/2 - (0.9 + 0.5)/2| = |0.5 - 0.7| = 0.2
    assert ece([0.9, 0.5], [True, False], 1) == pytest.approx(0.2)


def test_calibration_result_from_label_logprobs():
    # unnormalised label probabilities (p(No), p(Yes)); normalised confidences:
    #   (0.6, 0.2) -> 0.75 for No;  (0.1, 0.3) -> 0.75 for Yes;  (0.05, 0.45) -> 0.9 for Yes
    # gold No, No, Yes -> correct, wrong, correct. Bins (0.7,0.8]: conf 0.75, acc 0.5 -> 0.25 * 2/3;
    # (0.8,0.9]: conf 0.9, acc 1 -> 0.1 * 1/3. ECE = 1/6 + 1/30 = 0.2; accuracy 2/3
    # label mass = mean(0.8, 0.4, 0.5) = 17/30
    lp = torch.tensor([[0.6, 0.2], [0.1, 0.3], [0.05, 0.45]], dtype=torch.float64).log()
    res = calibration_result(lp, [0, 0, 1], bins=10)
    assert res["ece"] == pytest.approx(0.2, abs=1e-12)
    assert res["accuracy"] == pytest.approx(2 / 3)
    assert res["mean_confidence"] == pytest.approx((0.75 + 0.75 + 0.9) / 3)
    assert res["label_mass"] == pytest.approx(17 / 30)


def test_mean_std_sample_std():
    # mean 2; squared deviations 1 + 0 + 1 = 2; / (n - 1) = 1 -> std 1
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)


# ------------------------------------------------------------------------------------------------ ExAccErr


def test_accumulated_error_by_hand():
    # prompt 0, two samples over 3 steps; sample 0 ended after step 2 (dead at step 3):
    #   step 1: (1 + 3) / 2 = 2; step 2: (2 + 4) / 2 = 3; step 3: only sample 1 -> 5   => cumsum 2, 5, 10
    # prompt 1, both samples ended after step 1: step 1 = 1, steps 2-3 add 0            => 1, 1, 1
    kl = torch.tensor([[[1.0, 2.0, 99.0], [3.0, 4.0, 5.0]], [[1.0, 7.0, 7.0], [1.0, 7.0, 7.0]]])
    alive = torch.tensor([[[1, 1, 0], [1, 1, 1]], [[1, 0, 0], [1, 0, 0]]], dtype=torch.bool)
    out = accumulated_error(kl, alive)
    torch.testing.assert_close(out, torch.tensor([[2.0, 5.0, 10.0], [1.0, 1.0, 1.0]], dtype=torch.float64))


def test_explain_by_hand():
    # two prompts over 3 steps; prompt 1 stops running after step 1, so its error stays flat from there
    stats = PrefixStats(
        error=torch.tensor([[2.0, 5.0, 10.0], [4.0, 4.0, 4.0]], dtype=torch.float64),
        live=torch.tensor([[True, True, True], [True, False, False]]),
        entropy=torch.tensor([[1.0, 2.0, 3.0], [3.0, 0.0, 0.0]], dtype=torch.float64),
        reverse_kl=torch.tensor([[0.5, 1.0, 2.0], [1.5, 0.0, 0.0]], dtype=torch.float64),
    )
    out = explain(stats)
    assert out["live"] == [1.0, 0.5, 0.5]
    assert out["step_error"] == [3.0, 3.0, 5.0]  # step 1: (2 + 4) / 2; then prompt 0's alone: 3, 5
    assert out["teacher_entropy"] == [2.0, 2.0, 3.0]
    assert out["reverse_kl"] == [1.0, 1.0, 2.0]
    none = torch.zeros(2, 3, dtype=torch.float64)
    stats = PrefixStats(none, torch.zeros(2, 3, dtype=torch.bool), none, none)
    assert all(math.isnan(v) for v in explain(stats)["step_error"])  # no prompt running: undefined, not 0


def test_ex_acc_err_by_hand():
    # (2-1)/1 = 100 %; (5-5)/5 = 0 %; (10-8)/8 = 25 %
    out = ex_acc_err(torch.tensor([2.0, 5.0, 10.0]), torch.tensor([1.0, 5.0, 8.0]))
    torch.testing.assert_close(out, torch.tensor([100.0, 0.0, 25.0], dtype=torch.float64))


def test_ex_acc_err_is_zero_when_prefix_distributions_agree_and_defined_at_zero_error():
    eps = torch.tensor([0.3, 0.7, 1.2])
    torch.testing.assert_close(ex_acc_err(eps.clone(), eps), torch.zeros(3, dtype=torch.float64))
    # student = teacher: no error at all -> no excess (0); error only on student prefixes -> +inf
    out = ex_acc_err(torch.tensor([0.0, 0.5]), torch.tensor([0.0, 0.0]))
    assert out[0].item() == 0.0 and out[1].item() == math.inf
