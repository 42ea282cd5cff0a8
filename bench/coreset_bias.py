"""Is a coreset's gradient error noise that averages out over steps, or a bias that stays?

A training run averages its steps' gradients (through momentum and through many small steps).
An unbiased subset (random, stratified) has a per-step error that shrinks like 1/sqrt(N) when N
steps are averaged; a deterministic choice (facility location picks medoids) can err the same way
on every batch, and that part does not shrink. For N in 1, 4, 16, ... this measures, at one
adapter state, the error of the mean of N steps' subset gradients against the mean of the same N
large batches' gradients, relative to the latter's norm:

    || mean_t g_sub(t) - mean_t G(t) || / || mean_t G(t) ||

Per-sample gradients are exact (all LoRA parameters); random and stratified are averaged over
``--draws`` draws per batch.

    python bench/coreset_bias.py --model demo-base --data synthetic --L 32 --b 8 --max-length 64

(``demo-base`` and ``synthetic``: the tiny pretrained Llama and the synthetic mixture of
`endtoend.py`'s tiny preset.)
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import statistics
import sys
from pathlib import Path

import torch

from colm_server.data.collate import Collator
from colm_server.model.load import attach_lora, load_model, load_tokenizer
from colm_server.select import SelectorConfig, build_selector
from colm_server.select.metrics import adapter_grads
from endtoend import PRESETS, base_model_source
from gradmatch import add_workload_arguments, read_records, train_adapter

STRATEGIES = ("colm", "stratified", "random")


def subset_gradient(g: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    w = weights.to(g)
    return (w[:, None] * g[rows.to(g.device)]).sum(0) / w.sum()


def errors_by_horizon(sub: torch.Tensor, full: torch.Tensor, horizons: list[int]) -> dict[int, float]:
    """Mean over disjoint windows of N steps of ||mean sub - mean full|| / ||mean full||."""
    out = {}
    for n in horizons:
        windows = [slice(i, i + n) for i in range(0, len(full) - n + 1, n)]
        out[n] = statistics.fmean(float((sub[w].mean(0) - full[w].mean(0)).norm() / full[w].mean(0).norm())
                                  for w in windows)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(p)
    p.add_argument("--batches", type=int, default=64, help="large batches, one adapter state")
    p.add_argument("--draws", type=int, default=20, help="draws of random and stratified per batch")
    p.add_argument("--train-steps", type=int, default=40, help="LoRA steps before measuring (0: B = 0)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--micro", type=int, default=8, help="samples per exact-gradient pass")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results/coreset-bias.md")
    p.add_argument("--work", type=Path, default=Path("/tmp/colm-endtoend"),
                   help="where --model demo-base is pretrained (endtoend.py's --work)")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    if args.model == "demo-base":
        args.model = base_model_source(PRESETS["tiny"], args.work)
    tokenizer = load_tokenizer(args.model)
    collator = Collator(tokenizer, max_length=args.max_length,
                        chat_template=getattr(tokenizer, "chat_template", None) is not None)
    if str(args.data) == "synthetic":
        from colm_server.data.synthetic import synthetic_stream
        records = list(itertools.islice(synthetic_stream(seed=args.seed), 12_000))
    else:
        records = read_records(args.data, args.seed)
    counts: dict[str, int] = {}
    for r in records:
        counts[r["source"]] = counts.get(r["source"], 0) + 1
    model = attach_lora(load_model(args.model, device=args.device), r=8, alpha=16,
                        targets=["q_proj", "k_proj", "v_proj", "o_proj"]).to(args.device)
    train_part = records[: args.train_steps * 8]
    if args.train_steps:
        train_adapter(model, collator, train_part, args.train_steps, 8, args.lr)
    stream = records[len(train_part):]
    selectors = {}
    for name in STRATEGIES:
        selectors[name] = build_selector(model, SelectorConfig(strategy=name, batch_size=args.b,
                                                               large_batch_size=args.L, seed=args.seed))
        selectors[name].prime_sources(counts)
    subs: dict[str, list[torch.Tensor]] = {n: [] for n in STRATEGIES}
    fulls = []
    for t in range(args.batches):
        batch = collator(stream[t * args.L:(t + 1) * args.L]).to(args.device)
        g = adapter_grads(model, batch, args.micro)
        fulls.append(g.mean(0))
        for name, sel in selectors.items():
            draws = 1 if name == "colm" else args.draws
            picks = [sel.select(batch, step=t * args.draws + d) for d in range(draws)]
            subs[name].append(torch.stack([subset_gradient(g, s.indices, s.weights) for s in picks]))
        print(f"  batch {t + 1}/{args.batches}", flush=True)
    full = torch.stack(fulls)
    horizons = [n for n in (1, 4, 16, 64, 256) if n <= args.batches]
    table = {}
    for name in STRATEGIES:
        per_draw = torch.stack(subs[name], dim=1)  # [draws, T, P]
        by_draw = [errors_by_horizon(d, full, horizons) for d in per_draw]
        table[name] = {n: statistics.fmean(e[n] for e in by_draw) for n in horizons}
    command = "python bench/coreset_bias.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    lines = ["# Coreset gradient error averaged over steps: noise or bias?", "", f"Command: `{command}`", "",
             f"Model {args.model}, LoRA r=8 on q,k,v,o trained {args.train_steps} steps, L={args.L}, "
             f"b={args.b}, {args.batches} large batches at that adapter; random and stratified: mean "
             f"over {args.draws} draws. Error of the mean of N steps' subset gradients against the mean of "
             "the same N large batches' gradients, relative to its norm (lower is better); an unbiased "
             "subset's error falls like 1/sqrt(N).", "",
             "| strategy | " + " | ".join(f"N={n}" for n in horizons) + " | N=1 ÷ N=max |",
             "|---|" + "---:|" * (len(horizons) + 1)]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[n]:.3f}" for n in horizons)
                     + f" | {row[horizons[0]] / row[horizons[-1]]:.1f} |")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
