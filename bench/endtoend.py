"""Does coreset training pay? Held-out loss against what a user would do instead, paired by seed.

For every seed and every ratio L/b, LoRA is trained on the same stream from the same initial
adapter, once per way of choosing what a step trains on:

    colm        the default selector: b of L, whole-adapter gradient sketch, facility location
    colm-paper  CoLM as published: b of L, zo K=1 on the last v_proj, unweighted
    stratified  b of L, per source in proportion, small sources kept, weighted by stratum size
    stratified-uniform  the same b, trained unweighted like colm-paper (``weighting: uniform``):
                what colm-paper's mixture gives without a selector
    random      b of L, uniform
    full        all L, accumulated in micro-batches of b: the exact large-batch gradient at the
                trainer memory of b

under the target mixtures ``stream`` and ``balanced`` (``selector.mixture``; colm-paper and
stratified-uniform train unweighted, so each is one run under both). Every run warms up, then
decays its learning rate on a cosine to its own last step, as `colm-train` does, and is scored
on a fixed held-out set per source at its end (and along the way, for the plot). Runs are
compared at equal steps and at equal cost: trainer-seconds (a selector on hardware of its own is
free) and total processor-seconds (selector plus trainer). For an equal-cost pair the cheaper
way of training is run again for as many steps as colm's cost buys it, its schedule ending
there, as a user with that budget would run it. Costs per step are measured side by side in one
phase before the runs, on one thread, so runs made at different times on a busy machine are
charged alike.

    python bench/endtoend.py                        # tiny model, synthetic mixture, 16 seeds
    python bench/endtoend.py --seeds 0 1 --steps 40 # a quick look
    python bench/endtoend.py --preset smollm2 --device cuda --seeds 0 1 2
    python bench/endtoend.py --scorer-layers 1 --work /tmp/e2e-proxy --out bench/results/endtoend-proxy.md
    python bench/endtoend.py --scorer-layers 1 --scorer-adapter own --work /tmp/e2e-own \
        --out bench/results/endtoend-proxy-own.md

The runs use the library path of the service: the selection engine (`build_selector`), the
client's loss and micro-batch accumulation (`backward_micro_batches`), and a selector model of
its own whose adapter is refreshed from the trainer's every ``push_every`` steps, as the
trainers' adapter pushes refresh the service's. The gRPC hop is left out (its cost per step is
in `results/service.md`); so is tokenisation, which every run pays alike.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import multiprocessing
import platform
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import torch

from colm_client import backward_micro_batches
from colm_server.data.collate import Collator
from colm_server.data.synthetic import TASKS, synthetic_stream
from colm_server.model.load import attach_lora, load_model, load_tokenizer
from colm_server.select import SelectorConfig, build_selector
from colm_stream.evaluate import source_losses
from colm_stream.train import lr_lambda
from endtoend_report import UNWEIGHTED, equal_cost_steps, render
from finetune import read_jsonl

MIXTURE_DIR = Path(__file__).resolve().parents[2] / "shared/data/math-mixture"
RUNS = ("colm", "colm-paper", "stratified", "stratified-uniform", "random", "full")
MIXTURES = ("stream", "balanced")
EXTENDED = ("stratified", "full")  # also run at colm's cost, for the equal-cost pairs


@dataclass(frozen=True)
class Preset:
    """A model, a mixture and the training settings of every run."""

    data: str  # "synthetic" or "math-mixture"
    model: str  # "demo-base" (the demo's pretrained tiny Llama) or a load_model source
    b: int
    ratios: tuple[int, ...]
    steps: int
    lr: float
    warmup: int
    lora_r: int
    lora_targets: tuple[str, ...]
    max_length: int
    heldout_per_source: int
    push_every: int
    curve_points: int  # evaluations along each run (the last at its end)
    seeds: tuple[int, ...]
    runs: tuple[str, ...] = RUNS
    mixtures: tuple[str, ...] = MIXTURES
    scorer_layers: int = 0  # colm scores with an early-exit proxy of this many layers (0: the model)
    scorer_adapter: str = "pushed"  # colm's scorer: the trainer's adapter, or its own trained on its coresets


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRESETS = {
    # The demo's setup (tiny Llama, 8 synthetic tasks, 48:1 imbalance); 16 seeds give a paired SE of
    # about a tenth of the random-b to full-L gap when the paired sd is near 0.04 (the demo's).
    "tiny": Preset(data="synthetic", model="demo-base", b=8, ratios=(2, 4), steps=120, lr=3e-3,
                   warmup=5, lora_r=16, lora_targets=ALL_LINEAR, max_length=64,
                   heldout_per_source=32, push_every=10, curve_points=3, seeds=tuple(range(16))),
    # SmolLM2-135M on the real math mixture, the key pairs only (colm against stratified, and
    # against full L at equal cost): 20-45 s a step on one CPU thread, a minute per evaluation.
    "smollm2": Preset(data="math-mixture", model="smollm2", b=8, ratios=(2,), steps=16, lr=5e-4,
                      warmup=3, lora_r=8, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                      max_length=128, heldout_per_source=4, push_every=8, curve_points=1,
                      seeds=(0, 1), runs=("colm", "stratified", "full"), mixtures=("stream",)),
}


@dataclass(frozen=True)
class RunSpec:
    """One training run of one seed: ``steps`` optimizer steps, the schedule ending at the last."""

    name: str  # a RUNS entry
    mixture: str
    ratio: int
    seed: int
    steps: int
    eval_steps: tuple[int, ...]


# ---------------------------------------------------------------------------------------------
# Data and model


def training_stream(preset: Preset, seed: int) -> Iterator[dict]:
    """The seed's endless record stream: the same for every run of that seed."""
    if preset.data == "synthetic":
        return synthetic_stream(seed=10_000 + seed)
    rows = read_jsonl(MIXTURE_DIR / "train.jsonl")
    random.Random(seed).shuffle(rows)
    return itertools.cycle(rows)


