"""Why an early-exit proxy does or does not select well: its gradients against the model's own.

For a few large batches at the zero-initialised adapter (B = 0, where the whole model's sketch is
needed most; or after ``--train-steps`` steps of training it as `gradmatch.py` does), it compares,
sample by sample, the exact LoRA gradients of the first k layers as the early-exit proxy computes
them (loss read by the final norm and lm_head right after layer k) with the same layers' exact
gradients in the whole model (the loss after all layers). It separates the
two things a proxy changes: **which coordinates** (the first k layers only; the ``bottom k of g``
rows: the model's true gradients of those layers) and **which backward signal** (the exit head's
instead of the upper layers'; the ``proxy`` rows). For each it gives the per-sample cosine to the
true gradients of the same layers, the correlation of pairwise distances with the whole adapter's
gradients, and the coreset's gradient-matching error (euclidean facility location per source, as
`gradmatch.py` scores it) against stratified.

Two ways to give the first k layers a better backward signal are measured beside the plain exit
(``--variants``): ``tuned``, an affine map on layer k's output (a "tuned lens", zero-initialised, so
the identity at first) trained before the batches by KL divergence to the whole model's next-token
distribution on ``--calibration`` other batches; and ``skip``, the first k layers followed by the
model's last layer, whose attention carries a response token's signal back to the prompt positions
(which the plain exit never reaches: ``unscored share`` is the share of the true gradient at layer
k's output that lies at positions the loss does not read).

    python bench/proxy_signal.py                  # SmolLM2-135M, L=64, b=32, 4 batches
    python bench/proxy_signal.py --layers 2 4 --variants exit tuned skip \
        --out bench/results/proxy-signal-exits.md
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
import torch.nn.functional as F
from torch import nn

from colm_server.model.load import decoder_layers
from colm_server.model.split import final_norm, output_head
from colm_server.select import SelectorConfig, build_selector
from colm_server.select.budget import allocate_budget
from colm_server.select.metrics import GramMatching, adapter_grads, adapter_targets
from colm_server.select.selector import group_rows
from gradmatch import DATA, drawn_errors, fl_selection, train_adapter, train_own_scorer, with_lora, workload


def distance_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of the pairwise euclidean distances of the rows of ``a`` and of ``b``."""
    iu = torch.triu_indices(len(a), len(a), 1)
    da = torch.cdist(a.double(), a.double())[iu[0], iu[1]]
    db = torch.cdist(b.double(), b.double())[iu[0], iu[1]]
    return float(torch.corrcoef(torch.stack([da, db]))[0, 1])


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1).mean())


