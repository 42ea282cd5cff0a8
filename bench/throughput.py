"""What does selection cost next to the training it saves? Everything as ratios measured in one run.

1. Selector vs a plain inference forward (all layers, all logits) of the same L samples of the
   math mixture with SmolLM2-135M + LoRA: samples per second and the ratio, per sketch.
2. Where a colm selection's time goes: the forward up to the top layer, the top-layer passes
   (probes or backward), sparsification, facility location.
3. Facility location alone for L in {64, ..., 1024}.
4. Sparsification memory against the dense ``L x |P|`` matrix it avoids.
5. A trainer step's peak memory at batch b against batch L (each in a fresh process).

    python bench/throughput.py                      # CPU preset: L=16, b=8, length 160
    python bench/throughput.py --preset gpu --out $OUT
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shlex
import statistics
import subprocess
import sys
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
    "cpu": {"L": 16, "b": 8, "max_length": 160, "repeats": 3, "fl_sizes": (64, 128, 256, 512, 1024)},
    "gpu": {"L": 64, "b": 32, "max_length": 512, "repeats": 10, "fl_sizes": (64, 128, 256, 512, 1024)},
}
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
             f"max length {p['max_length']}; medians of {p['repeats']} batches.", "",
             "## Selection against a plain inference forward of the same L samples", "",
             "| sketch | forward | selection | ratio | forward samples/s | selection samples/s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in result["selector"]:
        lines.append(f"| {r['sketch']} | {r['forward_s']:.2f} s | {r['select_s']:.2f} s "
                     f"| {r['ratio']:.2f}x | {r['forward_samples_per_s']:.1f} "
                     f"| {r['select_samples_per_s']:.1f} |")
    lines += ["", "## Where a selection's time goes (share of the selection)", ""]
    parts = list(result["selector"][0]["split"])
    lines += ["| sketch | " + " | ".join(parts) + " |", "|---|" + "---:|" * len(parts)]
    for r in result["selector"]:
        total = sum(r["split"].values())
        lines.append(f"| {r['sketch']} | " + " | ".join(
            f"{r['split'][k] * 1e3:.0f} ms ({r['split'][k] / total:.0%})" for k in parts) + " |")
    lines += ["", "## Facility location alone (n x 2560 features, k = n/2, l1 similarity)", "",
              "| L | time | ratio to L=64 |", "|---:|---:|---:|"]
    lines += [f"| {r['L']} | {r['seconds'] * 1e3:.1f} ms | {r['ratio_to_first']:.1f}x |"
              for r in result["facility"]]
    lines += ["", f"## Sparsification memory (top 2560 coordinates of a zo sketch, L={p['L']})", "",
              "| &#124;P&#124; | dense L x &#124;P&#124; | measured peak | ratio |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['P']:,} | {r['dense_bytes'] / 2**20:.0f} MiB | {r['peak_bytes'] / 2**20:.1f} MiB "
              f"| {r['ratio']:.3f} |" for r in result["sparsify"]]
    t = result["trainer"]
    lines += ["", "## Trainer step memory at b against L (one fwd+bwd, each in a fresh process)", "",
              f"b={p['b']}: +{t['b']['peak_bytes'] / 2**20:.0f} MiB; "
              f"L={p['L']}: +{t['L']['peak_bytes'] / 2**20:.0f} MiB; "
              f"ratio **{t['ratio']:.2f}** (target <= 0.55). "
              "Peak above the loaded model: " + ("CUDA max allocated." if "no GPU" not in result["machine"]
                                                 else "resident memory, sampled every ms.")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=PRESETS, default="cpu")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = attach_lora(load_model(MODEL, dtype=dtype, device=device), r=8, alpha=16, targets=TARGETS)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    collator = Collator(load_tokenizer(MODEL), max_length=preset["max_length"], chat_template=True)
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "no GPU"
    result = {
        "command": "python bench/throughput.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "preset_name": args.preset, "preset": preset,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {gpu}",
        "selector": selector_vs_forward(model, collator, preset, device),
        "facility": facility_times(preset["fl_sizes"], device=device),
        "sparsify": sparsify_memory(preset["L"], (576 * 192, 2048 * 2048, 4096 * 4096), device=device),
    }
    del model
    result["trainer"] = trainer_memory(preset["b"], preset["L"], preset["max_length"])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"throughput-{args.preset}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