def source_counts(preset: Preset) -> dict[str, int]:
    """Per-source counts of the training data, as a manifest gives them to the service."""
    if preset.data == "synthetic":
        return {s: 250 * size for s, (_, size) in TASKS.items()}  # 12,000 records
    counts: dict[str, int] = {}
    for row in read_jsonl(MIXTURE_DIR / "train.jsonl"):
        counts[row["source"]] = counts.get(row["source"], 0) + 1
    return counts


def stream_shares(preset: Preset) -> dict[str, float]:
    """Each source's share of the training data."""
    counts = source_counts(preset)
    return {s: n / sum(counts.values()) for s, n in counts.items()}


def heldout(preset: Preset) -> list[dict]:
    """A fixed held-out set, ``heldout_per_source`` records of every source."""
    if preset.data == "synthetic":
        from colm_stream.demo import heldout_records
        return heldout_records(preset.heldout_per_source, seed=0)
    per: dict[str, list[dict]] = {}
    for row in read_jsonl(MIXTURE_DIR / "heldout.jsonl"):
        bucket = per.setdefault(row["source"], [])
        if len(bucket) < preset.heldout_per_source:
            bucket.append(row)
    return [r for s in sorted(per) for r in per[s]]


def base_model_source(preset: Preset, work: Path) -> str:
    """A path or name `load_model` takes; the demo's base is pretrained once into ``work``."""
    if preset.model != "demo-base":
        return preset.model
    from colm_stream.demo.base import pretrain_base
    folder = work / "base"
    if not (folder / "config.json").is_file():
        pretrain_base(folder, max_length=preset.max_length, seed=0)
    return str(folder)


