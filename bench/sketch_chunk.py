"""What does the default selection cost for each ``sketch_chunk``, next to a plain forward of L?

The whole-adapter sketch runs one forward and one backward per chunk of samples; the backward
keeps one chunk's activations, so its peak memory grows with the chunk, while small chunks use
the hardware less well. The sketch itself does not depend on the chunk (tests/test_sketches.py).
For every measured large batch, one plain inference forward of the L samples (all logits) and
one default selection per chunk size run side by side, in an order that rotates from batch to
batch; time and peak memory are reported as ratios to that forward, with their spread.

    python bench/sketch_chunk.py                          # SmolLM2-135M-Instruct, L=64, b=32
    python bench/sketch_chunk.py --chunks 4 8 16 --batches 6
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from functools import partial
from pathlib import Path

import torch

from colm_server.data.collate import Batch, Collator
from colm_server.model.load import attach_lora, load_model, load_tokenizer
from colm_server.select import SelectorConfig, build_selector
from gradmatch import add_workload_arguments, read_records
from measure import measure


def plain_forward(model, batch: Batch):
    """A trainer's inference forward of the large batch: all layers, all logits."""
    with torch.inference_mode():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / max(n - 1, 1))
    return mean, sd / math.sqrt(n)


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# Cost of the default sketch by chunk size", "",
             f"Command: `{meta['command']}`", "",
             f"Machine: {meta['machine']}. Model: {meta['model']}, LoRA r=8, alpha=16 on q,k,v,o. "
             f"L={meta['L']}, b={meta['b']}, max length {meta['max_length']}; {meta['batches']} "
             f"measured large batches after one warm-up. Wall time {meta['wall']:.0f} s.", "",
             "Ratios to one plain inference forward of the same L samples (all logits) run beside "
             "each selection on the same batch; mean ± standard error over the batches. Memory: "
             "peak RSS growth on CPU, peak allocation on GPU. A forward of L takes "
             f"{meta['forward_s']:.2f} s and adds {meta['forward_mib']:.0f} MiB here.", "",
             "| sketch_chunk | time / fwd | mem / fwd | seconds | peak MiB |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['chunk']} | {r['time'][0]:.2f} ± {r['time'][1]:.2f} | "
                     f"{r['mem'][0]:.2f} ± {r['mem'][1]:.2f} | {r['seconds']:.2f} | {r['mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(p)
    p.add_argument("--chunks", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results/sketch-chunk.md")
    args = p.parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.model)
    collator = Collator(tokenizer, max_length=args.max_length,
                        chat_template=getattr(tokenizer, "chat_template", None) is not None)
    rows = read_records(args.data, args.seed)
    model = attach_lora(load_model(args.model, device=args.device), r=8, alpha=16,
                        targets=["q_proj", "k_proj", "v_proj", "o_proj"]).to(args.device).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    batches = [collator(rows[i * args.L:(i + 1) * args.L]).to(args.device)
               for i in range(1 + args.batches)]
    selectors = {c: build_selector(model, SelectorConfig(batch_size=args.b, large_batch_size=args.L,
                                                         seed=args.seed, sketch_chunk=c))
                 for c in args.chunks}
    for sel in selectors.values():  # warm-up: first-call allocations and caches
        sel.select(batches[0], step=0)
    plain_forward(model, batches[0])

    time_ratio = {c: [] for c in args.chunks}
    mem_ratio = {c: [] for c in args.chunks}
    seconds = {c: [] for c in args.chunks}
    peak = {c: [] for c in args.chunks}
    fwd_s, fwd_mem = [], []
    for i, batch in enumerate(batches[1:], start=1):
        _, f_s, f_mem = measure(partial(plain_forward, model, batch), args.device)
        fwd_s.append(f_s)
        fwd_mem.append(f_mem)
        order = args.chunks[i % len(args.chunks):] + args.chunks[:i % len(args.chunks)]
        for c in order:
            _, secs, mem = measure(partial(selectors[c].select, batch, step=i), args.device)
            time_ratio[c].append(secs / f_s)
            mem_ratio[c].append(mem / max(f_mem, 1))
            seconds[c].append(secs)
            peak[c].append(mem / 2**20)
        print(f"batch {i}/{args.batches}: forward {f_s:.2f}s {f_mem / 2**20:.0f} MiB; "
              + ", ".join(f"chunk {c}: {time_ratio[c][-1]:.2f}x time, {mem_ratio[c][-1]:.2f}x mem"
                          for c in args.chunks), flush=True)

    out = [{"chunk": c, "time": mean_se(time_ratio[c]), "mem": mean_se(mem_ratio[c]),
            "seconds": sum(seconds[c]) / len(seconds[c]), "mib": sum(peak[c]) / len(peak[c])}
           for c in args.chunks]
    meta = {
        "command": "python bench/sketch_chunk.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {args.device}"
                   + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""),
        "model": args.model, "L": args.L, "b": args.b, "max_length": args.max_length,
        "batches": args.batches, "wall": time.perf_counter() - start,
        "forward_s": sum(fwd_s) / len(fwd_s), "forward_mib": sum(fwd_mem) / len(fwd_mem) / 2**20,
    }
    text = markdown(out, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": out}, indent=1))
    print(text)
    return out


if __name__ == "__main__":
    main()
