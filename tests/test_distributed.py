"""Two CPU processes (gloo), launched as docs/distributed.md says, train as one process does.

Each stage runs k optimizer steps under `accelerate launch --config_file configs/accelerate/cpu-2proc.yaml`
with batch_size b per process, and in this process with batch_size 2b: the same global batch. Per step the
loss and the gradient norm (of the DDP-averaged gradient, before clipping) must agree, and so must the
final weights (tolerances.DISTRIBUTED). A 2-process MiniLLM run killed with SIGKILL mid-collection must
resume to the weights of the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from conftest import kill_after_checkpoint, kill_tree, read_metrics, stage_config
from safetensors.torch import load_file
from tolerances import DISTRIBUTED
from transformers import AutoModelForCausalLM, AutoTokenizer

from minillm import config as config_lib
from minillm.config import GKDConfig, KDConfig, MiniLLMConfig, SeqKDConfig, SFTConfig
from minillm.data.instructions import load_records
from minillm.data.tokenize import collate_prompts, encode_prompt, length_groups
from minillm.rollout import sample_rollout
from minillm.train import engine
from minillm.train.gkd import train_gkd
from minillm.train.kd import train_kd
from minillm.train.minillm import train_minillm
from minillm.train.seqkd import read_cache, train_seqkd
from minillm.train.sft import train_sft

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIG = ROOT / "configs" / "accelerate" / "cpu-2proc.yaml"
TIMEOUT_S = 300  # a hang guard, generous for a loaded machine
EOS_ID = 0  # conftest's tokenizer: its only special token


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(stage: str, cfg: Any, entry: list[str] | None = None) -> subprocess.Popen:
    """`accelerate launch` of `minillm <stage>` on 2 CPU processes (`entry`: the script or module to run
    instead of `-m minillm.cli`, given the same arguments)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(ACCELERATE_CONFIG), "--main_process_port"]
    cmd += [str(free_port()), *(entry or ["-m", "minillm.cli"]), stage, *config_lib.to_argv(cfg)]
    # PYTHONFAULTHANDLER: SIGABRT prints every thread's stack (`finish`, on a hang)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONFAULTHANDLER": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(run: subprocess.Popen) -> None:
    """Wait for a launched run. One still alive after TIMEOUT_S fails, with every thread's Python stack of
    each of its processes in the message (faulthandler, on SIGABRT): a run that hangs, even after writing
    all it should, is a bug (the deadlock at exit that `engine.end_process_group` avoids was one)."""
    try:
        _, err = run.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        procs = [psutil.Process(run.pid), *psutil.Process(run.pid).children(recursive=True)]
        for p in reversed(procs):  # workers first: the launcher would kill them on its own way out
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGABRT)
        psutil.wait_procs(procs, timeout=10)
        kill_tree(run)
        _, err = run.communicate()
        raise AssertionError(f"still running after {TIMEOUT_S} s; stacks:\n{err.decode()[-12000:]}") from None
    assert run.returncode == 0, err.decode()[-3000:]


def final_weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    """A checkpoint's weights: the model's, or a LoRA run's adapters (its checkpoints hold only those)."""
    ckpt = out / f"ckpt-{step}"
    adapters = ckpt / "adapter_model.safetensors"
    return load_file(adapters if adapters.is_file() else ckpt / "model.safetensors")


def assert_same_run(two: Path, one: Path, steps: int) -> None:
    """Per-step loss and gradient norm, then every weight, within tolerances.DISTRIBUTED."""
    tol = DISTRIBUTED
    got = {m["step"]: m for m in read_metrics(two)}
    want = {m["step"]: m for m in read_metrics(one)}
    assert sorted(got) == sorted(want) and steps in got, (sorted(got), sorted(want))
    for step in range(1, steps + 1):
        for key in ("loss", "grad_norm"):
            assert got[step][key] == pytest.approx(want[step][key], rel=tol["metric_rtol"]), (step, key)
    a, b = final_weights(two, steps), final_weights(one, steps)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(
            a[name], b[name], rtol=tol["weight_rtol"], atol=tol["weight_atol"], msg=name
        )


def supervised_configs(cls: type, model: Path, tmp: Path, **kw: Any) -> tuple[Any, Any]:
    """(2-process config with batch_size 2, 1-process config with batch_size 4): 8 examples per step."""
    two = stage_config(
        cls,
        model,
        tmp / "two",
        max_train_examples=24,
        max_valid_examples=4,
        batch_size=2,
        grad_accum=2,
        max_steps=3,
        eval_every=0,
        lr=1e-2,
        warmup_steps=0,
        max_prompt_length=160,
        max_length=192,
        **kw,
    )
    return two, replace(two, output_dir=str(tmp / "one"), batch_size=4)