class TunedExit(nn.Module):
    """``h + W h + c`` on layer k's output, before the final norm; the identity at zero."""

    def __init__(self, hidden: int):
        super().__init__()
        self.map = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.map.weight)
        nn.init.zeros_(self.map.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.map(h)


def _lm(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def layer_output_at_scored(model: nn.Module, batch, k: int, grad: bool = False):
    """Layer k's output (all positions), the model's logits at the scored positions, and those
    positions ``(rows, positions, targets)``."""
    captured = {}

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        if grad:
            h.retain_grad()
        captured["h"] = h

    handle = decoder_layers(model)[k - 1].register_forward_hook(hook)
    try:
        with torch.set_grad_enabled(grad):
            logits = _lm(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                use_cache=False).logits
    finally:
        handle.remove()
    scored = batch.labels[:, 1:] != -100
    rows, positions = scored.nonzero(as_tuple=True)
    targets = batch.labels[rows, positions + 1]
    return captured["h"], logits[rows, positions].float(), (rows, positions, targets)


def train_tuned_exit(model: nn.Module, batches: list, k: int, micro: int, epochs: int,
                     lr: float = 1e-3) -> tuple[TunedExit, float, float]:
    """A `TunedExit` for layer k fitted by KL to the model's next-token distribution; with the
    mean KL of its first and last epoch."""
    norm, head = final_norm(model), output_head(model)
    data = []
    for batch in batches:
        for i in range(0, len(batch), micro):
            sub = batch.subset(list(range(i, min(i + micro, len(batch)))))
            h, logits, (rows, positions, _) = layer_output_at_scored(model, sub, k)
            data.append((h[rows, positions], torch.log_softmax(logits, -1)))
    tuned = TunedExit(head.weight.shape[1])
    opt = torch.optim.Adam(tuned.parameters(), lr=lr)
    kls = []
    for _ in range(epochs):
        total = 0.0
        for h, target in data:
            logp = torch.log_softmax(head(norm(tuned(h))).float(), -1)
            loss = F.kl_div(logp, target, log_target=True, reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        kls.append(total / len(data))
    tuned.requires_grad_(False)
    return tuned, kls[0], kls[-1]


def tuned_exit_grads(model: nn.Module, batch, k: int, tuned: TunedExit, micro: int) -> torch.Tensor:
    """Per-sample LoRA gradients of the first k layers, the loss read through ``tuned`` (set before
    the model's final norm while they are taken)."""
    decoder = _lm(model).model
    norm = decoder.norm
    decoder.norm = nn.Sequential(tuned, norm)
    try:
        return adapter_grads(model, batch, micro, exit_after=k)
    finally:
        decoder.norm = norm


def skip_grads(model: nn.Module, batch, k: int, micro: int, columns: int) -> torch.Tensor:
    """Per-sample LoRA gradients of the first k layers (``columns`` of them) when layers
    ``k+1 .. n-1`` are removed: the first k layers feed the model's last one directly."""
    lm = _lm(model)
    layers, depth = lm.model.layers, lm.config.num_hidden_layers
    lm.model.layers = nn.ModuleList([*layers[:k], layers[-1]])
    lm.config.num_hidden_layers = k + 1
    try:
        return adapter_grads(model, batch, micro)[:, :columns]
    finally:
        lm.model.layers, lm.config.num_hidden_layers = layers, depth


def unscored_share(model: nn.Module, batch, k: int) -> float:
    """Share of the squared norm of d(sum of per-sample mean losses)/d(layer k's output) at
    positions the loss does not read (prompt, and the response's last position)."""
    h, logits, (rows, positions, targets) = layer_output_at_scored(model, batch, k, grad=True)
    token = F.cross_entropy(logits, targets, reduction="none")
    counts = (batch.labels[:, 1:] != -100).sum(1).clamp(min=1)
    (torch.zeros(len(batch)).index_add(0, rows, token) / counts).sum().backward()
    g2 = h.grad.float().pow(2).sum(-1)
    read = torch.zeros_like(g2, dtype=torch.bool)
    read[rows, positions] = True
    model.zero_grad(set_to_none=True)
    return float(g2[~read].sum() / g2.sum())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--L", type=int, default=64)
    p.add_argument("--b", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8], help="exit depths k")
    p.add_argument("--variants", nargs="+", default=["exit"], choices=["exit", "tuned", "skip"],
                   help="exit: the plain early exit; tuned: through a trained exit map; "
                        "skip: through the last layer")
    p.add_argument("--calibration", type=int, default=4, help="batches the tuned exit is fitted on")
    p.add_argument("--exit-epochs", type=int, default=5)
    p.add_argument("--draws", type=int, default=50)
    p.add_argument("--train-steps", type=int, default=0,
                   help="train the adapter first (batches of 8, Adam lr 1e-3, as gradmatch.py); 0: B = 0")
    p.add_argument("--scorer-model", type=Path,
                   help="also a smaller model of the same tokenizer (bench/distill_proxy.py) with a LoRA of "
                        "its own like the model's, trained by the selector's step on the training batches")
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
    smaller = None
    if args.scorer_model is not None:
        smaller = with_lora(str(args.scorer_model))
    if args.train_steps:  # on the first records; the measured batches follow them
        train_adapter(model, collator, records[:args.train_steps * 8], args.train_steps, 8, lr=1e-3)
        if smaller is not None:  # its own LoRA, as the selector trains it on what the trainer trains on
            train_own_scorer(smaller, collator, records, steps=args.train_steps, batch=8, lr=1e-3,
                             micro=args.micro, label=args.scorer_model.name)
        records = records[args.train_steps * 8:]

    rows: dict[str, dict[str, list[float]]] = {}
    tuned: dict[int, TunedExit] = {}
    fitted = []
    if "tuned" in args.variants:  # fitted on the batches after the measured ones
        calibration = [collator(records[(args.batches + t) * args.L:(args.batches + t + 1) * args.L])
                       for t in range(args.calibration)]
        for k in args.layers:
            tuned[k], first, last = train_tuned_exit(model, calibration, k, args.micro, args.exit_epochs)
            fitted.append(f"k={k}: KL {first:.2f} -> {last:.2f}")
            print(f"tuned exit after layer {k}: mean KL {first:.3f} (epoch 1) -> {last:.3f}", flush=True)

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
            columns = sum(sizes[:k * per_layer])
            bottom = g[:, :columns]
            add(f"bottom {k} layers of g (true gradients)",
                err=err(*fl_selection(bottom, groups, alloc, small)),
                dist_corr=distance_correlation(bottom, g), cosine=1.0,
                unscored=unscored_share(model, batch, k))
            proxies, name = {}, f"proxy: first {k} layers"
            if "exit" in args.variants:
                proxies[f"{name} + exit"] = adapter_grads(model, batch, args.micro, exit_after=k)
            if "tuned" in args.variants:
                proxies[f"{name} + tuned exit"] = tuned_exit_grads(model, batch, k, tuned[k], args.micro)
            if "skip" in args.variants:
                proxies[f"{name} + last layer"] = skip_grads(model, batch, k, args.micro, columns)
            for name, proxy in proxies.items():
                add(name, err=err(*fl_selection(proxy, groups, alloc, small)),
                    dist_corr=distance_correlation(proxy, g), cosine=mean_cosine(proxy, bottom))
        if smaller is not None:  # its own parameters: no cosine with the model's, distances only
            theirs = adapter_grads(smaller, batch, args.micro)
            add(f"smaller model {args.scorer_model.name}, own LoRA",
                err=err(*fl_selection(theirs, groups, alloc, small)),
                dist_corr=distance_correlation(theirs, g))
        done = ", ".join(f"{n} {v['err'][-1]:.3f}" for n, v in rows.items())
        print(f"batch {t + 1}/{args.batches}: {done}", flush=True)

    base = rows["stratified (mean of draws)"]["err"]
    ref = rows["reference: fl on all of g"]["err"]
    lines = ["# Early-exit proxy: its gradients against the model's own", "",
             f"Command: `python bench/proxy_signal.py {shlex.join(sys.argv[1:] if argv is None else argv)}`",
             "",
             f"Machine: {platform.machine()}, {torch.get_num_threads()} threads. Model: {args.model} "
             f"({depth} layers), LoRA r=8, alpha=16 on q,k,v,o, "
             f"{f'trained {args.train_steps} steps' if args.train_steps else 'zero-initialised'}. "
             f"L={args.L}, b={args.b}, "
             f"max length {args.max_length}, {args.batches} batches of the math mixture. "
             f"Wall time {time.perf_counter() - start:.0f} s.",
             *([f"Tuned exits fitted on {args.calibration} other batches, {args.exit_epochs} epochs, "
                f"mean KL to the model's distribution: {'; '.join(fitted)}.", ""] if fitted else [""]),
             "err: the coreset's gradient-matching error against all LoRA gradients (as gradmatch.py), with "
             "euclidean facility location per source on the row's features; vs strat: paired mean "
             "difference to stratified (mean of draws) ± SE over batches; closed: share of the stratified → "
             "reference gap closed. dist corr: correlation of the features' pairwise distances with those "
             "of all LoRA gradients. cosine: mean per-sample cosine between the proxy's gradients of its k "
             "layers and the true gradients of the same layers. unscored: share of the squared norm of the "
             "true gradient at layer k's output at positions the loss does not read.", "",
             "| features | err | vs strat | closed | dist corr | cosine | unscored |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    gap = statistics.fmean(base) - statistics.fmean(ref)
    for name, v in rows.items():
        d = [a - b for a, b in zip(v["err"], base)]
        se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
        closed = (statistics.fmean(base) - statistics.fmean(v["err"])) / gap if gap else float("nan")
        dc = f"{statistics.fmean(v['dist_corr']):.3f}" if "dist_corr" in v else ""
        cs = f"{statistics.fmean(v['cosine']):.3f}" if "cosine" in v else ""
        un = f"{statistics.fmean(v['unscored']):.2f}" if "unscored" in v else ""
        lines.append(f"| {name} | {statistics.fmean(v['err']):.4f} | {statistics.fmean(d):+.4f} ± {se:.4f} | "
                     f"{closed:.0%} | {dc} | {cs} | {un} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
