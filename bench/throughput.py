"""What does selection cost next to the training it saves? Everything as ratios measured in one run.

1. Selector vs a plain inference forward (all layers, all logits) of the same L samples of the
   math mixture with SmolLM2-135M + LoRA: samples per second and the ratio, per sketch.
2. Where a colm selection's time goes: the forward up to the top layer, the top-layer passes
   (probes or backward), sparsification, facility location.
3. Facility location alone for L in {64, ..., 1024}.
4. Facility location before and after its rewrite (cdist + dense greedy against Gram matrix +
   incremental greedy), side by side, at L in {256, 1024} and the selector's budgets.
5. Sparsification memory against the dense ``L x |P|`` matrix it avoids.
6. A trainer step's peak memory at batch b against batch L (each in a fresh process).

    python bench/throughput.py                      # CPU preset: L=16, b=8, length 160
    python bench/throughput.py --preset gpu --out $OUT
    OMP_NUM_THREADS=1 python bench/throughput.py --only facility-compare   # updates that section
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

from colm_client.loss import weighted_loss
from colm_server.data.collate import Collator
from colm_server.model.load import attach_lora, load_model, load_tokenizer
from colm_server.select import SelectorConfig, build_selector
from colm_server.select.facility import facility_location, pairwise_similarity
from colm_server.select.sketch import LowRankSketch
from colm_server.select.sparsify import top_coordinates
from measure import measure

MIXTURE = Path(__file__).resolve().parents[2] / "shared/data/math-mixture/train.jsonl"
MODEL = "smollm2"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
PRESETS = {
    "cpu": {"L": 16, "b": 8, "max_length": 160, "repeats": 3, "fl_sizes": (64, 128, 256, 512, 1024),
            "fl_compare": (256, 1024), "fl_repeats": 5},
    "gpu": {"L": 64, "b": 32, "max_length": 512, "repeats": 10, "fl_sizes": (64, 128, 256, 512, 1024),
            "fl_compare": (256, 1024), "fl_repeats": 5},
}
SECTIONS = ("selector", "facility", "facility-compare", "sparsify", "trainer")
SKETCHES = {
    "colm (default: exact, all layers, D=1024)": {"strategy": "colm"},
    "colm exact, top 4 layers": {"strategy": "colm", "sketch_layers": 4},
    "colm-paper (zo K=1)": {"strategy": "colm-paper"},
}


def records(n: int, offset: int = 0) -> list[dict]:
    """Rows ``offset .. offset + n`` of the mixture in a fixed shuffled order: batches of every
    source, as the service draws them (the file itself is sorted by source)."""
    rows = [json.loads(line) for line in MIXTURE.open()]
    random.Random(0).shuffle(rows)
    if len(rows) < offset + n:
        raise ValueError(f"{MIXTURE} has fewer than {offset + n} rows")
    return rows[offset:offset + n]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    _, seconds, _ = measure(fn, device)
    return seconds


def selector_vs_forward(model, collator, preset: dict, device: torch.device) -> list[dict]:
    """Median selection time per sketch against the median plain forward, batches alternating."""
    L, b = preset["L"], preset["b"]
    batches = [collator(records(L, offset=i * L)).to(device) for i in range(preset["repeats"] + 1)]

    @torch.inference_mode()
    def forward(batch):
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    rows = []
    for name, overrides in SKETCHES.items():
        config = SelectorConfig(batch_size=b, large_batch_size=L, **overrides)
        selector = build_selector(model, config)
        selector.select(batches[0], step=0)  # warm-up: first-call allocations, normaliser state
        fwd, sel, split = [], [], []
        for step, batch in enumerate(batches[1:], 1):
            fwd.append(timed(partial(forward, batch), device))
            prefix = timed(partial(selector.scorer.prefix, batch), device)
            selection, seconds, _ = measure(partial(selector.select, batch, step=step), device)
            sel.append(seconds)
            t = selection.stats["timings"]
            split.append({"forward below the sketched layers": prefix,
                          "sketched-layer passes": t["sketch"] - prefix,
                          "features": t["features"], "facility location": t["facility"],
                          "budgets and the rest": t["total"] - t["sketch"] - t["features"] - t["facility"]})
        f, s = statistics.median(fwd), statistics.median(sel)
        rows.append({"sketch": name, "forward_s": f, "select_s": s, "ratio": s / f,
                     "forward_samples_per_s": L / f, "select_samples_per_s": L / s,
                     "split": {k: statistics.median(d[k] for d in split) for k in split[0]}})
        print(f"{name}: select {s:.2f}s vs forward {f:.2f}s = {s / f:.2f}x")
    return rows


CPU = torch.device("cpu")


def facility_times(sizes, dim: int = 2560, device: torch.device = CPU) -> list[dict]:
    """Similarity + greedy facility location on [n, dim] clustered features, k = n / 2."""
    gen = torch.Generator().manual_seed(0)
    warm = torch.randn(32, dim, device=device)
    facility_location(pairwise_similarity(warm, "l1"), 16)  # first-call costs out of the timings
    rows = []
    for n in sizes:
        centers = torch.randn(16, dim, generator=gen)
        x = (centers[torch.randint(16, (n,), generator=gen)] + 0.3 * torch.randn(n, dim, generator=gen))
        x = x.to(device)
        run = partial(lambda x, k: facility_location(pairwise_similarity(x, "l1"), k), x, n // 2)
        runs = [timed(run, device) for _ in range(3)]
        rows.append({"L": n, "seconds": statistics.median(runs)})
        print(f"facility location L={n}: {rows[-1]['seconds'] * 1e3:.1f} ms")
    base = rows[0]["seconds"]
    for row in rows:
        row["ratio_to_first"] = row["seconds"] / base
    return rows


def facility_before(x: torch.Tensor, metric: str) -> torch.Tensor:
    """The similarity as it was computed before the Gram matrix: cdist over every difference."""
    dist = torch.cdist(x, x, p=1.0 if metric == "l1" else 2.0, compute_mode="donot_use_mm_for_euclid_dist")
    dist.fill_diagonal_(0.0)
    return dist.max() - dist


def coverage(sim: torch.Tensor, picks: torch.Tensor) -> float:
    """F(S) = sum_i max_{s in S} sim[i, s], the objective both greedy methods maximise."""
    return float(sim[:, picks].max(dim=1).values.double().sum())


def weighted_set(order: torch.Tensor, counts: torch.Tensor) -> dict[int, int]:
    """The selection as training sees it: each picked row's weight, whatever the order of picking."""
    return dict(zip(order.tolist(), counts.tolist()))


