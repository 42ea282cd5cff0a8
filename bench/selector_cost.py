"""What one selection costs, as a ratio to a plain inference forward of the same L samples.

Each repetition runs the plain forward and then every selector on the same large batch, one after
the other, so every ratio is taken side by side; the table gives the median over repetitions
(time) and the largest ratio seen (memory: peak RSS growth on CPU, peak allocation on GPU), and, for
scale, a training step on all of L the same way (forward and backward, accumulated in
micro-batches of ``--micro-batch``: what gradient accumulation over the large batch costs).

    python bench/selector_cost.py                               # SmolLM2-135M, L=64, length 128
    python bench/selector_cost.py --max-length 512 --reps 3
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

from colm_client import backward_micro_batches
from colm_server.data.collate import Batch
from colm_server.model.load import decoder_layers
from colm_server.select import SelectorConfig, build_selector
from gradmatch import DATA, plain_forward, workload
from measure import measure

# name -> SelectorConfig overrides; every one keeps the service's defaults otherwise.
SELECTORS: dict[str, dict] = {
    "colm (default: exact sketch, all layers)": dict(strategy="colm"),
    "colm-paper (zo K=1 on the last v_proj)": dict(strategy="colm-paper"),
    "colm-fast (proxy, first 2 layers + exit)": dict(strategy="colm-fast"),
    "proxy, first 4 layers + exit": dict(strategy="colm", scorer_layers=4),
    "proxy, first 8 layers + exit": dict(strategy="colm", scorer_layers=8),
}


def train_step(model, batch: Batch, micro_batch: int) -> None:
    """A trainer's step on all L samples, accumulated in micro-batches (the accumulation baseline)."""
    backward_micro_batches(model, batch.input_ids, batch.attention_mask, batch.labels,
                           torch.ones(len(batch), device=batch.input_ids.device), micro_batch=micro_batch)
    model.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2, a HF folder, a .gguf or tiny:<arch>")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--L", type=int, default=64)
    p.add_argument("--b", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8, help="micro-batch of the training step on L")
    p.add_argument("--reps", type=int, default=3, help="repetitions after one untimed warm-up")
    p.add_argument("--selectors", nargs="+", choices=list(SELECTORS), metavar="NAME")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results/selector-cost.md")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    start = time.perf_counter()

    collator, records, model = workload(args.model, args.data, args.max_length, args.device)
    names = args.selectors or list(SELECTORS)
    selectors = {n: build_selector(model, SelectorConfig(batch_size=args.b, large_batch_size=args.L,
                                                         **SELECTORS[n])) for n in names}
    counts: dict[str, int] = {}
    for r in records:
        counts[r["source"]] = counts.get(r["source"], 0) + 1
    for sel in selectors.values():
        sel.prime_sources(counts)

    rows = {n: ([], []) for n in ["training step on L (fwd + bwd)", *names]}
    for rep in range(args.reps + 1):
        batch = collator(records[rep * args.L:(rep + 1) * args.L]).to(device)
        with torch.inference_mode():
            _, fwd_s, fwd_mem = measure(partial(plain_forward, model, batch), device)
        calls = {"training step on L (fwd + bwd)": partial(train_step, model, batch, args.micro_batch),
                 **{n: partial(sel.select, batch, step=rep) for n, sel in selectors.items()}}
        for name, call in calls.items():
            _, secs, mem = measure(call, device)
            if rep:  # the first round warms up allocators and caches
                rows[name][0].append(secs / fwd_s)
                rows[name][1].append(mem / max(fwd_mem, 1))
                print(f"  rep {rep}: {name}: {secs:.1f} s = {secs / fwd_s:.2f}x forward ({fwd_s:.1f} s)",
                      flush=True)

    depth = len(decoder_layers(model))
    lines = [
        "# Cost of one selection",
        "",
        f"Command: `python bench/selector_cost.py {shlex.join(sys.argv[1:] if argv is None else argv)}`",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, {device.type}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f". Model: {args.model} ({depth} layers), LoRA r=8 on q,k,v,o. L={args.L}, b={args.b}, max length "
        f"{args.max_length}, {args.reps} repetitions after a warm-up. "
        f"Wall time {time.perf_counter() - start:.0f} s.",
        "",
        "Ratios to one plain inference forward of the same L samples on the full model (all logits), "
        "measured side by side in each repetition: time is the median, memory the largest (peak RSS "
        "growth on CPU, peak allocation on GPU).",
        "",
        "| what | time / forward | memory / forward |",
        "|---|---:|---:|",
    ]
    for name, (times, mems) in rows.items():
        lines.append(f"| {name} | {statistics.median(times):.2f} | {max(mems):.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
