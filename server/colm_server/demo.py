"""A first look at coreset selection on the built-in mixture, offline, in about a minute.

Streams large batches from the synthetic mixture, lets several strategies pick coresets
from the same batches with a tiny LoRA model, and reports per-source shares and how
closely each coreset's weighted gradient matches its large batch's.
"""

from __future__ import annotations

import argparse
import itertools
from collections import Counter

import torch
from tqdm import tqdm

from colm_server.data.collate import Collator
from colm_server.data.synthetic import synthetic_stream
from colm_server.model.load import attach_lora
from colm_server.model.tiny import build_tokenizer, tiny_model
from colm_server.select import SelectorConfig, build_selector
from colm_server.select.metrics import adapter_grads, matching_error

STRATEGIES = ("colm", "stratified", "random")


def run(steps: int, large: int, small: int, seed: int) -> str:
    """Run the comparison and return the report as Markdown."""
    torch.manual_seed(seed)
    collator = Collator(build_tokenizer(), max_length=64)
    model = attach_lora(tiny_model("llama", seed=seed, num_layers=4), r=8, alpha=16)
    selectors = {
        name: build_selector(model, SelectorConfig(strategy=name, batch_size=small,
                                                   large_batch_size=large, seed=seed))
        for name in STRATEGIES
    }
    stream = synthetic_stream(seed)
    seen: Counter[str] = Counter()
    picked = {name: Counter() for name in STRATEGIES}
    errors = {name: [] for name in STRATEGIES}
    for step in tqdm(range(steps), desc="selecting", unit="step"):
        batch = collator(list(itertools.islice(stream, large)))
        seen.update(batch.sources)
        grads = adapter_grads(model, batch)
        for name, selector in selectors.items():
            sel = selector.select(batch, step=step)
            picked[name].update(batch.sources[i] for i in sel.indices.tolist())
            errors[name].append(matching_error(grads, sel.indices, sel.weights))

    total = sum(seen.values())
    lines = [f"# Coreset selection: b={small} of L={large}, {steps} steps", "",
             "| source | share of large batches | " + " | ".join(STRATEGIES) + " |",
             "|---|---:|" + "---:|" * len(STRATEGIES)]
    for source, n in seen.most_common():
        shares = " | ".join(f"{picked[s][source] / (steps * small):.1%}" for s in STRATEGIES)
        lines.append(f"| {source} | {n / total:.1%} | {shares} |")
    lines += ["", "| strategy | gradient-matching error (mean over steps) |", "|---|---:|"]
    lines += [f"| {s} | {sum(errors[s]) / steps:.3f} |" for s in STRATEGIES]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="colm-stream demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--large", type=int, default=64, help="L: samples per large batch")
    p.add_argument("--small", type=int, default=16, help="b: samples per coreset")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(run(args.steps, args.large, args.small, args.seed))
