"""Why an early-exit proxy does or does not select well: its gradients against the model's own.

For a few large batches at the zero-initialised adapter (B = 0, where the whole model's sketch is
needed most), it compares, sample by sample, the exact LoRA gradients of the first k layers as the
early-exit proxy computes them (loss read by the final norm and lm_head right after layer k) with
the same layers' exact gradients in the whole model (the loss after all layers). It separates the
two things a proxy changes: **which coordinates** (the first k layers only; the ``bottom k of g``
rows: the model's true gradients of those layers) and **which backward signal** (the exit head's
instead of the upper layers'; the ``proxy`` rows). For each it gives the per-sample cosine to the
true gradients of the same layers, the correlation of pairwise distances with the whole adapter's
gradients, and the coreset's gradient-matching error (euclidean facility location per source, as
`gradmatch.py` scores it) against stratified.

    python bench/proxy_signal.py                  # SmolLM2-135M, L=64, b=32, 4 batches
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from colm_server.model.load import decoder_layers
from colm_server.select import SelectorConfig, build_selector
from colm_server.select.budget import allocate_budget
from colm_server.select.metrics import GramMatching, adapter_grads, adapter_targets
from colm_server.select.selector import group_rows
from gradmatch import DATA, drawn_errors, fl_selection, workload


def distance_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of the pairwise euclidean distances of the rows of ``a`` and of ``b``."""
    iu = torch.triu_indices(len(a), len(a), 1)
    da = torch.cdist(a.double(), a.double())[iu[0], iu[1]]
    db = torch.cdist(b.double(), b.double())[iu[0], iu[1]]
    return float(torch.corrcoef(torch.stack([da, db]))[0, 1])


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1).mean())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--L", type=int, default=64)
    p.add_argument("--b", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8], help="exit depths k")
    p.add_argument("--draws", type=int, default=50)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results/proxy-signal.md")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    start = time.perf_counter()
    collator, records, model = workload(args.model, args.data, args.max_length)
    counts = dict(Counter(r["source"] for r in records))
    depth = len(decoder_layers(model))
    sizes = [t.numel for t in adapter_targets(model)]
    per_layer = len(sizes) // depth  # LoRA matrices per layer, bottom layer first
    cfg = SelectorConfig(batch_size=args.b, large_batch_size=args.L)
    stratified = build_selector(None, SelectorConfig(strategy="stratified", batch_size=args.b,
                                                     large_batch_size=args.L))
    stratified.prime_sources(counts)

    rows: dict[str, dict[str, list[float]]] = {}

    def add(name: str, **values: float) -> None:
        for key, v in values.items():
            rows.setdefault(name, {}).setdefault(key, []).append(v)

    for t in range(args.batches):
        batch = collator(records[t * args.L:(t + 1) * args.L])
        g = adapter_grads(model, batch, args.micro)
        err = GramMatching(g)
        small = {s for s, st in stratified.select(batch, step=t).stats["sources"].items() if st["small"]}
        groups = group_rows(batch.sources)
        alloc = allocate_budget({s: len(r) for s, r in groups.items()}, args.b, small)
        (strat, _), = drawn_errors("stratified", cfg, groups, alloc, small, [err], args.draws, seed=t * 1_009)
        ref = err(*fl_selection(g, groups, alloc, small))
        add("stratified (mean of draws)", err=strat)
        add("reference: fl on all of g", err=ref, dist_corr=1.0, cosine=1.0)
        for k in args.layers:
            bottom = g[:, :sum(sizes[:k * per_layer])]
            add(f"bottom {k} layers of g (true gradients)",
                err=err(*fl_selection(bottom, groups, alloc, small)),
                dist_corr=distance_correlation(bottom, g), cosine=1.0)
            proxy = adapter_grads(model, batch, args.micro, exit_after=k)
            add(f"proxy: first {k} layers + exit", err=err(*fl_selection(proxy, groups, alloc, small)),
                dist_corr=distance_correlation(proxy, g), cosine=mean_cosine(proxy, bottom))
        done = ", ".join(f"{n} {v['err'][-1]:.3f}" for n, v in rows.items())
        print(f"batch {t + 1}/{args.batches}: {done}", flush=True)

    base = rows["stratified (mean of draws)"]["err"]
    ref = rows["reference: fl on all of g"]["err"]
    lines = ["# Early-exit proxy: its gradients against the model's own", "",
             f"Command: `python bench/proxy_signal.py {shlex.join(sys.argv[1:] if argv is None else argv)}`",
             "",
             f"Machine: {platform.machine()}, {torch.get_num_threads()} threads. Model: {args.model} "
             f"({depth} layers), zero-initialised LoRA r=8, alpha=16 on q,k,v,o. L={args.L}, b={args.b}, "
             f"max length {args.max_length}, {args.batches} batches of the math mixture. "
             f"Wall time {time.perf_counter() - start:.0f} s.",
             "",
             "err: the coreset's gradient-matching error against all LoRA gradients (as gradmatch.py), with "
             "euclidean facility location per source on the row's features; vs strat: paired mean "
             "difference to stratified (mean of draws) ± SE over batches; closed: share of the stratified → "
             "reference gap closed. dist corr: correlation of the features' pairwise distances with those "
             "of all LoRA gradients. cosine: mean per-sample cosine between the proxy's gradients of its k "
             "layers and the true gradients of the same layers.", "",
             "| features | err | vs strat | closed | dist corr | cosine |", "|---|---:|---:|---:|---:|---:|"]
    gap = statistics.fmean(base) - statistics.fmean(ref)
    for name, v in rows.items():
        d = [a - b for a, b in zip(v["err"], base)]
        se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
        closed = (statistics.fmean(base) - statistics.fmean(v["err"])) / gap if gap else float("nan")
        dc = f"{statistics.fmean(v['dist_corr']):.3f}" if "dist_corr" in v else ""
        cs = f"{statistics.fmean(v['cosine']):.3f}" if "cosine" in v else ""
        lines.append(f"| {name} | {statistics.fmean(v['err']):.4f} | {statistics.fmean(d):+.4f} ± {se:.4f} | "
                     f"{closed:.0%} | {dc} | {cs} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
