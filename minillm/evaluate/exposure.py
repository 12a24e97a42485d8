"""Exposure bias as ExAccErr (paper section 3.3 and appendix; Arora et al., 2022): `minillm eval-exposure`.

For a prompt x, teacher p and student q, the per-step error at step t of a response prefix y_<t is
KL(p(.|y_<t, x) || q(.|y_<t, x)) over the full vocabulary. Accumulated over the first l steps:

    R(l)   = sum_{t<=l} E_{y_<t ~ q}[ KL(p || q)(y_<t) ]    prefixes sampled by the student (free run)
    eps(l) = sum_{t<=l} E_{y_<t ~ p}[ KL(p || q)(y_<t) ]    prefixes sampled by the teacher (oracle context)
    ExAccErr(l) = (R(l) - eps(l)) / eps(l) x 100

eps(l) here is the paper's l*epsilon(l) (epsilon = the average per-step error on oracle prefixes), so this is
the paper's (R(l) - l*epsilon)/(l*epsilon) x 100% and the (R(l) - eps(l))/eps(l) x 100 of docs/design.md §3. The expectations
are estimated with `samples_per_prompt` ancestral samples per prompt (temperature 1, no top-k/top-p, no n-gram
ban: the definition samples from q and p themselves), then averaged over prompts. At step t a sample counts
only while alive (no EOS before t; the step that emits EOS counts); a prompt whose samples have all ended adds
nothing, so its accumulated error stays flat. Student and teacher samples of a batch share one seed.

Beside them the JSON gives, per step and per prefix source (suffix _R: the student's, _eps: the teacher's), what
explains a difference between R and eps: the share of prompts still running (`live`), their mean step error
(`step_error`) and the teacher's entropy on their prefixes (`teacher_entropy`). `reverse_kl` is the step's
KL(q || p) over them: on the student's prefixes, minus the expected MiniLLM reward log p(y_t) - log q(y_t) of the
token it samples there, so it shows where in an answer the student's writing pays most.

ExAccErr is 0 where R = eps = 0 (student = teacher: no error to accumulate, hence none in excess) and +inf
where eps = 0 < R; the JSON writes non-finite values as null.

Versus the official code (LMOps `minillm/evaluate_exposure_bias.py`): it scores steps 2..T (its logits slice
starts one position late) and we score 1..T; it divides by (alive count + 1e-3) and we by the alive count; it
samples with the evaluation decoding settings (no_repeat_ngram etc.), we ancestrally.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from minillm import models
from minillm.config import ExposureConfig
from minillm.data.instructions import load_records
from minillm.data.tokenize import collate_prompts, encode_prompt, position_ids
from minillm.environment import environment
from minillm.evaluate import generate
from minillm.evaluate.protocol import data_revision, device, json_safe, slug, write_json

RESULT = "exposure.json"
PLOT = "exposure.png"


# ------------------------------------------------------------------------------------------------
# the maths (pure)


def alive_mean(x: Tensor, alive: Tensor) -> Tensor:
    """Per prompt and step, x averaged over the samples still alive; 0 where none is.

    x:       [N, S, T] a per-step quantity of S sampled responses for each of N prompts (any value where dead)
    alive:   [N, S, T] bool, True where sample s is still running at step t
    returns: [N, T] fp64
    """
    N, S, T = x.shape
    assert alive.shape == (N, S, T) and alive.dtype == torch.bool
    live = alive.double()
    total = (x.double() * live).sum(1)  # [N, T]
    count = live.sum(1)  # [N, T]
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def accumulated_error(kl: Tensor, alive: Tensor) -> Tensor:
    """Per prompt, the step error averaged over alive samples, summed over steps 1..l.

    kl:      [N, S, T] per-step KL(p || q) of S sampled responses for each of N prompts (any value where dead)
    alive:   [N, S, T] bool, True where sample s is still running at step t
    returns: [N, T] fp64, out[n, l-1] = sum_{t<=l} (sum_s kl*alive) / (sum_s alive), a step with no alive
             sample adding 0
    """
    return alive_mean(kl, alive).cumsum(-1)


def ex_acc_err(R: Tensor, eps: Tensor) -> Tensor:
    """ExAccErr(l) = (R(l) - eps(l)) / eps(l) x 100, elementwise; 0 where both are 0, +inf where only eps is.

    R, eps:  [T] accumulated errors on student and teacher prefixes (already averaged over prompts)
    returns: [T] fp64
    """
    (T,) = R.shape
    assert eps.shape == (T,)
    R, eps = R.double(), eps.double()
    out = 100.0 * (R - eps) / eps.where(eps != 0, torch.ones_like(eps))
    out = torch.where(eps == 0, torch.where(R == 0, 0.0, torch.inf), out)
    return out


# ------------------------------------------------------------------------------------------------
# per-step KL on sampled prefixes


class PrefixStats(NamedTuple):
    """Per prompt, on prefixes sampled by one model. ExAccErr needs only `error`; the other two say why R and
    eps differ: a prompt adds error only while one of its samples runs, and the teacher's entropy shows how
    sure it is on those prefixes."""

    error: Tensor  # [N, T] fp64 accumulated error (accumulated_error)
    live: Tensor  # [N, T] bool, some sample of the prompt still running at step t
    entropy: Tensor  # [N, T] fp64 the teacher's entropy at step t over the alive samples (alive_mean)
    reverse_kl: Tensor  # [N, T] fp64 KL(q || p) at step t over the alive samples (alive_mean)


@torch.no_grad()
def step_kl(
    teacher: Any, student: Any, prompts: list[list[int]], responses: Tensor, *, eos_id: int, pad_id: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """KL(p || q), KL(q || p) and the teacher's entropy H(p) at every response step of left-padded prompt +
    response rows.

    prompts:   N token lists (the prompt of each row)
    responses: [N, T] long sampled ids, pad after the first EOS
    returns:   kl [N, T] fp32, reverse_kl [N, T] fp32, entropy [N, T] fp32 (all 0 where dead), alive [N, T] bool
    """
    N, T = responses.shape
    assert len(prompts) == N
    dev = next(teacher.parameters()).device
    batch = collate_prompts(prompts, pad_id)  # [N, P] each
    alive = generate.alive_mask(responses, eos_id)  # [N, T]
    input_ids = torch.cat([batch["input_ids"], responses], 1).to(dev)  # [N, P + T]
    mask = torch.cat([batch["attention_mask"], alive.long()], 1).to(dev)  # [N, P + T]
    pos = position_ids(mask)

    def logprobs(model: Any) -> Tensor:
        # the last T + 1 positions are P-1 .. P+T-1; position P-1+t predicts response token t (0-based)
        out = model(
            input_ids=input_ids, attention_mask=mask, position_ids=pos, logits_to_keep=T + 1, use_cache=False
        )
        return out.logits[:, :-1, : models.vocab_size(model)].float().log_softmax(-1)  # [N, T, V]

    logp = logprobs(teacher)
    logq = logprobs(student)
    p = logp.exp()
    kl = (p * (logp - logq)).sum(-1)  # [N, T]
    entropy = -(p * logp).sum(-1)  # [N, T]
    del p  # [N, T, V]: free it before q's
    reverse_kl = (logq.exp() * (logq - logp)).sum(-1)  # [N, T]
    dead = ~alive.to(dev)
    kl, reverse_kl, entropy = (x.masked_fill(dead, 0.0).cpu() for x in (kl, reverse_kl, entropy))
    return kl, reverse_kl, entropy, alive


def prompt_errors(
    prefix_model: Any,
    teacher: Any,
    student: Any,
    prompts: list[list[int]],
    *,
    samples: int,
    max_new_tokens: int,
    seed: int,
    eos_id: int,
    pad_id: int,
    batch_size: int,
    progress: Any = None,
) -> PrefixStats:
    """Accumulated error per prompt on prefixes sampled by `prefix_model`, with what explains it."""
    out = []
    for b in range(0, len(prompts), batch_size):
        part = prompts[b : b + batch_size]
        responses = generate.sample(
            prefix_model,
            part,
            seed=generate.stable_seed(seed, "exposure", b // batch_size),
            eos_id=eos_id,
            pad_id=pad_id,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=samples,
        )  # [len(part) * S, T']
        T = responses.shape[1]
        # generate stops once every row has ended, so each row of a short tensor holds an EOS: the padded steps
        # come after it and are dead
        responses = torch.nn.functional.pad(responses, (0, max_new_tokens - T), value=pad_id)  # [n*S, T]
        rows = [p for p in part for _ in range(samples)]
        # score at most batch_size rows at once: each model's logits are [rows, T, V]
        scored = [
            step_kl(
                teacher,
                student,
                rows[r : r + batch_size],
                responses[r : r + batch_size],
                eos_id=eos_id,
                pad_id=pad_id,
            )
            for r in range(0, len(rows), batch_size)
        ]
        shape = (len(part), samples, max_new_tokens)  # [n, S, T]
        kl, reverse_kl, entropy, alive = (torch.cat(x).view(shape) for x in zip(*scored, strict=True))
        out.append(
            PrefixStats(
                accumulated_error(kl, alive),
                alive.any(1),
                alive_mean(entropy, alive),
                alive_mean(reverse_kl, alive),
            )
        )
        if progress is not None:
            progress.update(1)
    return PrefixStats(*(torch.cat(x) for x in zip(*out, strict=True)))


def explain(stats: PrefixStats) -> dict[str, list[float]]:
    """Per step l, over the prompts still running: their share (`live`), their mean step error (`step_error`:
    R(l) - R(l-1) = live * step_error), the teacher's mean entropy (`teacher_entropy`) and the mean KL(q || p)
    (`reverse_kl`); NaN where none runs."""
    live = stats.live.double()  # [N, T]
    count = live.sum(0)  # [T]
    step = stats.error.diff(dim=-1, prepend=torch.zeros_like(stats.error[:, :1]))  # [N, T], 0 where not live
    return {
        "live": live.mean(0).tolist(),
        "step_error": (step.sum(0) / count).tolist(),
        "teacher_entropy": (stats.entropy.sum(0) / count).tolist(),
        "reverse_kl": (stats.reverse_kl.sum(0) / count).tolist(),
    }


# ------------------------------------------------------------------------------------------------
# the command


def plot_exposure(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(result["l"], result["R"], label="R(l): student prefixes")
    ax1.plot(result["l"], result["eps"], label="eps(l): teacher prefixes")
    ax1.set_xlabel("generation length l (tokens)")
    ax1.set_ylabel("accumulated KL(p || q)")
    ax1.legend()
    ys = [float("nan") if v is None else v for v in result["exacc_err"]]
    ax2.plot(result["l"], ys, color="C3")
    ax2.axhline(0, color="grey", lw=0.5)
    ax2.set_xlabel("generation length l (tokens)")
    ax2.set_ylabel("ExAccErr (%)")
    fig.suptitle(f"exposure bias: student {result['student']} vs teacher {result['teacher']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_exposure(cfg: ExposureConfig) -> dict:
    """`minillm eval-exposure`: R(l), eps(l) and ExAccErr(l), saved as exposure.json + exposure.png in
    output_dir/<student slug>/."""
    from tqdm.auto import tqdm

    dev = device()
    dtype = models.torch_dtype(cfg.dtype, dev)
    kw = dict(trust_remote_code=cfg.trust_remote_code)
    teacher = models.load_model(cfg.teacher, dtype=dtype, **kw).to(dev)
    student = models.load_model(cfg.student, dtype=dtype, **kw).to(dev)
    tokenizer = models.load_tokenizer(cfg.student, **kw)
    models.check_same_tokenizer(tokenizer, models.load_tokenizer(cfg.teacher, **kw), ("student", "teacher"))
    models.use_vocab(student, len(tokenizer))
    models.use_vocab(teacher, len(tokenizer))
    models.check_same_vocab(student, teacher)
    records = load_records(cfg.data, limit=cfg.max_prompts)
    prompts = [encode_prompt(r, tokenizer, cfg.template) for r in records]
    t0 = time.perf_counter()
    n_batches = -(-len(prompts) // cfg.batch_size)
    args = dict(
        samples=cfg.samples_per_prompt,
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        batch_size=cfg.batch_size,
    )
    with tqdm(total=2 * n_batches, desc="exposure", unit="batch") as bar:
        on_student = prompt_errors(student, teacher, student, prompts, progress=bar, **args)
        on_teacher = prompt_errors(teacher, teacher, student, prompts, progress=bar, **args)
    per_R, per_eps = on_student.error, on_teacher.error  # [N, T] each
    R, eps = per_R.mean(0), per_eps.mean(0)
    result = {
        "kind": "exposure",
        "name": cfg.name or slug(cfg.student),
        "student": cfg.student,
        "teacher": cfg.teacher,
        "config": dataclasses.asdict(cfg),
        "data_revision": data_revision(cfg.data),
        "n_prompts": len(prompts),
        "l": list(range(1, cfg.max_new_tokens + 1)),
        "R": R.tolist(),
        "eps": eps.tolist(),
        "exacc_err": ex_acc_err(R, eps).tolist(),
        "R_std": per_R.std(0).tolist() if len(prompts) > 1 else [0.0] * cfg.max_new_tokens,
        "eps_std": per_eps.std(0).tolist() if len(prompts) > 1 else [0.0] * cfg.max_new_tokens,
        **{f"{k}_R": v for k, v in explain(on_student).items()},
        **{f"{k}_eps": v for k, v in explain(on_teacher).items()},
        "seconds": time.perf_counter() - t0,
        "environment": environment(dev, dtype),
    }
    result = json_safe(result)
    out_dir = Path(cfg.output_dir) / slug(result["name"])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / RESULT, result)
    plot_exposure(result, out_dir / PLOT)
    print(
        json.dumps({k: result[k] for k in ("name", "n_prompts")} | {"exacc_err@end": result["exacc_err"][-1]})
    )
    return result
