"""How many selector processors does a job need, and what do selector replicas buy?

1. Selection throughput of the default selection with 1 and 2 replicas (torch.distributed,
   gloo on CPU; each replica scores its share of every large batch, the sketches are gathered,
   facility location runs on the whole batch), against 1 process using the same cores.
2. Per-sample costs, measured side by side in one process: a plain inference forward of L
   samples, the selection of L samples per sketch, a LoRA training step (forward, backward,
   AdamW) on b samples, facility location on W*L gathered samples.
3. A model from those costs: the selector processors R a job of W trainer processors needs so
   that trainers never wait, ``R >= W * select(L) / (train(b) - fl(W*L))``.

    python bench/scaleout.py                 # SmolLM2-135M-Instruct, L=16, b=8, length 160
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from colm_client.loss import weighted_loss
from colm_server.data.collate import Collator
from colm_server.model.load import attach_lora, load_model, load_tokenizer
from colm_server.select import SelectorConfig, build_selector
from colm_server.select.facility import facility_location, pairwise_similarity
from colm_stream.launch import free_port

MIXTURE = Path(__file__).resolve().parents[2] / "shared/data/math-mixture/train.jsonl"
MODEL = "smollm2"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
SKETCHES = {
    "colm (default: exact, all layers, D=1024)": {"strategy": "colm"},
    "colm exact, top 4 layers": {"strategy": "colm", "sketch_layers": 4},
    "colm-paper (zo K=1, last v_proj)": {"strategy": "colm-paper"},
}


def large_batches(collator: Collator, L: int, count: int) -> list:
    """``count`` large batches of L records of the mixture in a fixed shuffled order."""
    rows = [json.loads(line) for line in MIXTURE.open()]
    random.Random(0).shuffle(rows)
    return [collator(rows[i * L:(i + 1) * L]) for i in range(count)]


def lora_model(device: str = "cpu"):
    return attach_lora(load_model(MODEL, device=device), r=8, alpha=16, targets=TARGETS).to(device)


def _replica(rank: int, world: int, port: int, threads: int, args: dict, out: str) -> None:
    """One replica: select every batch with scoring split over the group; rank 0 keeps times."""
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(minutes=30))
    try:
        model = lora_model().eval()
        for p in model.parameters():
            p.requires_grad_(False)
        collator = Collator(load_tokenizer(MODEL), max_length=args["max_length"], chat_template=True)
        batches = large_batches(collator, args["L"], args["steps"] + 1)
        selector = build_selector(model, SelectorConfig(batch_size=args["b"], large_batch_size=args["L"]),
                                  replicas=world > 1)
        selector.select(batches[0], step=0)  # warm-up
        seconds = []
        for step, batch in enumerate(batches[1:], 1):
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
            selection = selector.select(batch, step=step)
            seconds.append(time.perf_counter() - start)
            if rank == 0:
                print(f"  {world} replica(s) x {threads} thread(s), step {step}: {seconds[-1]:.2f}s",
                      flush=True)
        if rank == 0:
            Path(out).write_text(json.dumps({"seconds": seconds, "last": selection.indices.tolist()}))
    finally:
        if world > 1:
            dist.destroy_process_group()


def replica_throughput(world: int, threads: int, args: dict, tmp: Path) -> dict:
    out = tmp / f"replicas-{world}x{threads}.json"
    port = free_port()
    mp.spawn(_replica, args=(world, port, threads, args, str(out)), nprocs=world, join=True)
    got = json.loads(out.read_text())
    med = statistics.median(got["seconds"])
    return {"replicas": world, "threads": threads, "median_s": med, "samples_per_s": args["L"] / med,
            "seconds": got["seconds"], "last": got["last"]}


def per_sample_costs(args: dict) -> dict:
    """Medians over interleaved repeats: forward of L, selection of L per sketch, a training
    step on b; all in this process with its threads."""
    L, b = args["L"], args["b"]
    collator = Collator(load_tokenizer(MODEL), max_length=args["max_length"], chat_template=True)
    batches = large_batches(collator, L, args["steps"] + 1)
    scorer_model = lora_model().eval()
    for p in scorer_model.parameters():
        p.requires_grad_(False)
    selectors = {name: build_selector(scorer_model, SelectorConfig(batch_size=b, large_batch_size=L, **o))
                 for name, o in SKETCHES.items()}
    trainee = lora_model().train()
    params = [p for n, p in trainee.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW(params, lr=1e-4)

    @torch.inference_mode()
    def forward(batch):
        return scorer_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    def train_step(batch):
        sub = batch.subset(list(range(b)))
        logits = trainee(input_ids=sub.input_ids, attention_mask=sub.attention_mask).logits
        weighted_loss(logits, sub.labels, torch.ones(b)).backward()
        opt.step()
        opt.zero_grad()

    def clock(fn, *a, **k) -> float:
        start = time.perf_counter()
        fn(*a, **k)
        return time.perf_counter() - start

    for sel in selectors.values():
        sel.select(batches[0], step=0)
    train_step(batches[0])
    forward(batches[0])
    times: dict[str, list[float]] = {"forward": [], "train": [], **{n: [] for n in selectors}}
    for step, batch in enumerate(batches[1:], 1):
        times["forward"].append(clock(forward, batch))
        times["train"].append(clock(train_step, batch))
        for name, sel in selectors.items():
            times[name].append(clock(sel.select, batch, step=step))
        print(f"  costs, batch {step}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
              flush=True)
    return {k: statistics.median(v) for k, v in times.items()}


def facility_seconds(n: int, sources: int, keep: float, dim: int = 1024, repeats: int = 3) -> float:
    """Facility location on n gathered samples split into equal sources, k = keep * size each."""
    gen = torch.Generator().manual_seed(n)
    feats = torch.randn(n, dim, generator=gen)
    size = max(n // sources, 1)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for s in range(0, n, size):
            part = feats[s:s + size]
            facility_location(pairwise_similarity(part, "euclidean"), max(int(len(part) * keep), 1))
        best = min(best, time.perf_counter() - start)
    return best


def capacity_model(costs: dict, args: dict, workers=(1, 2, 4, 8, 16)) -> list[dict]:
    """Selector processors per job so that a step's selection is ready before the trainers need it."""
    L, b = args["L"], args["b"]
    rows = []
    for name in SKETCHES:
        for w in workers:
            fl = facility_seconds(w * L, sources=8, keep=b / L)
            slack = costs["train"] - fl
            need = w * costs[name] / slack if slack > 0 else math.inf
            rows.append({"sketch": name, "W": w, "facility_s": fl, "replicas": need,
                         "per_trainer": need / w})
    return rows