@pytest.fixture(scope="module")
def eos_pair(tiny_llama, teacher, tmp_path_factory) -> tuple[Path, Path]:
    """tiny_llama and teacher with their EOS head row scaled 20x: EOS is near-certain after some contexts
    and near-impossible after others, so sampled responses end at ragged lengths."""
    out = []
    for name, path in (("student", tiny_llama), ("teacher", teacher)):
        model = AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            model.get_output_embeddings().weight[EOS_ID] *= 20.0
        dest = tmp_path_factory.mktemp(f"eos-{name}")
        model.save_pretrained(dest)
        AutoTokenizer.from_pretrained(path).save_pretrained(dest)
        out.append(dest)
    return out[0], out[1]


@pytest.fixture(scope="module")
def supervised_runs(tiny_llama, teacher, eos_pair, tmp_path_factory) -> dict[str, tuple]:
    """stage -> (its 2-process run, launched, and the 2- and 1-process configs), for SFT, KD, SeqKD (6
    teacher generation batches in 3 rounds of one per rank, a cache of its own per run) and GKD (every step
    on-policy, ragged responses). All are launched at once: start-up is most of their cost."""
    root = tmp_path_factory.mktemp("supervised")
    student, eos_teacher = eos_pair
    configs = {
        "sft": supervised_configs(SFTConfig, tiny_llama, root / "sft"),
        "kd": supervised_configs(KDConfig, tiny_llama, root / "kd", teacher=str(teacher)),
        "seqkd": supervised_configs(
            SeqKDConfig,
            tiny_llama,
            root / "seqkd",
            teacher=str(teacher),
            teacher_data_cache=str(root / "seqkd" / "cache-two"),
            sample_batch_size=4,
            max_new_tokens=8,
        ),
        "gkd": supervised_configs(
            GKDConfig, student, root / "gkd", teacher=str(eos_teacher), lmbda=1.0, max_new_tokens=8
        ),
    }
    two, one = configs["seqkd"]
    configs["seqkd"] = (two, replace(one, teacher_data_cache=str(root / "seqkd" / "cache-one")))
    runs = {stage: launch_two(stage, two) for stage, (two, _) in configs.items()}
    yield {stage: (runs[stage], *configs[stage]) for stage in configs}
    for run in runs.values():
        if run.poll() is None:
            kill_tree(run)


@pytest.mark.parametrize(
    "stage, train", [("sft", train_sft), ("kd", train_kd), ("seqkd", train_seqkd), ("gkd", train_gkd)]
)
def test_two_processes_equal_one(supervised_runs, stage, train):
    run, two, one = supervised_runs[stage]
    train(one)
    finish(run)
    assert_same_run(Path(two.output_dir), Path(one.output_dir), 3)
    if stage == "seqkd":  # the teacher answered every prompt as in one process
        caches = [read_cache(next(Path(c.teacher_data_cache).glob("*/responses.jsonl"))) for c in (two, one)]
        assert len(caches[0]) == 21 and caches[0] == caches[1]  # 3 of 24 prompts are too long


def ragged_prompts(path: Path) -> Path:
    """16 instructions, short or long at random: a micro-batch of 2 is one length group (two alike) or two,
    so the ranks' micro-batches of one step often differ in their number of groups."""
    g = torch.Generator().manual_seed(0)
    with open(path, "w") as fh:
        for _ in range(16):
            words = " yes" * (28 if bool(torch.rand((), generator=g) < 0.5) else 1)  # ~150 or ~100 tokens
            fh.write(json.dumps({"instruction": f"Say{words}.", "input": "", "output": "yes"}) + "\n")
    return path


def group_counts(cfg: MiniLLMConfig, collection: int) -> list[list[int]]:
    """Per rank of 2, the number of length groups of each of its micro-batches' prompts in `collection`
    (response_rows' forwards without the single-forward rule), as train_minillm picks them."""
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    prompts = [encode_prompt(r, tokenizer, cfg.template) for r in load_records(cfg.train_data)]
    assert max(map(len, prompts)) <= cfg.max_prompt_length  # none dropped: train_minillm's prompt list
    idx = engine.step_indices(len(prompts), cfg.num_rollouts, cfg.seed, collection)
    lengths = [[len(prompts[i]) for i in idx[rank::2]] for rank in range(2)]
    b = cfg.batch_size
    return [[len(length_groups(x[j : j + b])) for j in range(0, len(x), b)] for x in lengths]


def minillm_config(student: Path, teacher: Path, data: Path, out: Path) -> MiniLLMConfig:
    """A 2-process MiniLLM run of 4 steps on `data` (`ragged_prompts`): teacher mixing, 2 inner epochs of
    one mini-batch each (num_rollouts = the processes' batch_size x grad_accum), 2 collections, the PT
    loss, a checkpoint at step 3. One process takes it with batch_size 4."""
    return stage_config(
        MiniLLMConfig,
        student,
        out,
        teacher=str(teacher),
        train_data=str(data),
        valid_data=str(data),
        max_valid_examples=4,
        num_rollouts=8,
        batch_size=2,
        grad_accum=2,
        ppo_epochs=2,
        max_steps=4,
        max_new_tokens=8,
        valid_max_new_tokens=4,
        pt_loss="ce+kd",
        pt_block_length=32,
        teacher_mix_alpha=0.2,
        eval_every=0,
        save_every=3,
        lr=1e-2,
        warmup_steps=0,
        max_prompt_length=160,
        max_length=192,
        chunk_size=16,
    )


