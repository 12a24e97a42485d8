"""The evaluation protocol, exposure bias and calibration on tiny random models (conftest fixtures, no network)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import save_tiny_model
from reference import kl_slow, softmax_slow

from minillm import models
from minillm.config import CalibrationConfig, ConfigError, EvalConfig, ExposureConfig
from minillm.data.template import build_prompt
from minillm.data.tokenize import Example
from minillm.evaluate import generate, protocol
from minillm.evaluate.calibration import build_task, label_logprobs, run_calibration
from minillm.evaluate.exposure import ex_acc_err, prompt_errors, run_exposure, step_kl
from minillm.report import make_report


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return models.load_model(str(tiny_llama)), models.load_tokenizer(str(tiny_llama))


def sample_kw(tok, **kw):
    base = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=1.0, top_p=1.0, top_k=0)
    return base | dict(max_new_tokens=6) | kw


# ------------------------------------------------------------------------------------------------ sampling


def test_same_seed_same_generations_regardless_of_global_state(llama):
    model, tok = llama
    prompts = [tok("Name a fish.")["input_ids"], tok("Why is the sky blue? Explain.")["input_ids"]]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = generate.sample(model, prompts, seed=10, **sample_kw(tok))
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left as it was
    torch.rand(1000)  # other consumers of the global generator in between
    b = generate.sample(model, prompts, seed=10, **sample_kw(tok))
    c = generate.sample(model, prompts, seed=20, **sample_kw(tok))
    assert a.shape == (2, 6)
    assert torch.equal(a, b)
    assert (a != c).any()  # another seed samples other tokens (random tiny model: near-uniform over 384)


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_left_padded_batch_equals_one_prompt_at_a_time(family, request):
    # near-greedy (temperature 1e-4): left padding with position ids from the mask must not change the tokens
    path = str(request.getfixturevalue(family))
    model, tok = models.load_model(path), models.load_tokenizer(path)
    prompts = [tok("Hi")["input_ids"], tok("A much longer prompt that needs no padding at all.")["input_ids"]]
    kw = sample_kw(tok, temperature=1e-4, max_new_tokens=5)
    batched = generate.sample(model, prompts, seed=0, **kw)
    for row, p in zip(batched, prompts, strict=True):
        single = generate.sample(model, [p], seed=0, **kw)[0]
        assert row[: len(single)].tolist() == single.tolist()


def test_samples_of_a_prompt_are_consecutive_rows(llama):
    # exposure pairs row r with prompt r // S: near-greedy samples of one prompt agree, across prompts they differ
    model, tok = llama
    prompts = [tok("Name a fish.")["input_ids"], tok("Why is the sky blue?")["input_ids"]]
    out = generate.sample(model, prompts, seed=0, num_return_sequences=2, **sample_kw(tok, temperature=1e-4))
    assert out.shape[0] == 4
    assert torch.equal(out[0], out[1]) and torch.equal(out[2], out[3]) and not torch.equal(out[0], out[2])


def test_trim_at_eos_and_alive_mask():
    assert generate.trim_at_eos([5, 6, 2, 2], 2) == ([5, 6], True)
    assert generate.trim_at_eos([5, 6], 2) == ([5, 6], False)
    alive = generate.alive_mask(torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8]]), 2)
    assert alive.tolist() == [[True, True, False, False], [True, True, True, True]]


def test_gold_nll_matches_an_unpadded_loop(llama):
    model, tok = llama
    examples = [Example([3, 4, 5, 6, 7], [8, 9, 0]), Example([10, 11], [12, 0]), Example([1, 2, 3], [0])]
    got = generate.gold_nll(model, examples, tok.pad_token_id, batch_size=2, chunk_size=3)
    for (nll, n), e in zip(got, examples, strict=True):
        ids = torch.tensor([e.prompt_ids + e.response_ids])
        logits = model(input_ids=ids).logits[0]  # [L, V], no padding, no chunks
        P, R = len(e.prompt_ids), len(e.response_ids)
        ref = F.cross_entropy(logits[P - 1 : P + R - 1].double(), ids[0, P:], reduction="sum")
        assert n == R
        assert nll == pytest.approx(ref.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------ protocol


def fake_sampler(tok, answer_of_seed):
    """Stands in for generate.sample: each prompt gets answer_of_seed(its row's seed) followed by EOS."""

    def sample(model, prompts, *, seed, eos_id, pad_id, **_):
        assert len(seed) == len(prompts)
        rows = []
        for row_seed in seed:
            text = answer_of_seed(row_seed)
            rows.append(tok(text, add_special_tokens=False)["input_ids"] + [eos_id] if text else [eos_id])
        width = max(map(len, rows))
        return torch.tensor([r + [eos_id] * (width - len(r)) for r in rows])

    return sample


def test_protocol_scores_aggregates_and_skips_by_hand(llama, tmp_path, monkeypatch):
    model, tok = llama
    data = write_jsonl(
        tmp_path / "mini.jsonl",
        [
            {"id": "a", "instruction": "Where is the cat?", "input": "", "output": "the cat is on the mat"},
            {
                "id": "b",
                "instruction": "Say something.",
                "input": "",
                "output": "dogs running",
                "references": ["dogs running", "the cat sat on the mat"],
            },
            {"id": "c", "instruction": "Answer yes or no.", "input": "Is it?", "output": "yes"},
            {"id": "d", "instruction": "word " * 300, "input": "", "output": "too long a prompt"},
        ],
    )
    cfg = EvalConfig(
        model="m", sets=[str(data)], seeds=[1, 2], batch_size=2, max_new_tokens=8, max_prompt_length=200,
        output_dir=str(tmp_path / "out"), lm_loss=False,
    )  # fmt: skip
    # set "mini" keeps 3 prompts (a, b, c): 6 (prompt, seed) rows in batches of 2; seed 1 answers a sentence,
    # seed 2 nothing
    owner = {generate.stable_seed(seed, "mini", i): seed for seed in (1, 2) for i in "abc"}
    answers = {1: "the cat sat on the mat", 2: ""}
    monkeypatch.setattr(generate, "sample", fake_sampler(tok, lambda s: answers[owner[s]]))
    res = protocol.evaluate_model(model, tok, cfg, tmp_path / "out" / "m", progress=False)
    s = res["sets"]["mini"]
    assert (s["n_records"], s["n_prompts"], s["skipped_long"]) == (4, 3, 1)
    # seed 1, answer "the cat sat on the mat": a -> 83.33 (5/6), b -> 100 (max over refs), c -> 0
    # seed 2, empty answer: 0 for all.  means 61.11 and 0; over seeds: mean 30.56, sample std 61.11/sqrt(2)
    s1 = (500 / 6 + 100 + 0) / 3
    assert s["rougeL"]["per_seed"] == {"1": pytest.approx(s1), "2": 0.0}
    assert s["rougeL"]["mean"] == pytest.approx(s1 / 2)
    assert s["rougeL"]["std"] == pytest.approx(s1 / 2**0.5)
    # Dist-4: seed 1 has three copies of one 6-word answer -> 9 four-grams, 3 distinct = 33.3; seed 2 none -> 0
    assert s["dist4"]["per_seed"] == {"1": pytest.approx(100 / 3), "2": 0.0}
    assert s["eos_rate"]["mean"] == 1.0
    rows = [json.loads(x) for x in (tmp_path / "out" / "m" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["id"] for r in rows} == {"a", "b", "c"}
    row_b = next(r for r in rows if r["id"] == "b" and r["seed"] == 1)
    assert row_b["references"] == ["dogs running", "the cat sat on the mat"] and row_b["score"] == 100.0
    assert next(r for r in rows if r["id"] == "a" and r["seed"] == 2)["output"] == ""
    # buckets: "yes" is 1-5 tokens -> [0,5] with scores 0 and 0; every prompt is in exactly one bucket
    assert s["buckets"]["[0,5]"]["per_seed"]["1"] == 0.0
    assert sum(b["n"] for b in s["buckets"].values()) == 3
    for name, b in s["buckets"].items():
        members = [r for r in rows if r["bucket"] == name and r["seed"] == 1]
        assert b["n"] == len(members)
        if members:
            assert b["per_seed"]["1"] == pytest.approx(sum(r["score"] for r in members) / len(members))


def test_answers_do_not_depend_on_the_batch_size(llama, tmp_path, monkeypatch):
    """Each (prompt, seed) row draws from its own generator: batches of at most 1, 4 and 6 rows give the same
    answers (3 prompts x 2 seeds). Batches are as even as possible (4 -> 3 + 3) and hold a prompt's seeds side
    by side, so its rows share one prefill."""
    model, tok = llama
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"id": str(i), "instruction": f"Say thing {i} " * (i + 1), "input": "", "output": "x"}
            for i in range(3)
        ],
    )
    calls: dict[int, list] = {}
    real = generate.sample
    outputs = []
    for B in (1, 4, 6):

        def record(m, prompts, B=B, **kw):
            calls.setdefault(B, []).append(prompts)
            return real(m, prompts, **kw)

        monkeypatch.setattr(generate, "sample", record)
        cfg = EvalConfig(
            model="m", sets=[str(data)], seeds=[1, 2], batch_size=B, max_new_tokens=6, lm_loss=False,
            no_repeat_ngram_size=0,
        )  # fmt: skip
        protocol.evaluate_model(model, tok, cfg, tmp_path / f"b{B}", progress=False)
        rows = protocol.read_generations(tmp_path / f"b{B}" / protocol.GENERATIONS)
        outputs.append({k: r["output"] for k, r in rows.items()})
    assert outputs[0] == outputs[1] == outputs[2]
    assert len(set(outputs[0].values())) > 3, "answers should differ across prompts and seeds"
    assert {B: [len(c) for c in cs] for B, cs in calls.items()} == {1: [1] * 6, 4: [3, 3], 6: [6]}
    assert all(c[2 * i] == c[2 * i + 1] for c in calls[6] for i in range(3))  # a prompt's seeds adjacent