def markdown(result: dict) -> str:
    a, c = result["args"], result["costs"]
    lines = ["# Selector scale-out", "", f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']}. SmolLM2-135M-Instruct + LoRA r=8 (q, k, v, o), "
             f"L={a['L']}, b={a['b']}, max length {a['max_length']}; medians over {a['steps']} large "
             f"batches after one warm-up. Wall time {result['wall']:.0f} s.", "",
             "## Replicas on this machine", "",
             "The default selection; each replica scores its share of every large batch and "
             "the sketches are all-gathered (gloo). Same cores in every row.", "",
             "| replicas x threads | seconds per selection | samples/s | vs 1 x all threads |",
             "|---|---:|---:|---:|"]
    base = result["replicas"][0]["median_s"]
    for r in result["replicas"]:
        lines.append(f"| {r['replicas']} x {r['threads']} | {r['median_s']:.2f} | "
                     f"{r['samples_per_s']:.2f} | {base / r['median_s']:.2f}x |")
    same = all(r["last"] == result["replicas"][0]["last"] for r in result["replicas"])
    lines += ["", f"Every row selected the same samples on the last batch: {same}.", "",
              "## Per-sample costs (one process, all threads)", "",
              "| what | seconds | per sample | / forward of L |", "|---|---:|---:|---:|",
              f"| plain inference forward of L={a['L']} | {c['forward']:.2f} | "
              f"{c['forward'] / a['L']:.3f} | 1.00 |",
              f"| LoRA training step on b={a['b']} (fwd, bwd, AdamW) | {c['train']:.2f} | "
              f"{c['train'] / a['b']:.3f} | {c['train'] / c['forward']:.2f} |"]
    for name in SKETCHES:
        lines.append(f"| selection of L={a['L']}: {name} | {c[name]:.2f} | {c[name] / a['L']:.3f} | "
                     f"{c[name] / c['forward']:.2f} |")
    lines += ["", "## Selector processors a job needs", "",
              "A step's selection for W trainer processors scores W*L samples; with R replicas each "
              "scores W*L/R, then facility location runs once on the W*L gathered samples (here: 8 "
              "equal sources, keeping b/L of each). Trainers never wait when "
              "`W * select(L) / R + fl(W*L) <= train(b)`, i.e. `R >= W * select(L) / (train(b) - "
              "fl(W*L))`, with the costs above (same processor type for selector and trainers; "
              "gather and scheduling overheads not included). Costs measured on this CPU; on a "
              "GPU the ratios differ and should be measured there.", "",
              "| sketch | W | fl(W*L) s | R needed | R per trainer |", "|---|---:|---:|---:|---:|"]
    for r in result["model"]:
        lines.append(f"| {r['sketch']} | {r['W']} | {r['facility_s']:.3f} | {r['replicas']:.2f} | "
                     f"{r['per_trainer']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--L", type=int, default=16)
    p.add_argument("--b", type=int, default=8)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results/scaleout.md")
    ns = p.parse_args(argv)
    args = {"L": ns.L, "b": ns.b, "max_length": ns.max_length, "steps": ns.steps}
    cores = os.cpu_count() or 1
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        replicas = [replica_throughput(1, cores, args, Path(tmp))]
        if cores >= 2:
            replicas.append(replica_throughput(2, cores // 2, args, Path(tmp)))
            replicas.append(replica_throughput(1, cores // 2, args, Path(tmp)))
    torch.set_num_threads(cores)
    costs = per_sample_costs(args)
    result = {
        "command": "python bench/scaleout.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.machine()}, {cores} cores, no GPU" if not torch.cuda.is_available()
        else torch.cuda.get_device_name(),
        "args": args, "replicas": replicas, "costs": costs, "model": capacity_model(costs, args),
        "wall": time.perf_counter() - start,
    }
    text = markdown(result)
    ns.out.write_text(text)
    ns.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(text)
    return result


if __name__ == "__main__":
    main()
