"""How to cut a usable 6-layer student from SmolLM2-135M-Instruct: which layers to keep, and whether a short
"healing" pass on the pre-training sample (CE, or KD towards the teacher) before SFT pays for its time.

Every figure is the token-averaged response cross-entropy on the first `--valid` Dolly validation records
(nats/token; uniform guessing is ln 49152 = 10.8). Prints one table per phase.

    OMP_NUM_THREADS=2 .venv/bin/python bench/student_init.py layers
    OMP_NUM_THREADS=2 .venv/bin/python bench/student_init.py heal --layers 0,1,2,27,28,29 --heal none,ce,kd \
        --heal-steps 30 --sft-steps 40
"""

from __future__ import annotations

import argparse
import time

import torch

from minillm import models
from minillm.config import SFTConfig
from minillm.data.instructions import load_records
from minillm.data.pretrain import load_pt_blocks
from minillm.data.tokenize import collate, encode_records
from minillm.objectives.lm import ce_kd_sum
from minillm.train import engine
from minillm.train.heal import heal

CANDIDATES = [
    "0,5,10,15,20,25",
    "0,6,12,18,24,29",
    "0,1,2,27,28,29",
    "0,1,2,3,28,29",
    "0,1,26,27,28,29",
    "0,1,2,3,4,29",
    "0,2,4,25,27,29",
    "0,1,15,27,28,29",
    "0,1,2,3,4,5",
    "24,25,26,27,28,29",
]


def valid_loss(model: torch.nn.Module, examples: list, pad: int) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for part in engine.chunks(examples, 8):
            b = collate(part, pad)
            hidden = models.final_hidden(model, b["input_ids"], b["attention_mask"])
            rows = hidden[:, :-1][b["target_mask"][:, 1:]]
            targets = b["input_ids"][:, 1:][b["target_mask"][:, 1:]]
            total += float(ce_kd_sum(rows, targets, models.output_head(model), chunk_size=512))
            count += len(targets)
    return total / count


def sft_steps(student: torch.nn.Module, batches: list[dict[str, torch.Tensor]], lr: float) -> float:
    """AdamW (the stages' settings) over collated Dolly `batches`, CE on the responses; returns seconds."""
    opt = engine.make_optimizer(student, SFTConfig(lr=lr, warmup_steps=0))
    student.train()
    t0 = time.perf_counter()
    for b in batches:
        keep = b["target_mask"][:, 1:]
        rows = models.final_hidden(student, b["input_ids"], b["attention_mask"])[:, :-1][keep]
        targets = b["input_ids"][:, 1:][keep]
        loss = ce_kd_sum(rows, targets, models.output_head(student), chunk_size=256)
        (loss / len(targets)).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["layers", "heal"])
    p.add_argument("--valid", type=int, default=64, help="Dolly validation records scored.")
    p.add_argument("--layers", default=None, help="Layer sets, ';'-separated (heal: default the first).")
    p.add_argument("--heal", default="none,ce,kd", help="Healing variants: none, ce, kd (forward KL only).")
    p.add_argument("--heal-steps", type=int, default=30, help="Healing steps of 8 blocks of --block tokens.")
    p.add_argument("--heal-lr", type=float, default=5e-4)
    p.add_argument("--block", type=int, default=256, help="Tokens per pre-training block.")
    p.add_argument("--sft-steps", type=int, default=40, help="SFT steps of 8 Dolly records after healing.")
    p.add_argument("--sft-lr", type=float, default=5e-4)
    args = p.parse_args()

    teacher = models.load_model(models.EMBEDDED_ALIAS)
    tok = models.load_tokenizer(models.EMBEDDED_ALIAS)
    pad = tok.pad_token_id
    valid, _ = encode_records(
        load_records("dolly_valid", limit=args.valid),
        tok,
        template="alpaca",
        max_prompt_length=256,
        max_length=320,
    )
    print(f"teacher: valid loss {valid_loss(teacher, valid, pad):.3f} nats/token on {len(valid)} records")
    sets = (args.layers or ";".join(CANDIDATES)).split(";")
    if args.phase == "layers":
        print("| layers kept | valid loss before training |\n|---|---:|")
        for spec in sets:
            student = models.derive_student(teacher, [int(x) for x in spec.split(",")])
            print(f"| {spec} | {valid_loss(student, valid, pad):.2f} |", flush=True)
        return

    blocks = load_pt_blocks("pretrain", tok, args.block, max_blocks=8 * args.heal_steps)  # [N, block]
    train, _ = encode_records(
        load_records("dolly_train", limit=8 * args.sft_steps),
        tok,
        template="alpaca",
        max_prompt_length=256,
        max_length=320,
    )
    sft_batches = [collate(part, pad) for part in engine.chunks(train, 8)]
    print(
        f"heal: {args.heal_steps} steps x 8 x {args.block} tokens at lr {args.heal_lr}; "
        f"SFT: {len(sft_batches)} steps x 8 records at lr {args.sft_lr}"
    )
    print("| layers | heal | after heal | heal s | after SFT | SFT s |\n|---|---|---:|---:|---:|---:|")
    for spec in sets:
        for variant in args.heal.split(","):
            torch.manual_seed(0)
            student = models.derive_student(teacher, [int(x) for x in spec.split(",")])
            heal_s = 0.0
            if variant != "none":
                t0 = time.perf_counter()
                kd = 1.0 if variant == "kd" else 0.0
                heal(
                    student,
                    teacher,
                    blocks,
                    steps=args.heal_steps,
                    batch_size=8,
                    lr=args.heal_lr,
                    seed=10,
                    kd_ratio=kd,
                )
                heal_s = time.perf_counter() - t0
            healed = valid_loss(student, valid, pad)
            sft_s = sft_steps(student, sft_batches, args.sft_lr)
            print(
                f"| {spec} | {variant} | {healed:.2f} | {heal_s:.0f} | {valid_loss(student, valid, pad):.2f} "
                f"| {sft_s:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
