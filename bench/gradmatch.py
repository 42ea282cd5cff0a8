"""How well does each coreset's weighted gradient match its large batch's gradient?

For every large batch of L samples, the exact per-sample gradients ``g`` of all LoRA parameters
are computed; G is their mean. Each method picks b samples with weights and is scored by
``||G - sum w_i g_i / sum w_i|| / ||G||`` (with its own weights and with uniform weights), raw
and after dividing each coordinate by the square root of the Adam second moment of a short
training run. Random and stratified are the mean over ``--draws`` draws per batch. Every
selector's source tracker is primed with the data's source counts, as the service primes it from
its manifests. Time and peak memory of each selection are measured side by side with one plain
inference forward of the same L samples.

    python bench/gradmatch.py                     # SmolLM2-135M-Instruct, L=64, b=32
    python bench/gradmatch.py --tiny              # a tiny random Llama, for a quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import shlex
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from colm_client.loss import per_sample_loss
from colm_server.data.collate import Batch, Collator
from colm_server.model.load import attach_lora, decoder_layers, load_model, load_tokenizer
from colm_server.select import SelectorConfig, build_selector
from colm_server.select.budget import allocate_budget
from colm_server.select.exact import count_sketch
from colm_server.select.facility import facility_location, pairwise_similarity
from colm_server.select.metrics import GramMatching, adapter_grads, adapter_targets
from colm_server.select.normalize import AdamNormalizer
from colm_server.select.own_adapter import OwnAdapter
from colm_server.select.selector import group_rows
from colm_server.select.strategies import STRATEGIES, SelectionContext
from colm_server.select.zo import probe_directions
from measure import measure

DATA = Path(__file__).resolve().parents[2] / "shared/data/math-mixture/train.jsonl"

# Methods that run the selector on the model (timed). Old default: the chain before the
# whole-adapter sketch (exact top layer, Adam-like normalisation, sparsification, l1).
MODEL_METHODS: dict[str, dict] = {
    "old default (exact top layer, normalise, sparsify, l1)": dict(
        strategy="colm", sketch="exact", sketch_layers=1, sketch_dim=1 << 20, normalize=True,
        sparsify=True, similarity="l1"),
    "colm-paper (zo K=1 on last v_proj)": dict(strategy="colm-paper"),
    "exact, top 4 layers, D=1024": dict(strategy="colm", sketch_layers=4),
    "exact, top 8 layers, D=1024": dict(strategy="colm", sketch_layers=8),
    "exact, top 12 layers, D=1024": dict(strategy="colm", sketch_layers=12),
    "exact, all layers, D=1024 (default)": dict(strategy="colm"),
    "activations, all layers, D=1024 (forward only)": dict(strategy="colm", sketch="activations"),
    # Early-exit proxies: the first k layers, then the final norm and lm_head (colm-fast is k=2).
    "proxy: first 2 layers + exit, exact, D=1024 (colm-fast)": dict(strategy="colm-fast"),
    "proxy: first 4 layers + exit, exact, D=1024": dict(strategy="colm", scorer_layers=4),
    "proxy: first 8 layers + exit, exact, D=1024": dict(strategy="colm", scorer_layers=8),
    # The same exits with their own LoRA, which the selector trains on the samples the trainer gets
    # (not the trainer's pushed adapter).
    "proxy: first 2 layers + exit, own LoRA": dict(strategy="colm-fast", scorer_adapter="own"),
    "proxy: first 4 layers + exit, own LoRA": dict(strategy="colm", scorer_layers=4, scorer_adapter="own"),
}
DEFAULT = "exact, all layers, D=1024 (default)"
# Rows computed from the exact gradients g of the batch, with the projection the selector uses.
PROJECTED_DIMS = (256, 4096)
ZO_PROBES = (16, 64)
DRAWN = ("stratified", "random")
REFERENCE = "reference: fl on exact LoRA grads"


@dataclass
class Record:
    """Per-batch figures of one method."""

    err: list[float] = field(default_factory=list)
    err_uniform: list[float] = field(default_factory=list)
    err_adam: list[float] = field(default_factory=list)
    err_adam_uniform: list[float] = field(default_factory=list)
    time_ratio: list[float] = field(default_factory=list)
    mem_ratio: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    zo_fidelity: dict = field(default_factory=dict)


def read_records(path: Path, seed: int) -> list[dict]:
    rows = [json.loads(line) for line in path.open()]
    random.Random(seed).shuffle(rows)
    return rows


def workload(source: str, data: Path, max_length: int, device: str = "cpu", seed: int = 0):
    """The collator, the shuffled records and the model with a fresh LoRA (r=8 on q, k, v, o) that
    the gradient-matching benchmarks share."""
    tokenizer = load_tokenizer(source)
    collator = Collator(tokenizer, max_length=max_length,
                        chat_template=getattr(tokenizer, "chat_template", None) is not None)
    return collator, read_records(data, seed), with_lora(source, device)


def with_lora(source: str, device: str = "cpu"):
    """``source`` loaded with the new LoRA the gradient-matching benchmarks share (r=8 on q, k, v, o)."""
    return attach_lora(load_model(source, device=device), r=8, alpha=16,
                       targets=["q_proj", "k_proj", "v_proj", "o_proj"]).to(device)


def plain_forward(model, batch: Batch):
    """What a trainer's inference forward of the large batch costs: all layers, all logits."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)