def test_a_set_left_empty_by_the_length_rule(llama, tmp_path, monkeypatch):
    model, tok = llama
    data = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "word " * 300, "input": "", "output": "x"}])
    monkeypatch.setattr(generate, "sample", lambda *a, **k: pytest.fail("sampled an empty set"))
    cfg = EvalConfig(model="m", sets=[str(data)], seeds=[1, 2], lm_loss=False, max_prompt_length=100)
    res = protocol.evaluate_model(model, tok, cfg, tmp_path / "out", progress=False)
    assert (res["sets"]["long"]["n_prompts"], res["sets"]["long"]["skipped_long"]) == (0, 1)


def test_results_record_the_display_name_not_its_folder_slug(llama, tmp_path, monkeypatch):
    # the comparison plan's ablations are named "MiniLLM w/o ...": results.json recorded the folder's slug
    # "MiniLLM_w_o_...", so `minillm report --ablations "MiniLLM w/o ..."` matched no model
    model, tok = llama
    data = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "word " * 300, "input": "", "output": "x"}])
    monkeypatch.setattr(generate, "sample", lambda *a, **k: pytest.fail("sampled an empty set"))
    kw = dict(model="runs/exp/m/best", sets=[str(data)], seeds=[1], lm_loss=False, max_prompt_length=100)
    cfg = EvalConfig(**kw, name="MiniLLM w/o length norm")
    res = protocol.evaluate_model(model, tok, cfg, tmp_path / protocol.slug(cfg.name), progress=False)
    assert res["name"] == "MiniLLM w/o length norm"
    assert (
        json.loads((tmp_path / "MiniLLM_w_o_length_norm" / "results.json").read_text())["name"] == res["name"]
    )
    unnamed = protocol.evaluate_model(
        model, tok, EvalConfig(**kw), tmp_path / "runs_exp_m_best", progress=False
    )
    assert unnamed["name"] == "runs_exp_m_best"  # no name given: the folder's, as before