class Setup:
    """What every run of one process shares: the base model, the collator, the held-out set."""

    def __init__(self, preset: Preset, work: Path, device: str):
        self.preset, self.work, self.device = preset, work, torch.device(device)
        self.source = base_model_source(preset, work)
        self.collator = Collator(load_tokenizer(self.source), max_length=preset.max_length,
                                 chat_template=True)
        self.base = load_model(self.source, device=self.device)
        self.heldout = heldout(preset)
        self.counts = source_counts(preset)
        self.stream_shares = stream_shares(preset)

    def fresh_model(self, seed: int):
        """The base plus a new LoRA adapter seeded by ``seed`` (B = 0: the base's outputs)."""
        torch.manual_seed(seed)
        model = attach_lora(copy.deepcopy(self.base), r=self.preset.lora_r,
                            alpha=2 * self.preset.lora_r, targets=list(self.preset.lora_targets),
                            seed=seed)
        return model.to(self.device)

    def selector(self, name: str, mixture: str, ratio: int, seed: int, model):
        b = self.preset.b
        large = ratio * b
        uniform = name == "stratified-uniform"
        cfg = SelectorConfig(strategy="stratified" if uniform else name,
                             batch_size=large if name == "full" else b,
                             large_batch_size=large, seed=seed, mixture=mixture,
                             weighting="uniform" if uniform else "cluster",
                             scorer_layers=self.preset.scorer_layers if name == "colm" else 0,
                             scorer_adapter=self.preset.scorer_adapter if name == "colm" else "pushed",
                             scorer_lr=self.preset.lr)
        selector = build_selector(model if name in ("colm", "colm-paper") else None, cfg)
        selector.prime_sources(self.counts)
        return selector

    def evaluate(self, model) -> dict:
        losses = source_losses(model, self.collator, self.heldout)
        micro = sum(self.stream_shares.get(s, 0.0) * v for s, v in losses.per_source.items())
        micro /= sum(self.stream_shares.get(s, 0.0) for s in losses.per_source) or 1.0
        return {"per_source": losses.per_source, "macro": losses.macro, "micro": micro}


# ---------------------------------------------------------------------------------------------
# Costs, measured side by side


def measure_costs(setup: Setup, repeats: int) -> dict:
    """Median seconds per step of every selection and of training on b and on L, interleaved.

    Each round times every item once in turn, so a slow spell of the machine hits them alike.
    """
    preset, b = setup.preset, setup.preset.b
    model = setup.fresh_model(0)
    model.train()
    scorer = copy.deepcopy(model).eval()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    stream = training_stream(preset, 0)
    items: dict[str, Callable[[], float]] = {}
    for ratio in preset.ratios:
        large = ratio * b
        for name in preset.runs:
            selector = setup.selector(name, "stream", ratio, 0, scorer)
            items[f"select|{name}|{ratio}"] = _selection_item(selector, setup, stream, large)
        items[f"train|full|{ratio}"] = _train_item(model, optimizer, setup, stream, large)
    items["train|b"] = _train_item(model, optimizer, setup, stream, b)
    times: dict[str, list[float]] = {k: [] for k in items}
    for round_ in range(repeats + 1):
        for key, item in items.items():
            seconds = item()
            if round_:  # the first round warms caches and allocators
                times[key].append(seconds)
    return {k: statistics.median(v) for k, v in times.items()}


def _selection_item(selector, setup: Setup, stream: Iterator[dict], large: int):
    step = itertools.count()

    def run() -> float:
        batch = setup.collator(list(itertools.islice(stream, large))).to(setup.device)
        start = time.perf_counter()
        selector.select(batch, next(step))
        _sync(setup.device)
        return time.perf_counter() - start
    return run


def _train_item(model, optimizer, setup: Setup, stream: Iterator[dict], n: int):
    def run() -> float:
        batch = setup.collator(list(itertools.islice(stream, n))).to(setup.device)
        start = time.perf_counter()
        train_step(model, optimizer, batch, torch.ones(n), setup.preset.b)
        _sync(setup.device)
        return time.perf_counter() - start
    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Runs