def fl_selection(feats: torch.Tensor, groups: dict[str, torch.Tensor], alloc: dict[str, int],
                 small: set[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean facility location on ``feats`` per large source, small sources kept whole
    (the first ``k`` rows when they do not fit), weights = cluster sizes."""
    rows, weights = [], []
    for s, r in groups.items():
        k = alloc[s]
        if k == 0:
            continue
        if s in small or k == len(r):
            rows.append(r[:k])
            weights.append(torch.full((k,), len(r) / k))
            continue
        order, counts = facility_location(pairwise_similarity(feats[r], "euclidean"), k)
        rows.append(r[order])
        weights.append(counts.float())
    return torch.cat(rows), torch.cat(weights)


def drawn_errors(strategy: str, cfg: SelectorConfig, groups, alloc, small, grads: list[GramMatching],
                 draws: int, seed: int) -> list[tuple[float, float]]:
    """Mean (own-weight, uniform-weight) error over ``draws`` draws of a model-free strategy, per
    gradient matrix of ``grads``."""
    def no_model():
        raise RuntimeError(f"{strategy} needs no model")

    sums = [[0.0, 0.0] for _ in grads]
    for d in range(draws):
        ctx = SelectionContext(config=cfg, budget=cfg.batch_size, groups=groups, allocation=alloc,
                               small=small, generator=torch.Generator().manual_seed(seed + d),
                               sketch=no_model, losses=no_model, normalizer=AdamNormalizer())
        rows, w = STRATEGIES[strategy](ctx)
        for acc, g in zip(sums, grads):
            acc[0] += g(rows, w)
            acc[1] += g(rows, torch.ones_like(w))
    return [(a / draws, u / draws) for a, u in sums]


def train_adapter(model, collator: Collator, records: list[dict], steps: int, batch: int,
                  lr: float) -> torch.Tensor:
    """A short LoRA run; returns Adam's bias-corrected second moment per LoRA coordinate."""
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for step in range(steps):
        b = collator(records[step * batch:(step + 1) * batch])
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        loss = per_sample_loss(logits, b.labels).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"  train step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    model.eval()
    beta2 = opt.param_groups[0]["betas"][1]
    return second_moment(model, opt, beta2, steps)


def own_methods(args) -> list[str]:
    """The chosen methods whose scorer carries its own LoRA."""
    return [n for n, over in MODEL_METHODS.items()
            if over.get("scorer_adapter") == "own" and (not args.methods or n in args.methods)]


def own_scorer(method: str, model, device: str):
    """What an own-LoRA method scores with: its ``scorer_model`` with a new LoRA like `workload`'s,
    or a copy of ``model``."""
    source = MODEL_METHODS[method].get("scorer_model")
    if not source:
        return copy.deepcopy(model)
    return with_lora(source, device)


def train_own_scorer(scorer, collator: Collator, records: list[dict], *, steps: int, batch: int, lr: float,
                     micro: int, scorer_layers: int = 0, label: str = "own") -> None:
    """Train ``scorer``'s own LoRA as the selector would have: one step on each batch the trainer
    trained on (`train_adapter`'s, unweighted), on the scorer's own loss (its exit's, with
    ``scorer_layers``)."""
    own = OwnAdapter(scorer, lr=lr, scorer_layers=scorer_layers, chunk=micro)
    device = next(scorer.parameters()).device
    for step in range(steps):
        part = records[step * batch:(step + 1) * batch]
        loss = own.step(collator(part).to(device), torch.ones(len(part)))
        print(f"  [{label}] own step {step + 1}/{steps}: loss {loss:.3f}", flush=True)


def second_moment(model, opt, beta2: float, steps: int) -> torch.Tensor:
    """Adam's v of each LoRA matrix, flattened in the order `adapter_grads` uses."""
    targets = adapter_targets(model)
    return torch.cat([opt.state[t.module.weight]["exp_avg_sq"].flatten() for t in targets]) / (
        1 - beta2**steps
    )


def summarize(name: str, rec: Record, base: Record, ref: Record) -> dict:
    n = len(rec.err)
    out = {"method": name, "n": n}
    for key in ("err", "err_uniform", "err_adam", "err_adam_uniform"):
        vals = getattr(rec, key)
        out[key] = sum(vals) / n
        # Always against stratified (mean of its draws) with its own weights.
        diffs = [a - b for a, b in zip(vals, getattr(base, key.replace("_uniform", "")))]
        mean = sum(diffs) / n
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / max(n - 1, 1))
        out[f"{key}_vs_strat"] = (mean, sd / math.sqrt(n))
    for key in ("err", "err_adam"):
        gap = sum(getattr(base, key)) / n - sum(getattr(ref, key)) / n
        got = sum(getattr(base, key)) / n - out[key]
        out[f"{key}_closed"] = got / gap if gap > 0 else float("nan")
    for key in ("time_ratio", "mem_ratio", "seconds"):
        vals = getattr(rec, key)
        out[key] = sum(vals) / len(vals) if vals else float("nan")
    out["timed_batches"] = len(rec.seconds)
    out.update(rec.zo_fidelity)
    return out


def record(rec: Record, err: GramMatching, err_adam: GramMatching, rows: torch.Tensor,
           w: torch.Tensor) -> None:
    ones = torch.ones_like(w)
    rec.err.append(err(rows, w))
    rec.err_uniform.append(err(rows, ones))
    rec.err_adam.append(err_adam(rows, w))
    rec.err_adam_uniform.append(err_adam(rows, ones))


def projected(g: torch.Tensor, sizes: list[int], dim: int, seed: int) -> torch.Tensor:
    """The selector's count sketch of ``g`` (per LoRA matrix, summed): what the chunked exact
    sketch of all layers computes, up to float rounding (tests/test_sketches.py)."""
    return sum(count_sketch(part, dim, seed, i) for i, part in enumerate(g.split(sizes, dim=1)))


def run_state(label: str, model, collator: Collator, stream: list[dict], args, v: torch.Tensor,
              source_counts: dict[str, int], first_state: bool,
              own_scorers: dict[str, torch.nn.Module]) -> dict[str, Record]:
    """Warm the selectors up, then score every method on `args.batches` large batches.

    ``own_scorers``: the model each ``scorer_adapter: own`` method scores with (and trains)."""
    device = next(model.parameters()).device
    depth = len(decoder_layers(model))  # --tiny models have fewer layers than some sketches
    selectors = {}
    for name, over in MODEL_METHODS.items():
        if args.methods and name not in args.methods:
            continue
        over = {**over, "sketch_layers": min(over.get("sketch_layers", 0), depth),
                "scorer_layers": min(over.get("scorer_layers", 0), depth)}
        cfg = SelectorConfig(batch_size=args.b, large_batch_size=args.L, seed=args.seed,
                             scorer_lr=args.lr, **over)
        selectors[name] = build_selector(own_scorers.get(name, model), cfg)
        selectors[name].prime_sources(source_counts)
    base_cfg = SelectorConfig(batch_size=args.b, large_batch_size=args.L, seed=args.seed)
    sizes = [t.numel for t in adapter_targets(model)]
    batches = [collator(stream[i * args.L:(i + 1) * args.L]).to(device)
               for i in range(args.warmup + args.batches)]
    for t in range(args.warmup):
        for sel in selectors.values():
            sel.select(batches[t], step=t)
        print(f"  [{label}] warm-up {t + 1}/{args.warmup}", flush=True)
    zo_names = {k: f"zo, all layers, K={k} (eps->0 limit from g)" for k in ZO_PROBES}
    proj_names = {d: f"exact, all layers, D={d} (projected from g)" for d in PROJECTED_DIMS}
    names = [*selectors, *proj_names.values(), *zo_names.values(), *DRAWN, REFERENCE]
    records = {name: Record() for name in names}
    scale = v.sqrt() + 1e-8
    for i, t in enumerate(range(args.warmup, args.warmup + args.batches)):
        batch = batches[t]
        g = adapter_grads(model, batch, args.micro)
        g_adam = g / scale
        err, err_adam = GramMatching(g), GramMatching(g_adam)
        timed = i < args.timed_batches
        if timed:
            with torch.inference_mode():
                _, fwd_s, fwd_mem = measure(partial(plain_forward, model, batch), device)
        small = None
        for name, sel in selectors.items():
            s, secs, mem = measure(partial(sel.select, batch, step=t), device)
            record(records[name], err, err_adam, s.indices, s.weights)
            if timed:
                records[name].time_ratio.append(secs / fwd_s)
                records[name].mem_ratio.append(mem / max(fwd_mem, 1))
                records[name].seconds.append(secs)
            small = {src for src, st in s.stats["sources"].items() if st["small"]}
        groups = group_rows(batch.sources)
        alloc = allocate_budget({s: len(r) for s, r in groups.items()}, args.b, small)
        for name in DRAWN:
            (e, eu), (ea, eau) = drawn_errors(name, base_cfg, groups, alloc, small, [err, err_adam],
                                              args.draws, seed=args.seed * 100_003 + t * 1_009)
            for key, val in zip(("err", "err_uniform", "err_adam", "err_adam_uniform"), (e, eu, ea, eau)):
                getattr(records[name], key).append(val)
        for d, name in proj_names.items():
            rows, w = fl_selection(projected(g, sizes, d, args.seed), groups, alloc, small)
            record(records[name], err, err_adam, rows, w)
        for k, name in zo_names.items():
            coeffs = g @ probe_directions(g.shape[1], k, args.seed, t).T
            rows, w = fl_selection(coeffs, groups, alloc, small)
            record(records[name], err, err_adam, rows, w)
        for gg, fn, key in ((g, err, "err"), (g_adam, err_adam, "err_adam")):
            rows, w = fl_selection(gg, groups, alloc, small)
            getattr(records[REFERENCE], key).append(fn(rows, w))
            getattr(records[REFERENCE], f"{key}_uniform").append(fn(rows, torch.ones_like(w)))
        errs = ", ".join(f"{n.split(' (')[0]} {r.err[-1]:.3f}" for n, r in records.items())
        print(f"  [{label}] batch {i + 1}/{args.batches}: {errs}", flush=True)
        if i == 0:
            g_first = g
    if args.zo_check and first_state:
        zo_check(label, model, batches[args.warmup], g_first, args, device, records, zo_names)
    return records


def zo_check(label: str, model, batch: Batch, g: torch.Tensor, args, device,
             records: dict[str, Record], zo_names: dict[int, str]) -> None:
    """Real ZO over all layers with the smallest K on one batch: its cost, and how far its
    finite-difference coefficients are from the eps->0 limit ``g . z`` that the rows use."""
    k = min(ZO_PROBES)
    cfg = SelectorConfig(batch_size=args.b, large_batch_size=args.L, seed=args.seed, strategy="colm",
                         sketch="zo", zo_probes=k, sketch_layers=len(decoder_layers(model)))
    sel = build_selector(model, cfg)
    step = args.warmup
    with torch.inference_mode():
        _, fwd_s, fwd_mem = measure(partial(plain_forward, model, batch), device)
    sketch, secs, mem = measure(partial(sel.scorer.sketch, batch, step), device)
    limit = g @ probe_directions(g.shape[1], k, args.seed, step).T
    rel = ((sketch.coeffs.cpu() - limit).norm() / limit.norm()).item()
    corr = torch.corrcoef(torch.stack([sketch.coeffs.cpu().flatten(), limit.flatten()]))[0, 1].item()
    rec = records[zo_names[k]]
    rec.time_ratio.append(secs / fwd_s)
    rec.mem_ratio.append(mem / max(fwd_mem, 1))
    rec.seconds.append(secs)
    rec.zo_fidelity = {"relative_error": rel, "correlation": corr}
    print(f"  [{label}] real zo K={k} over all layers: {secs:.1f}s ({secs / fwd_s:.2f}x a forward), "
          f"coefficients vs the limit: rel. error {rel:.4f}, correlation {corr:.5f}", flush=True)


def fmt_ratio(r: dict, key: str) -> str:
    return "not run" if math.isnan(r[key]) else f"{r[key]:.2f}"


def markdown(results: dict[str, list[dict]], args, meta: dict) -> str:
    lines = ["# Gradient matching of coresets", "",
             f"Command: `{meta['command']}`", "",
             f"Machine: {meta['machine']}. Model: {meta['model']} ({meta['layers']} layers), "
             f"LoRA r=8, alpha=16 on q,k,v,o ({meta['lora_params']} parameters). "
             f"Data: {meta['data']}. L={args.L}, b={args.b}, max length {args.max_length}, "
             f"{args.batches} measured large batches after {args.warmup} warm-up selections per "
             f"adapter state, seed {args.seed}. Wall time of the whole run: {meta['wall']:.0f} s.", "",
             "Error = ||G - sum w g / sum w|| / ||G|| against the exact per-sample gradients g of all "
             "LoRA parameters, G their mean (lower is better). Every method shares the selector's "
             "budgets: source trackers primed with the data's source counts (as the service primes "
             "them from its manifests), sources under 3% kept whole, the rest of b split in "
             f"proportion to the sources' counts in the batch. stratified and random: the mean over "
             f"{args.draws} draws per batch. 'vs strat' = paired mean difference to stratified over "
             "the batches, with its standard error (negative is better; it counts as better only "
             "below -2 SE). 'closed' = share of the gap between stratified and the reference that "
             "the method closes. The **reference** is greedy facility location with euclidean "
             "similarity on the exact per-sample gradients of all LoRA parameters (the raw ones for "
             "the raw columns, the Adam-scaled ones for the Adam columns), per large source, "
             "weights = cluster sizes. Adam columns divide every coordinate by sqrt(v) of a short "
             "Adam run first.", "",
             "Rows marked 'projected from g' apply the selector's own count sketch to the exact "
             "gradients (what the chunked sketch computes, to float rounding; the D=1024 row runs "
             "the selector itself); 'eps->0 limit from g' rows use g . z_k for the same Gaussian "
             "probes z_k the zo sketch draws, i.e. the zo coefficients without finite-difference "
             "error (one real zo run on the first state is checked against it below). Time and memory: "
             f"ratios to one plain inference forward of the same L samples (all logits), measured "
             f"side by side on the first {args.timed_batches} batches (memory: peak RSS growth on "
             "CPU, peak allocation on GPU); 'not run' where no selector ran.", ""]
    for label, rows in results.items():
        lines += [f"## Adapter: {label}", "",
                  "| method | err (own w) | err (uniform w) | vs strat | closed | "
                  "Adam err | Adam vs strat | Adam closed | time / fwd | mem / fwd |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            vs = r["err_vs_strat"]
            va = r["err_adam_vs_strat"]
            lines.append(
                f"| {r['method']} | {r['err']:.4f} | {r['err_uniform']:.4f} | "
                f"{vs[0]:+.4f} ± {vs[1]:.4f} | {r['err_closed']:.0%} | {r['err_adam']:.4f} | "
                f"{va[0]:+.4f} ± {va[1]:.4f} | {r['err_adam_closed']:.0%} | "
                f"{fmt_ratio(r, 'time_ratio')} | {fmt_ratio(r, 'mem_ratio')} |")
        for r in rows:
            if "relative_error" in r:
                lines += ["", f"Real zo over all layers on one batch ({r['method'].split(' (')[0]}): "
                          f"coefficients {r['relative_error']:.4f} relative error from the limit, "
                          f"correlation {r['correlation']:.5f}; time {r['time_ratio']:.2f}x a forward."]
        lines.append("")
    return "\n".join(lines)


def add_workload_arguments(p: argparse.ArgumentParser) -> None:
    """The model, data and batch shape the selection benchmarks run on."""
    p.add_argument("--model", default="smollm2", help="smollm2, a HF folder, a .gguf or tiny:<arch>")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--L", type=int, default=64)
    p.add_argument("--b", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(p)
    p.add_argument("--batches", type=int, default=16, help="measured large batches per adapter state")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timed-batches", type=int, default=4, help="batches whose cost is measured")
    p.add_argument("--draws", type=int, default=100, help="draws of stratified and random per batch")
    p.add_argument("--zo-check", action=argparse.BooleanOptionalAction, default=True,
                   help="run real zo over all layers on one batch of the first state")
    p.add_argument("--methods", nargs="+", choices=MODEL_METHODS, metavar="NAME",
                   help=f"run only these selector rows (default: all of {list(MODEL_METHODS)})")
    p.add_argument("--scorer-model", type=Path, nargs="*", default=[],
                   help="folders of smaller models of the same tokenizer (bench/distill_proxy.py): a row "
                        "each, scoring with the model and a LoRA of its own trained on its coresets; "
                        "without --methods, only these rows")
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--micro", type=int, default=8, help="samples per exact-gradient pass")
    p.add_argument("--tiny", action="store_true", help="tiny random Llama, L=16, b=8: seconds")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results/gradmatch.md")
    args = p.parse_args(argv)
    if args.tiny:
        args.model, args.L, args.b, args.max_length = "tiny:llama", 16, 8, 64
        args.batches, args.warmup, args.train_steps, args.micro = 2, 1, 3, 8
        args.timed_batches, args.draws = 1, 10
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    collator, records, model = workload(args.model, args.data, args.max_length, args.device, args.seed)
    source_counts = dict(Counter(r["source"] for r in records))
    need = (args.warmup + args.batches) * args.L
    train_part = records[: args.train_steps * args.train_batch]
    streams = {"zero-initialised (B = 0)": records[len(train_part):len(train_part) + need],
               f"after {args.train_steps} training steps": records[len(train_part) + need:
                                                                   len(train_part) + 2 * need]}
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    zero_state = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    added = []
    for path in args.scorer_model:  # a smaller model of the same tokenizer, its own LoRA
        added.append(f"smaller model {path.name}, own LoRA")
        MODEL_METHODS[added[-1]] = dict(strategy="colm", scorer_adapter="own", scorer_model=str(path))
    if added:  # with --methods as well, or alone
        args.methods = [*(args.methods or []), *added]
    own_zero = {name: own_scorer(name, model, args.device) for name in own_methods(args)}  # untrained
    print(f"training the adapter for {args.train_steps} steps (Adam second moments) ...")
    v = train_adapter(model, collator, train_part, args.train_steps, args.train_batch, args.lr)
    trained_state = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    own_trained = {}
    for name, scorer in own_zero.items():
        own_trained[name] = copy.deepcopy(scorer)
        exit_after = SelectorConfig(**MODEL_METHODS[name]).scoring().scorer_layers
        train_own_scorer(own_trained[name], collator, train_part, steps=args.train_steps,
                         batch=args.train_batch, lr=args.lr, micro=args.micro, scorer_layers=exit_after,
                         label=name)

    results: dict[str, list[dict]] = {}
    for (label, stream), state, own in zip(streams.items(), (zero_state, trained_state),
                                           (own_zero, own_trained)):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in state:
                    p.copy_(state[n])
        recs = run_state(label, model, collator, stream, args, v, source_counts,
                         first_state=not results, own_scorers=own)
        base_rec, ref = recs["stratified"], recs[REFERENCE]
        results[label] = [summarize(n, r, base_rec, ref) for n, r in recs.items()]

    meta = {
        "command": "python bench/gradmatch.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
                   f"threads, {args.device}"
                   + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""),
        "model": args.model, "layers": len(decoder_layers(model)), "lora_params": lora_params,
        "data": str(args.data.name), "wall": time.perf_counter() - start,
    }
    text = markdown(results, args, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results},
                                                        indent=1))
    print(text)
    print(f"written to {args.out}")
    return results


if __name__ == "__main__":
    main()