def test_selfinst_242_flag_and_max_per_set(llama, tmp_path, monkeypatch):
    model, tok = llama
    data = write_jsonl(
        tmp_path / "si.jsonl",
        [
            {"id": str(i), "instruction": f"task {i}", "input": "", "output": "ok", "in_minillm_242": i != 1}
            for i in range(4)
        ],
    )
    monkeypatch.setattr(
        generate, "sample", lambda m, prompts, **kw: torch.tensor([[kw["eos_id"]]] * len(prompts))
    )
    kw = dict(model="m", sets=[str(data)], seeds=[1], lm_loss=False, max_prompt_length=100)
    for flag, limit, expected in ((False, None, 4), (True, None, 3), (True, 2, 2)):
        cfg = EvalConfig(**kw, selfinst_242=flag, max_per_set=limit)
        res = protocol.evaluate_model(model, tok, cfg, tmp_path / f"o{flag}{limit}", progress=False)
        assert res["sets"]["si"]["n_prompts"] == expected


def test_run_eval_resumes_exactly_and_reads_hf_sets(tiny_llama, tmp_path, monkeypatch):
    import datasets

    rows = [{"instruction": f"Name thing number {i}.", "input": "", "output": f"thing {i}"} for i in range(3)]
    data = write_jsonl(tmp_path / "user.jsonl", rows)
    hf_dir = tmp_path / "hfset"
    datasets.Dataset.from_list(rows[:2]).to_json(str(hf_dir / "train.jsonl"))
    cfg = EvalConfig(
        model=str(tiny_llama), sets=[str(data), f"hf:{hf_dir}:train"], seeds=[1, 2], batch_size=2,
        max_new_tokens=5, max_prompt_length=120, output_dir=str(tmp_path / "out"),
    )  # fmt: skip
    first = protocol.run_eval(cfg)
    out = tmp_path / "out" / protocol.slug(str(tiny_llama))
    gen = out / "generations.jsonl"
    lines = gen.read_text().splitlines()
    assert len(lines) == (3 + 2) * 2
    hf_name = protocol.slug(f"hf:{hf_dir}:train")
    assert first["sets"][hf_name]["n_prompts"] == 2 and first["sets"]["user"]["lm_loss"] > 0
    assert first["timing"]["generated_prompts"] == 10

    # kill mid-run: the last three lines are lost and a fourth is torn; the rerun regenerates only those batches
    gen.write_text("\n".join(lines[:-3]) + "\n" + lines[-3][:10])
    second = protocol.run_eval(cfg)
    assert sorted(gen.read_text().splitlines()) == sorted(lines)  # identical to the uninterrupted run
    assert second["sets"] == first["sets"]
    assert second["timing"]["generated_prompts"] < 10

    # a complete folder: nothing is generated again
    monkeypatch.setattr(generate, "sample", lambda *a, **k: pytest.fail("regenerated a finished batch"))
    assert protocol.run_eval(cfg)["sets"] == first["sets"]

    with pytest.raises(ConfigError, match="max_new_tokens: 5 -> 7"):
        protocol.run_eval(EvalConfig(**{**cfg.__dict__, "max_new_tokens": 7}))

    # generations from another sampler (a folder HF `generate` filled, before minillm.rollout) are not resumed
    settings = out / "settings.json"
    saved = settings.read_text()
    settings.write_text(json.dumps({k: v for k, v in json.loads(saved).items() if k != "sampler"}))
    with pytest.raises(ConfigError, match="sampler: None -> "):
        protocol.run_eval(cfg)
    settings.write_text(saved)

    # the report reads what run_eval wrote
    report = make_report([str(tmp_path / "out")], str(tmp_path / "report"), None).read_text()
    assert f"| model | user | {hf_name} | Avg |" in report
    assert (
        f"| {protocol.slug(str(tiny_llama))} | 0.00 ± 0.00 |" in report
        or protocol.slug(str(tiny_llama)) in report
    )