def train_step(model, optimizer, batch, weights: torch.Tensor, micro_batch: int) -> float:
    """One optimizer step on ``batch`` with the client's accumulation; the step's weighted loss."""
    loss = backward_micro_batches(model, batch.input_ids, batch.attention_mask, batch.labels,
                                  weights.to(batch.input_ids.device), micro_batch=micro_batch)
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def plan(preset: Preset, costs: dict, seed: int, ratio: int, steps: int) -> list[RunSpec]:
    """Every run of one seed and ratio: each way of training at ``steps``, and stratified and full
    again at colm's trainer-seconds and total processor-seconds (`equal_cost_steps`)."""
    specs = []
    for name in preset.runs:
        lengths = {steps}
        if name in EXTENDED:
            lengths |= {equal_cost_steps(costs, name, ratio, steps, basis) for basis in ("trainer", "total")}
        for mixture in (("stream",) if name in UNWEIGHTED else preset.mixtures):
            for n in sorted(lengths):
                k = preset.curve_points
                grid = {max(1, round(n * i / k)) for i in range(1, k + 1)}
                specs.append(RunSpec(name, mixture, ratio, seed, n, tuple(sorted(grid))))
    return specs


def run_one(setup: Setup, spec: RunSpec) -> dict:
    """Train one run to its last evaluation step; its curve and what it trained on."""
    preset = setup.preset
    model = setup.fresh_model(spec.seed)
    model.train()
    scorer = copy.deepcopy(model).eval() if spec.name in ("colm", "colm-paper") else None
    selector = setup.selector(spec.name, spec.mixture, spec.ratio, spec.seed, scorer)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=preset.lr)
    schedule = SimpleNamespace(warmup_steps=preset.warmup, schedule="cosine", steps=spec.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule))  # colm-train's
    stream = training_stream(preset, spec.seed)
    large = spec.ratio * preset.b
    curve, weight_by_source, count_by_source, ess = [], {}, {}, []
    select_s = train_s = 0.0
    for step in range(spec.steps):
        batch = setup.collator(list(itertools.islice(stream, large))).to(setup.device)
        t0 = time.perf_counter()
        sel = selector.select(batch, step)
        t1 = time.perf_counter()
        chosen = batch.subset(sel.indices)
        train_step(model, optimizer, chosen, sel.weights, preset.b)
        scheduler.step()
        t2 = time.perf_counter()
        select_s, train_s = select_s + t1 - t0, train_s + t2 - t1
        w = sel.weights.double()
        ess.append(float(w.sum() ** 2 / (w ** 2).sum()) / len(w))
        for s, wi in zip(chosen.sources, w.tolist()):
            weight_by_source[s] = weight_by_source.get(s, 0.0) + wi
            count_by_source[s] = count_by_source.get(s, 0) + 1
        if scorer is not None and selector.own_adapter is None and (step + 1) % preset.push_every == 0:
            _copy_adapter(model, scorer)
        if step + 1 in spec.eval_steps:
            curve.append({"step": step + 1, **setup.evaluate(model)})
    total_w = sum(weight_by_source.values())
    return {**asdict(spec), "curve": curve, "select_seconds": select_s, "train_seconds": train_s,
            "weight_share": {s: v / total_w for s, v in sorted(weight_by_source.items())},
            "sample_share": {s: n / sum(count_by_source.values())
                             for s, n in sorted(count_by_source.items())},
            "ess_ratio": statistics.fmean(ess)}


def _copy_adapter(src, dst) -> None:
    """The trainer's adapter into the selector's model, as an adapter push does."""
    theirs = dict(dst.named_parameters())
    with torch.no_grad():
        for name, p in src.named_parameters():
            if p.requires_grad:
                theirs[name].copy_(p)


# ---------------------------------------------------------------------------------------------
# Driver


@dataclass
class Job:
    preset: Preset
    work: Path
    device: str
    seed: int
    ratio: int
    steps: int
    costs: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.work / "runs" / f"seed{self.seed}-ratio{self.ratio}.json"


