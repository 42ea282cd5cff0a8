"""How well does each coreset's weighted gradient match its large batch's gradient?

For every large batch of L samples, the exact per-sample gradients of all LoRA parameters
are computed; G is their mean. Each method picks b samples with weights and is scored by
``||G - sum w_i g_i / sum w_i|| / ||G||`` (with its own weights and with uniform weights),
raw and after dividing each coordinate by the square root of the Adam second moment of a
short training run. The time and peak memory of each selection are measured side by side
with one plain inference forward of the same L samples.

    python bench/gradmatch.py                     # SmolLM2-135M-Instruct, L=64, b=32
    python bench/gradmatch.py --tiny              # a tiny random Llama, for a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from colm_client.loss import per_sample_loss
from colm_server.data.collate import Batch, Collator
from colm_server.model.load import attach_lora, decoder_layers, load_model, load_tokenizer
from colm_server.select import SelectorConfig, build_selector
from colm_server.select.budget import allocate_budget
from colm_server.select.facility import facility_location, pairwise_similarity
from colm_server.select.metrics import adapter_grads, adapter_targets, matching_error
from colm_server.select.selector import group_rows
from measure import measure

DATA = Path(__file__).resolve().parents[2] / "shared/data/math-mixture/train.jsonl"

# name -> SelectorConfig overrides (strategy, sketch, ...); "fl-full" is computed here.
METHODS: dict[str, dict] = {
    "random": dict(strategy="random"),
    "stratified": dict(strategy="stratified"),
    "loss": dict(strategy="loss"),
    "colm zo K=1 (paper)": dict(strategy="colm", sketch="zo", zo_probes=1, sketch_params="probe"),
    "colm zo K=8": dict(strategy="colm", sketch="zo", zo_probes=8, sketch_params="probe"),
    "colm exact adapter, 1 layer": dict(strategy="colm", sketch="exact", sketch_layers=1),
    "colm exact adapter, 4 layers": dict(strategy="colm", sketch="exact", sketch_layers=4),
}
REFERENCE = "fl on full LoRA grads"


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


def read_records(path: Path, seed: int) -> list[dict]:
    rows = [json.loads(line) for line in path.open()]
    random.Random(seed).shuffle(rows)
    return rows


def plain_forward(model, batch: Batch):
    """What a trainer's inference forward of the large batch costs: all layers, all logits."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)


def reference_selection(g: torch.Tensor, sources: list[str], b: int, small_share: float,
                        share_of) -> tuple[torch.Tensor, torch.Tensor]:
    """Facility location on the exact full gradients, with the selector's budgets."""
    groups = group_rows(sources)
    small = {s for s in groups if share_of(s) < small_share}
    alloc = allocate_budget({s: len(r) for s, r in groups.items()}, b, small)
    rows, weights = [], []
    for s, r in groups.items():
        k = alloc[s]
        if k == 0:
            continue
        if s in small or k == len(r):
            rows.append(r[:k])
            weights.append(torch.full((k,), len(r) / k))
            continue
        order, counts = facility_location(pairwise_similarity(g[r], "euclidean"), k)
        rows.append(r[order])
        weights.append(counts.float())
    return torch.cat(rows), torch.cat(weights)


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
        # Always against stratified with its own weights.
        diffs = [a - b for a, b in zip(vals, getattr(base, key.replace("_uniform", "")))]
        mean = sum(diffs) / n
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / max(n - 1, 1))
        out[f"{key}_vs_strat"] = (mean, sd / math.sqrt(n))
    for key in ("err", "err_adam"):
        gap = sum(getattr(base, key)) / n - sum(getattr(ref, key)) / n
        got = sum(getattr(base, key)) / n - out[key]
        out[f"{key}_closed"] = got / gap if gap > 0 else float("nan")
    out["time_ratio"] = sum(rec.time_ratio) / n if rec.time_ratio else float("nan")
    out["mem_ratio"] = sum(rec.mem_ratio) / n if rec.mem_ratio else float("nan")
    out["seconds"] = sum(rec.seconds) / n if rec.seconds else float("nan")
    return out