# ------------------------------------------------------------------------------------------------ exposure


@pytest.fixture(scope="module")
def student_path(tmp_path_factory, tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("student"), "llama", tokenizer, seed=1)


def test_step_kl_matches_slow_reference(llama, tiny_gpt2):
    # llama teacher, GPT-2 student (absolute positions: left padding must not shift them); row 1 is left-padded
    teacher, tok = llama
    student = models.load_model(str(tiny_gpt2))
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    eos = tok.eos_token_id
    responses = torch.tensor([[20, eos, eos, eos], [21, 22, 23, 24]])  # row 0 ends at step 2
    kl, reverse_kl, entropy, alive = step_kl(
        teacher, student, prompts, responses, eos_id=eos, pad_id=tok.pad_token_id
    )
    assert alive.tolist() == [[True, True, False, False], [True, True, True, True]]
    for n, p in enumerate(prompts):
        steps = int(alive[n].sum())
        ids = torch.tensor([p + responses[n, :steps].tolist()])  # unpadded, one sequence at a time
        lp, lq = teacher(input_ids=ids).logits[0], student(input_ids=ids).logits[0]  # [L, V]
        for t in range(steps):
            pos = len(p) - 1 + t  # the position whose logits predict response token t
            p_t, q_t = softmax_slow(lp[pos].tolist()), softmax_slow(lq[pos].tolist())
            assert kl[n, t].item() == pytest.approx(kl_slow(p_t, q_t), rel=1e-4, abs=1e-7)
            assert reverse_kl[n, t].item() == pytest.approx(kl_slow(q_t, p_t), rel=1e-4, abs=1e-7)
            assert entropy[n, t].item() == pytest.approx(
                -sum(x * math.log(x) for x in p_t if x > 0), rel=1e-4
            )
        assert all((x[n, steps:] == 0).all() for x in (kl, reverse_kl, entropy))


