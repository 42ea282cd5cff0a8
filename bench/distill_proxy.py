"""Make a smaller model of the same tokenizer to score with (`selector.scorer_model`).

The student is the model's first ``--layers`` decoder layers with its final norm and lm_head, and
every one of its weights is trained to match the whole model's next-token distribution (KL on
every token position) on records the gradient-matching benchmark does not use (from ``--skip`` on,
in its shuffled order). The folder it writes (weights and tokenizer) loads wherever a model source
is read, so the selector can score with it and train its own LoRA on it:

    python bench/distill_proxy.py --layers 2 --steps 300 --out /tmp/proxy-k2
    python bench/gradmatch.py --scorer-model /tmp/proxy-k2 ...
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from colm_server.data.collate import Collator
from colm_server.model.load import load_model, load_tokenizer
from gradmatch import DATA, read_records


def kl_per_position(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions of ``mask`` of KL(teacher || student) of the next-token distributions."""
    t = F.log_softmax(teacher_logits[mask].float(), dim=-1)
    s = F.log_softmax(student_logits[mask].float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the response tokens (what the selector's scores are made of)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="the trained model: smollm2, a HF folder or a .gguf")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--layers", type=int, default=2, help="decoder layers the student keeps")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--skip", type=int, default=2000,
                   help="records of the shuffled data left to the benchmarks (gradmatch uses ~1100)")
    p.add_argument("--seed", type=int, default=0, help="the shuffle gradmatch uses with the same --seed")
    p.add_argument("--out", type=Path, required=True, help="folder to write the student to")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    tokenizer = load_tokenizer(args.model)
    collator = Collator(tokenizer, max_length=args.max_length,
                        chat_template=getattr(tokenizer, "chat_template", None) is not None)
    records = read_records(args.data, args.seed)[args.skip:]
    if len(records) < args.steps * args.batch:
        raise SystemExit(f"--steps {args.steps} x --batch {args.batch} needs {args.steps * args.batch} "
                         f"records after --skip {args.skip}; the data has {len(records)}")
    teacher = load_model(args.model).eval()
    student = load_model(args.model, num_layers=args.layers).train()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    log = []
    for step in range(args.steps):
        batch = collator(records[step * args.batch:(step + 1) * args.batch])
        mask = batch.attention_mask.bool()
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        kl = kl_per_position(teacher_logits, logits, mask)
        optimizer.zero_grad(set_to_none=True)
        kl.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % 10 == 0 or step == args.steps - 1:
            with torch.no_grad():
                row = {"step": step, "kl": float(kl),
                       "student_ce": float(response_loss(logits, batch.labels)),
                       "teacher_ce": float(response_loss(teacher_logits, batch.labels))}
            log.append(row)
            print(f"step {step}: KL {row['kl']:.3f}, response CE student {row['student_ce']:.3f} "
                  f"(whole model {row['teacher_ce']:.3f})", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    student.eval().save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "log": log,
               "seconds": time.perf_counter() - start}
    (args.out / "distill.json").write_text(json.dumps(summary, indent=1))
    print(f"written to {args.out} in {summary['seconds']:.0f} s")
    return summary


if __name__ == "__main__":
    main()