def facility_compare(sizes, repeats: int, dim: int = SelectorConfig().sketch_dim,
                     device: torch.device = CPU) -> list[dict]:
    """Before (cdist, dense greedy) and after (Gram matrix, incremental greedy), alternating, on one
    source of ``L`` clustered ``[L, sketch_dim]`` features, at the selector's b/L of 1/2 and 1/4."""
    gen = torch.Generator().manual_seed(0)
    ways = {"before": (facility_before, "dense"), "after": (pairwise_similarity, "incremental")}
    rows = []
    for n in sizes:
        centers = torch.randn(16, dim, generator=gen)
        x = (centers[torch.randint(16, (n,), generator=gen)] + 0.3 * torch.randn(n, dim, generator=gen))
        x = x.to(device)
        for metric in ("euclidean", "l1"):
            for k in (n // 2, n // 4):
                times = {w: {"similarity": [], "greedy": [], "cpu": []} for w in ways}
                picks = {}
                for _ in range(repeats):
                    for way, (similarity, method) in ways.items():
                        sync(device)
                        cpu, t0 = time.process_time(), time.perf_counter()
                        sim = similarity(x, metric)
                        sync(device)
                        t1 = time.perf_counter()
                        picks[way] = facility_location(sim, k, method=method)
                        sync(device)
                        times[way]["similarity"].append(t1 - t0)
                        times[way]["greedy"].append(time.perf_counter() - t1)
                        times[way]["cpu"].append(time.process_time() - cpu)
                med = {w: {part: statistics.median(v) for part, v in t.items()} for w, t in times.items()}
                cpu_s = {w: med[w].pop("cpu") for w in ways}
                before_sim = facility_before(x, metric)
                on_same = facility_location(before_sim, k)  # incremental greedy, before's similarity
                differs = (picks["before"][0] != picks["after"][0]).nonzero()
                row = {"L": n, "similarity": metric, "k": k, "dim": dim, "split": med,
                       "before_s": sum(med["before"].values()), "after_s": sum(med["after"].values()),
                       "before_cpu_s": cpu_s["before"], "after_cpu_s": cpu_s["after"],
                       "same_picks_on_same_similarity": all(
                           torch.equal(a, b) for a, b in zip(on_same, picks["before"])),
                       "same_picks": len(differs) == 0 and torch.equal(picks["before"][1], picks["after"][1]),
                       "same_weighted_set": weighted_set(*picks["before"]) == weighted_set(*picks["after"]),
                       "first_different_pick": int(differs[0]) if len(differs) else None,
                       "coverage_ratio": coverage(before_sim, picks["after"][0])
                       / coverage(before_sim, picks["before"][0])}
                row["ratio"] = row["before_s"] / row["after_s"]
                rows.append(row)
                print(f"facility location L={n} {metric} k={k}: before {row['before_s'] * 1e3:.1f} ms, "
                      f"after {row['after_s'] * 1e3:.1f} ms (CPU time {row['after_cpu_s'] * 1e3:.1f} ms), "
                      f"{row['ratio']:.1f}x faster")
    return rows


def sparsify_memory(L: int, dims, k: int = 2560, device: torch.device = CPU) -> list[dict]:
    """Peak memory of choosing the top-k coordinates from a zo sketch of |P| = dim, vs L x dim floats."""
    rows = []
    groups = [torch.arange(0, L // 2), torch.arange(L // 2, L)]
    for dim in dims:
        sketch = LowRankSketch(torch.randn(L, 1, device=device), torch.randn(1, dim, device=device))
        _, seconds, peak = measure(lambda s=sketch: top_coordinates(s, None, groups, k), device)
        dense = L * dim * 4
        rows.append({"P": dim, "dense_bytes": dense, "peak_bytes": peak, "ratio": peak / dense,
                     "seconds": seconds})
        print(f"sparsify |P|={dim}: peak {peak / 2**20:.1f} MiB vs dense {dense / 2**20:.0f} MiB")
    return rows


def train_step_peak(n: int, max_length: int) -> dict:
    """Run in a fresh process: one LoRA fwd+bwd of n samples; the peak memory the step added."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = attach_lora(load_model(MODEL, device=device), r=8, alpha=16, targets=TARGETS).train()
    collator = Collator(load_tokenizer(MODEL), max_length=max_length, chat_template=True)
    batch = collator(records(n)).to(device)

    def step():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        weighted_loss(logits, batch.labels, torch.ones(n, device=device)).backward()

    _, seconds, peak = measure(step, device)
    return {"n": n, "peak_bytes": peak, "seconds": seconds, "tokens": int(batch.attention_mask.sum())}


def trainer_memory(b: int, L: int, max_length: int) -> dict:
    out = {}
    for n in (b, L):
        code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                "from throughput import train_step_peak; "
                f"print(json.dumps(train_step_peak({n}, {max_length})))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        out[n] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"trainer step at n={n}: peak +{out[n]['peak_bytes'] / 2**20:.0f} MiB")
    return {"b": out[b], "L": out[L], "ratio": out[b]["peak_bytes"] / out[L]["peak_bytes"]}


def markdown(result: dict) -> str:
    p = result["preset"]
    lines = [f"# Selection throughput and memory: preset `{result['preset_name']}`", "",
             f"Command: `{result['command']}`  ", f"Machine: {result['machine']}", "",
             f"SmolLM2-135M-Instruct + LoRA r=8 (q, k, v, o), L={p['L']} samples of the math mixture, "
             f"max length {p['max_length']}; medians of {p['repeats']} batches.", ""]
    blocks = [block for section in SECTIONS for block in BLOCKS[section](result)]
    return "\n".join(lines) + "\n" + "\n".join(blocks)


def selector_blocks(result: dict) -> list[str]:
    lines = ["## Selection against a plain inference forward of the same L samples", "",
             "| sketch | forward | selection | ratio | forward samples/s | selection samples/s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in result["selector"]:
        lines.append(f"| {r['sketch']} | {r['forward_s']:.2f} s | {r['select_s']:.2f} s "
                     f"| {r['ratio']:.2f}x | {r['forward_samples_per_s']:.1f} "
                     f"| {r['select_samples_per_s']:.1f} |")
    split = ["## Where a selection's time goes (share of the selection)", ""]
    parts = list(result["selector"][0]["split"])
    split += ["| sketch | " + " | ".join(parts) + " |", "|---|" + "---:|" * len(parts)]
    for r in result["selector"]:
        total = sum(r["split"].values())
        split.append(f"| {r['sketch']} | " + " | ".join(
            f"{r['split'][k] * 1e3:.0f} ms ({r['split'][k] / total:.0%})" for k in parts) + " |")
    return [_block(lines), _block(split)]


def facility_blocks(result: dict) -> list[str]:
    lines = ["## Facility location alone (n x 2560 features, k = n/2, l1 similarity)", "",
             "| L | time | ratio to L=64 |", "|---:|---:|---:|"]
    lines += [f"| {r['L']} | {r['seconds'] * 1e3:.1f} ms | {r['ratio_to_first']:.1f}x |"
              for r in result["facility"]]
    return [_block(lines)]


def facility_compare_blocks(result: dict) -> list[str]:
    rows = result["facility_compare"]
    lines = ["## Facility location before and after: cdist + dense greedy against Gram matrix + "
             "incremental greedy", "",
             f"One source of L clustered [L, {rows[0]['dim']}] features (sketch_dim), k = L/2 and L/4 "
             "(the selector's b/L); medians of runs alternating before and after; each time is "
             "similarity + greedy, wall clock; CPU time is this process's, less sensitive to a "
             "shared machine. *Same similarity*: the incremental greedy on the old similarity makes "
             "the dense greedy's picks. *End to end*: the new similarity gives the same picks; or the same "
             "rows and weights picked in another order; or the first pick that differs and the coverage "
             "F(S) reached, on the old similarity, relative to the old picks'.", "",
             "| L | similarity | k | before | after | speed-up | after, CPU time | same similarity "
             "| end to end |", "|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        times = [f"{r[f'{w}_s'] * 1e3:.1f} ms ({r['split'][w]['similarity'] * 1e3:.1f} + "
                 f"{r['split'][w]['greedy'] * 1e3:.1f})" for w in ("before", "after")]
        end = ("same picks" if r["same_picks"] else
               f"same rows and weights, order from pick {r['first_different_pick']}"
               if r["same_weighted_set"] else
               f"differ from pick {r['first_different_pick']}; F {r['coverage_ratio'] - 1:+.1e}")
        same = "same picks" if r["same_picks_on_same_similarity"] else "DIFFERENT PICKS"
        lines.append(f"| {r['L']} | {r['similarity']} | {r['k']} | {times[0]} | {times[1]} "
                     f"| {r['ratio']:.1f}x | {r['after_cpu_s'] * 1e3:.1f} ms | {same} | {end} |")
    return [_block(lines)]


def sparsify_blocks(result: dict) -> list[str]:
    lines = [f"## Sparsification memory (top 2560 coordinates of a zo sketch, L={result['preset']['L']})",
             "", "| &#124;P&#124; | dense L x &#124;P&#124; | measured peak | ratio |",
             "|---:|---:|---:|---:|"]
    lines += [f"| {r['P']:,} | {r['dense_bytes'] / 2**20:.0f} MiB | {r['peak_bytes'] / 2**20:.1f} MiB "
              f"| {r['ratio']:.3f} |" for r in result["sparsify"]]
    return [_block(lines)]


def trainer_blocks(result: dict) -> list[str]:
    p, t = result["preset"], result["trainer"]
    peak = ("CUDA max allocated." if "no GPU" not in result["machine"]
            else "resident memory, sampled every ms.")
    return [_block(["## Trainer step memory at b against L (one fwd+bwd, each in a fresh process)", "",
                    f"b={p['b']}: +{t['b']['peak_bytes'] / 2**20:.0f} MiB; "
                    f"L={p['L']}: +{t['L']['peak_bytes'] / 2**20:.0f} MiB; "
                    f"ratio **{t['ratio']:.2f}** (target <= 0.55). Peak above the loaded model: {peak}"])]


BLOCKS = {"selector": selector_blocks, "facility": facility_blocks,
          "facility-compare": facility_compare_blocks, "sparsify": sparsify_blocks,
          "trainer": trainer_blocks}


def _block(lines: list[str]) -> str:
    return "\n".join(lines) + "\n"


def splice(text: str, block: str, run: dict) -> str:
    """``text`` with ``block`` in place of the block under the same heading (appended if none),
    its run named under the heading, since the file's header describes another run."""
    heading, rest = block.split("\n", 1)
    block = (f"{heading}\n\nRun alone: `{run['command']}`; {run['machine']}; "
             f"load average {run['load_average']:.1f} on {os.cpu_count()} cores when it started.\n{rest}")
    start = text.find(heading + "\n")
    if start < 0:
        return text.rstrip("\n") + "\n\n" + block
    end = text.find("\n## ", start + len(heading))
    return text[:start] + block + (text[end:] if end >= 0 else "")


def run_sections(sections, preset: dict, device: torch.device) -> dict:
    """Each section's figures, under the JSON key named after it."""
    out = {}
    if "selector" in sections:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = attach_lora(load_model(MODEL, dtype=dtype, device=device), r=8, alpha=16, targets=TARGETS)
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        collator = Collator(load_tokenizer(MODEL), max_length=preset["max_length"], chat_template=True)
        out["selector"] = selector_vs_forward(model, collator, preset, device)
        del model
    if "facility" in sections:
        out["facility"] = facility_times(preset["fl_sizes"], device=device)
    if "facility-compare" in sections:
        out["facility_compare"] = facility_compare(preset["fl_compare"], preset["fl_repeats"], device=device)
    if "sparsify" in sections:
        out["sparsify"] = sparsify_memory(preset["L"], (576 * 192, 2048 * 2048, 4096 * 4096), device=device)
    if "trainer" in sections:
        out["trainer"] = trainer_memory(preset["b"], preset["L"], preset["max_length"])
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=PRESETS, default="cpu")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--only", nargs="+", choices=SECTIONS,
                   help="run these sections and update them in the existing results, keeping the rest")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "no GPU"
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    run = {"command": f"{threads}python bench/throughput.py "
                      + shlex.join(argv if argv is not None else sys.argv[1:]),
           "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {gpu}",
           "load_average": os.getloadavg()[0]}
    stem = args.out / f"throughput-{args.preset}"
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only is None:
        result = {**run, "preset_name": args.preset, "preset": preset,
                  **run_sections(SECTIONS, preset, device)}
        text = markdown(result)
    else:
        result = json.loads(stem.with_suffix(".json").read_text())
        text = stem.with_suffix(".md").read_text()
        ran = run_sections(args.only, preset, device)
        result.update(ran, preset=preset)
        result.setdefault("runs_alone", {}).update({section: run for section in args.only})
        for section in args.only:
            for block in BLOCKS[section](result):
                text = splice(text, block, run)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