def test_exacc_err_zero_when_prefixes_come_from_the_teacher(llama, tiny_llama, student_path):
    teacher, tok = llama
    student = models.load_model(str(student_path))
    teacher_copy = models.load_model(str(tiny_llama))  # another object with the teacher's weights
    prompts = [tok(f"Question {i}: what is {i} plus {i}?")["input_ids"] for i in range(3)]
    kw = dict(
        samples=2, max_new_tokens=6, seed=10, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, batch_size=2
    )
    on_teacher = prompt_errors(teacher, teacher, student, prompts, **kw)
    eps = on_teacher.error.mean(0)
    R_teacher = prompt_errors(teacher_copy, teacher, student, prompts, **kw).error.mean(0)
    R_student = prompt_errors(student, teacher, student, prompts, **kw).error.mean(0)
    assert on_teacher.live[:, 0].all() and (on_teacher.entropy[:, 0] > 0).all()  # every prompt runs at step 1
    assert eps[-1] > 1e-3  # the two models do differ: a non-degenerate 0
    torch.testing.assert_close(ex_acc_err(R_teacher, eps), torch.zeros(6, dtype=torch.float64))
    assert (eps.diff() >= 0).all() and (R_student.diff() >= 0).all()  # accumulated errors never decrease
    # step 1 is conditioned on the prompt alone, whoever samples the prefix: R(1) = eps(1), ExAccErr(1) = 0
    assert R_student[0].item() == pytest.approx(eps[0].item(), rel=1e-5)
    assert (R_student[1:] != eps[1:]).any()


def test_run_exposure_student_equal_teacher_gives_zero(tiny_llama, tmp_path):
    data = write_jsonl(
        tmp_path / "p.jsonl", [{"instruction": f"Say {i}.", "input": "", "output": "x"} for i in range(3)]
    )
    cfg = ExposureConfig(
        student=str(tiny_llama), teacher=str(tiny_llama), data=str(data), max_prompts=3, samples_per_prompt=2,
        max_new_tokens=5, batch_size=2, output_dir=str(tmp_path / "exp"),
    )  # fmt: skip
    res = run_exposure(cfg)
    assert res["R"] == [0.0] * 5 and res["eps"] == [0.0] * 5 and res["exacc_err"] == [0.0] * 5
    # one model, one seed: the same prefixes on both sides, so the same prompts run and the teacher is as sure
    assert res["live_R"] == res["live_eps"] and res["teacher_entropy_R"] == res["teacher_entropy_eps"]
    assert res["live_R"][0] == 1.0 and res["step_error_R"][0] == 0.0 and res["reverse_kl_R"][0] == 0.0
    out = tmp_path / "exp" / protocol.slug(str(tiny_llama))
    assert json.loads((out / "exposure.json").read_text())["l"] == [1, 2, 3, 4, 5]
    assert (out / "exposure.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------------ calibration


def test_unni_yes_no_task_is_built_from_exact_yes_no_items():
    records, labels = build_task("unni-yesno")
    assert labels == ["No", "Yes"]
    assert len(records) == 396  # data/unni.jsonl: 268 outputs exactly "Yes", 128 exactly "No"
    assert sum(r["output"] == "Yes" for r in records) == 268


def test_label_logprobs_and_run_calibration(llama, tiny_llama, tmp_path):
    model, tok = llama
    recs = [
        {"instruction": "Is water wet?", "input": "", "output": "Yes"},
        {"instruction": "Is fire cold?", "input": "", "output": "No"},
        {"instruction": "Is two even?", "input": "really?", "output": "Yes"},
    ]
    lp = label_logprobs(model, tok, recs, ["No", "Yes"], template="alpaca", batch_size=2)
    for n, r in enumerate(recs):
        prompt = tok(build_prompt(r["instruction"], r["input"]), add_special_tokens=False)["input_ids"]
        for k, word in enumerate(["No", "Yes"]):
            w = tok(word, add_special_tokens=False)["input_ids"]
            logits = model(input_ids=torch.tensor([prompt + w])).logits[0].double().log_softmax(-1)
            ref = sum(logits[len(prompt) - 1 + i, w[i]].item() for i in range(len(w)))
            assert lp[n, k].item() == pytest.approx(ref, rel=1e-5)
    data = write_jsonl(tmp_path / "task.jsonl", recs)
    res = run_calibration(
        CalibrationConfig(model=str(tiny_llama), task=str(data), output_dir=str(tmp_path / "cal"))
    )
    probs = lp.softmax(-1)
    conf = probs.max(-1).values.tolist()
    correct = [int(i) == g for i, g in zip(probs.argmax(-1).tolist(), [1, 0, 1], strict=True)]
    from minillm.evaluate.metrics import ece

    assert res["ece"] == pytest.approx(ece(conf, correct, 10), abs=1e-6)
    assert res["gold_counts"] == {"No": 1, "Yes": 2}
    out = tmp_path / "cal" / protocol.slug(str(tiny_llama))
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ConfigError, match="exactly two values"):
        build_task(
            str(
                write_jsonl(
                    tmp_path / "three.jsonl", recs + [{"instruction": "?", "input": "", "output": "Maybe"}]
                )
            )
        )
