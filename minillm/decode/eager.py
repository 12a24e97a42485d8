"""The eager reference sampler: HF DynamicCache, 2D attention masks grown by `cat`, full-vocabulary sort for
top-p, lists of per-step columns. The obvious code, that the fast path (`fast.py`) must match."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from minillm.decode.cache import prefill, with_cache
from minillm.decode.draw import (
    Generators,
    Sampling,
    ban_reference,
    check_ban,
    draw,
    log_mix,
    mix_probs,
    warp_reference,
)
from minillm.models import vocab_size


def decode_eager(model: nn.Module, ids: Tensor, attn: Tensor, pos: Tensor, cache: DynamicCache) -> Tensor:
    """One cached step: ids [B, 1] at positions pos [B, 1], attn [B, K] 0/1 over cache + ids → [B, V] fp32."""
    out = model(
        input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **with_cache(model, cache)
    )
    return out.logits[:, -1, : vocab_size(model)].float()


def sample_eager(
    student: nn.Module,
    teacher: nn.Module | None,
    input_ids: Tensor,
    prompt_mask: Tensor,
    max_new_tokens: int,
    s: Sampling,
    generator: Generators,
    logits_out: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Reference loop; returns response_ids, mask, logq, logp, log p̃, each [B, T]."""
    B = input_ids.shape[0]
    run_teacher = s.alpha > 0.0
    attn = prompt_mask.long()
    s_cache = DynamicCache(config=student.config)
    s_logits = prefill(student, input_ids, attn, s_cache)
    if run_teacher:
        t_cache = DynamicCache(config=teacher.config)
        t_logits = prefill(teacher, input_ids, attn, t_cache)
    pos = attn.sum(-1, keepdim=True)  # [B, 1] position of the first response token
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    rows = [row[keep].tolist() for row, keep in zip(input_ids, prompt_mask, strict=True)]  # unpadded
    ids, masks, logqs, logps, logmixes = [], [], [], [], []
    for t in range(max_new_tokens):
        if logits_out is not None:
            logits_out[:, t] = s_logits
        logq = s_logits.log_softmax(-1)  # [B, V] raw student
        logp = t_logits.log_softmax(-1) if run_teacher else None
        s_in, t_in = s_logits, t_logits if run_teacher else None
        if s.ngram:  # the ban comes first, as in HF's generate (logits processors before warpers)
            banned = ban_reference(rows, s.ngram, s_logits.shape[-1]).to(s_logits.device)
            banned[finished] = False
            check_ban(banned)
            s_in = s_in.masked_fill(banned, -math.inf)
            t_in = t_in.masked_fill(banned, -math.inf) if run_teacher else None
        logq_s = warp_reference(s_in, s.temperature, s.top_k, s.top_p)
        logp_s = warp_reference(t_in, s.temperature, s.top_k, s.top_p) if run_teacher else None
        tok = draw(mix_probs(logp_s, logq_s, s.alpha), generator)  # [B]

        alive = ~finished
        pick = tok[:, None]
        lq = logq.gather(-1, pick).squeeze(-1)
        lmix = log_mix(
            logp_s.gather(-1, pick).squeeze(-1) if run_teacher else lq,
            logq_s.gather(-1, pick).squeeze(-1),
            s.alpha,
        )
        lp = logp.gather(-1, pick).squeeze(-1) if run_teacher else torch.zeros_like(lq)
        ids.append(torch.where(alive, tok, s.pad))
        for row, x in zip(rows, ids[-1].tolist(), strict=True):
            row.append(x)
        masks.append(alive)
        logqs.append(lq.masked_fill(finished, 0.0))
        logps.append(lp.masked_fill(finished, 0.0))
        logmixes.append(lmix.masked_fill(finished, 0.0))
        finished = finished | (tok == s.eos)
        if bool(finished.all()) or t == max_new_tokens - 1:
            break

        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        nxt = ids[-1][:, None]  # [B, 1]
        s_logits = decode_eager(student, nxt, attn, pos, s_cache)
        if run_teacher:
            t_logits = decode_eager(teacher, nxt, attn, pos, t_cache)
        pos = pos + 1
    stack = torch.stack
    return stack(ids, 1), stack(masks, 1), stack(logqs, 1), stack(logps, 1), stack(logmixes, 1)