def test_minillm_two_processes_equal_one_and_resume(eos_pair, tmp_path):
    """Teacher mixing on, ragged responses and length groups across ranks, 2 inner epochs of one
    mini-batch each (num_rollouts = the processes' batch_size x grad_accum), 2 collections, the PT loss;
    and a 2-process run killed mid-collection (step 3 of 4; collections start at steps 0 and 2) resumes to
    the same weights."""
    student, teacher = eos_pair
    data = ragged_prompts(tmp_path / "prompts.jsonl")
    two = minillm_config(student, teacher, data, tmp_path / "two")
    counts = [group_counts(two, c) for c in (0, 1)]
    assert any(c[0] != c[1] for c in counts), f"every micro-batch pair has as many groups: {counts}"
    killed = replace(two, output_dir=str(tmp_path / "killed"))
    runs = [launch_two("distill", two), launch_two("distill", killed)]
    try:
        kill_after_checkpoint(runs[1], tmp_path / "killed", 3, TIMEOUT_S)
        latest = json.loads((tmp_path / "killed" / "latest.json").read_text())["checkpoint"]
        assert len(list((tmp_path / "killed" / latest).glob("extra-rank*.safetensors"))) == 2, latest
        runs[1] = launch_two("distill", replace(killed, resume=True))
        train_minillm(replace(two, output_dir=str(tmp_path / "one"), batch_size=4))
    except BaseException:
        for run in runs:
            kill_tree(run)
        raise
    finish(runs[0])
    finish(runs[1])
    assert_same_run(tmp_path / "two", tmp_path / "one", 4)
    lengths = [[m["length"] for m in read_metrics(tmp_path / run)[1:]] for run in ("two", "one")]
    assert lengths[0] != lengths[1], f"rank 0's responses are as long as everyone's: {lengths}"
    a, b = final_weights(tmp_path / "killed", 4), final_weights(tmp_path / "two", 4)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0.0, atol=0.0, msg=name)


def test_process_group_outlives_the_stage(tiny_llama, tmp_path):
    """A stage's end (`MetricsLog.close`) leaves the process group alive; the CLI destroys it once the stage
    has returned (`engine.end_process_group`), so that DDP's reducer is never the group's last holder: freed
    with the GIL held, it deadlocked against gloo's worker threads (docs/distributed.md)."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        cfg = stage_config(SFTConfig, tiny_llama, tmp_path)
        engine.MetricsLog(engine.make_accelerator(cfg), cfg, total=1, start=0).close()
        assert torch.distributed.is_initialized()
    finally:
        engine.end_process_group()
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "eager"])
def test_row_generators_sample_the_same_responses_in_any_batch(eos_pair, fast):
    """With one generator per row, a prompt's response does not depend on the prompts beside it: 6 prompts
    of ragged lengths in one batch, and in batches of 2 in another order, give the same rollouts (the
    property the 2-process tests rely on), teacher mixing on."""
    student, teacher = (AutoModelForCausalLM.from_pretrained(p) for p in eos_pair)
    g = torch.Generator().manual_seed(2)  # prompts whose responses end at 6, 3 and 16 (cut) tokens
    prompts = [torch.randint(1, 384, (int(n),), generator=g).tolist() for n in (3, 9, 5, 12, 4, 7)]

    def sample(rows: list[int]) -> Any:
        enc = collate_prompts([prompts[i] for i in rows], pad_id=EOS_ID)
        return sample_rollout(
            student,
            teacher,
            enc["input_ids"],
            enc["attention_mask"],
            alpha=0.2,
            max_new_tokens=16,
            eos_token_id=EOS_ID,
            pad_token_id=EOS_ID,
            generator=[engine.generator(0, i, device="cpu") for i in rows],
            fast=fast,
        )

    whole = sample(list(range(6)))
    assert len(set(whole.mask.sum(-1).tolist())) > 1  # ragged lengths
    for rows in ([4, 1], [5, 0], [3, 2]):
        part = sample(rows)
        T = part.mask.shape[1]
        for k, i in enumerate(rows):
            assert torch.equal(part.mask[k], whole.mask[i, :T]) and not whole.mask[i, T:].any()
            valid = part.mask[k]
            assert torch.equal(part.response_ids[k][valid], whole.response_ids[i, :T][valid])
            for f in ("logq_old", "logp", "log_w"):
                torch.testing.assert_close(getattr(part, f)[k][valid], getattr(whole, f)[i, :T][valid])