def run_state(label: str, model, collator: Collator, stream: list[dict], args, v: torch.Tensor
              ) -> dict[str, Record]:
    """Warm the selectors up, then score every method on `args.batches` large batches."""
    device = next(model.parameters()).device
    selectors = {}
    depth = len(decoder_layers(model))  # --tiny models have fewer layers than some sketches
    for name, over in METHODS.items():
        over = {**over, "sketch_layers": min(over.get("sketch_layers", 1), depth)}
        cfg = SelectorConfig(batch_size=args.b, large_batch_size=args.L, seed=args.seed,
                             **{**over, **({"zo_dim": args.zo_dim} if args.zo_dim else {})})
        selectors[name] = build_selector(model, cfg)
    batches = [collator(stream[i * args.L:(i + 1) * args.L]).to(device)
               for i in range(args.warmup + args.batches)]
    for t in range(args.warmup):
        for sel in selectors.values():
            sel.select(batches[t], step=t)
        print(f"  [{label}] warm-up {t + 1}/{args.warmup}", flush=True)
    records = {name: Record() for name in [*METHODS, REFERENCE]}
    scale = v.sqrt() + 1e-8
    share = selectors["stratified"].tracker.share
    for t in range(args.warmup, args.warmup + args.batches):
        batch = batches[t]
        g = adapter_grads(model, batch, args.micro)
        g_adam = g / scale
        with torch.inference_mode():
            _, fwd_s, fwd_mem = measure(partial(plain_forward, model, batch), device)
        for name, sel in selectors.items():
            s, secs, mem = measure(partial(sel.select, batch, step=t), device)
            rec = records[name]
            rec.err.append(matching_error(g, s.indices, s.weights))
            rec.err_uniform.append(matching_error(g, s.indices, torch.ones_like(s.weights)))
            rec.err_adam.append(matching_error(g_adam, s.indices, s.weights))
            rec.err_adam_uniform.append(matching_error(g_adam, s.indices, torch.ones_like(s.weights)))
            rec.time_ratio.append(secs / fwd_s)
            rec.mem_ratio.append(mem / max(fwd_mem, 1))
            rec.seconds.append(secs)
        for gg, key in ((g, "err"), (g_adam, "err_adam")):
            rows, w = reference_selection(gg, batch.sources, args.b, 0.03, share)
            getattr(records[REFERENCE], key).append(matching_error(gg, rows, w))
            getattr(records[REFERENCE], f"{key}_uniform").append(
                matching_error(gg, rows, torch.ones_like(w)))
        errs = ", ".join(f"{n.split(' (')[0]} {r.err[-1]:.3f}" for n, r in records.items())
        print(f"  [{label}] batch {t - args.warmup + 1}/{args.batches} "
              f"(forward {fwd_s:.1f}s): {errs}", flush=True)
    return records


def markdown(results: dict[str, list[dict]], args, meta: dict) -> str:
    lines = ["# Gradient matching of coresets", "",
             f"Command: `{meta['command']}`", "",
             f"Machine: {meta['machine']}. Model: {meta['model']} ({meta['layers']} layers), "
             f"LoRA r=8, alpha=16 on q,k,v,o ({meta['lora_params']} parameters). "
             f"Data: {meta['data']}. L={args.L}, b={args.b}, max length {args.max_length}, "
             f"{args.batches} measured large batches after {args.warmup} warm-up selections, "
             f"seed {args.seed}. Wall time of the whole run: {meta['wall']:.0f} s.", "",
             "Error = ||G - sum w g / sum w|| / ||G|| against exact per-sample gradients of all "
             "LoRA parameters (lower is better). 'vs strat' = paired mean difference to "
             "stratified over the batches, with its standard error (negative is better). "
             "'closed' = share of the gap between stratified and the reference (facility location "
             "on the exact full LoRA gradients, euclidean) that the method closes. Adam columns "
             "divide every coordinate by sqrt(v) of a short Adam run first. Time and memory are "
             "ratios to one plain inference forward of the same L samples, measured side by side "
             "(memory: peak RSS growth on CPU, peak allocation on GPU).", ""]
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
                f"{r['time_ratio']:.2f} | {r['mem_ratio']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2, a HF folder, a .gguf or tiny:<arch>")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--L", type=int, default=64)
    p.add_argument("--b", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=24)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--micro", type=int, default=8, help="samples per exact-gradient pass")
    p.add_argument("--zo-dim", type=int, default=0, help="override SelectorConfig.zo_dim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny random Llama, L=16, b=8: seconds")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results/gradmatch.md")
    args = p.parse_args(argv)
    if args.tiny:
        args.model, args.L, args.b, args.max_length = "tiny:llama", 16, 8, 64
        args.batches, args.warmup, args.train_steps, args.micro = 2, 1, 3, 8
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    tokenizer = load_tokenizer(args.model)
    collator = Collator(tokenizer, max_length=args.max_length,
                        chat_template=getattr(tokenizer, "chat_template", None) is not None)
    records = read_records(args.data, args.seed)
    need = (args.warmup + args.batches) * args.L
    train_part = records[: args.train_steps * args.train_batch]
    streams = {"zero-initialised (B = 0)": records[len(train_part):len(train_part) + need],
               f"after {args.train_steps} training steps": records[len(train_part) + need:
                                                                   len(train_part) + 2 * need]}
    base = load_model(args.model, device=args.device)
    model = attach_lora(base, r=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    model.to(args.device)
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    zero_state = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    print(f"training the adapter for {args.train_steps} steps (Adam second moments) ...")
    v = train_adapter(model, collator, train_part, args.train_steps, args.train_batch, args.lr)
    trained_state = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    results: dict[str, list[dict]] = {}
    for (label, stream), state in zip(streams.items(), (zero_state, trained_state)):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in state:
                    p.copy_(state[n])
        recs = run_state(label, model, collator, stream, args, v)
        base_rec, ref = recs["stratified"], recs[REFERENCE]
        results[label] = [summarize(n, r, base_rec, ref) for n, r in recs.items()]

    meta = {
        "command": "python bench/gradmatch.py " + " ".join(sys.argv[1:] if argv is None else argv),
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