def run_job(job: Job) -> Path:
    """All runs of one seed and ratio, written to one file (a rerun skips finished files)."""
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    setup = Setup(job.preset, job.work, job.device)
    runs = [run_one(setup, spec) for spec in plan(job.preset, job.costs, job.seed, job.ratio, job.steps)]
    job.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = job.path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"seed": job.seed, "ratio": job.ratio, "runs": runs}) + "\n")
    tmp.replace(job.path)
    return job.path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--seeds", type=int, nargs="+", help="default: the preset's")
    p.add_argument("--steps", type=int, help="steps of every run at equal steps (default: the preset's)")
    p.add_argument("--ratios", type=int, nargs="+", help="L/b values (default: the preset's)")
    p.add_argument("--runs", nargs="+", choices=RUNS,
                   help="runs to make (default: the preset's; colm always)")
    p.add_argument("--mixtures", nargs="+", choices=MIXTURES, help="default: the preset's")
    p.add_argument("--scorer-layers", type=int, default=0,
                   help="colm scores with an early-exit proxy, the first K layers then the head (the "
                        "cheap selector; colm-fast is K=2); 0: the whole model. Use its own --work")
    p.add_argument("--scorer-adapter", choices=("pushed", "own"), default="pushed",
                   help="colm's scorer takes the trainer's adapter every push_every steps ('pushed') or "
                        "trains its own on each coreset it selects ('own'). Use its own --work")
    p.add_argument("--jobs", type=int, default=2, help="processes running (seed, ratio) jobs at once")
    p.add_argument("--cost-repeats", type=int, default=10, help="timed rounds of the cost phase")
    p.add_argument("--render-only", action="store_true",
                   help="render the jobs already finished in --work, running none")
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", type=Path, default=Path("/tmp/colm-endtoend"),
                   help="base model, cost table and per-job results (a rerun reuses them)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "endtoend.md")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    runs = tuple(dict.fromkeys(["colm", *(args.runs or preset.runs)]))  # the yardstick of the others
    preset = replace(preset, seeds=tuple(args.seeds or preset.seeds), runs=runs,
                     ratios=tuple(args.ratios or preset.ratios),
                     mixtures=tuple(args.mixtures or preset.mixtures), scorer_layers=args.scorer_layers,
                     scorer_adapter=args.scorer_adapter)
    steps = args.steps or preset.steps
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    cost_file = args.work / "costs.json"
    if args.render_only and not cost_file.is_file():
        p.error(f"--render-only: no {cost_file}; run without it first")
    if cost_file.is_file():
        costs = json.loads(cost_file.read_text())
        print(f"costs from {cost_file}")
    else:
        costs = measure_costs(Setup(preset, args.work, args.device), args.cost_repeats)
        cost_file.write_text(json.dumps(costs, indent=2) + "\n")
    for key, seconds in sorted(costs.items()):
        print(f"  {key:28s} {seconds * 1e3:8.1f} ms")

    jobs = [Job(preset, args.work, args.device, s, r, steps, costs)
            for s in preset.seeds for r in preset.ratios]
    todo = [] if args.render_only else [j for j in jobs if not j.path.is_file()]
    print(f"{sum(j.path.is_file() for j in jobs)} of {len(jobs)} jobs already done; running {len(todo)}")
    command = "python " + shlex.join(["bench/endtoend.py", *(sys.argv[1:] if argv is None else argv)])
    log = args.work / "commands.txt"  # every command that ran jobs into this work folder
    if todo:
        with log.open("a") as f:
            f.write(command + "\n")
    started = time.perf_counter()
    if todo:
        with multiprocessing.get_context("spawn").Pool(min(args.jobs, len(todo))) as pool:
            for i, path in enumerate(pool.imap_unordered(run_job, todo), 1):
                print(f"[{i}/{len(todo)}] {path.name} ({time.perf_counter() - started:.0f} s)", flush=True)
    results = [json.loads(j.path.read_text()) for j in jobs if j.path.is_file()]
    commands = log.read_text().splitlines() if log.is_file() else []
    meta = {"preset": args.preset, "settings": {**asdict(preset), "steps": steps},
            "commands": [*commands, *([] if command in commands else [command])],
            "machine": f"{platform.machine()}, {torch.get_num_threads()} thread per process, "
                       f"device {args.device}",
            "costs": costs, "stream_shares": stream_shares(preset)}
    text = render(results, meta, args.out)
    print(text)

if __name__ == "__main__":
    main()
