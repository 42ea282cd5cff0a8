"""``colm-stream demo``: coreset training end to end on the built-in mixture, offline, in minutes.

Writes the synthetic 8-source mixture as WebDataset shards, pretrains a tiny Llama briefly, then
for each strategy (colm, random, full) starts a real selector process and a 2-rank torchrun job of
``colm-train`` that pulls its batches over gRPC, trains LoRA on the weighted loss and pushes its
adapter back. Ends with held-out loss per source, what each run trained on and what it cost, as
Markdown and a PNG in the output folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers.utils import logging as hf_logging

from colm_server.data.collate import Collator
from colm_server.data.prepare import write_shards
from colm_server.data.synthetic import TASKS, synthetic_stream
from colm_server.model.load import attach_lora, load_model, load_tokenizer
from colm_server.select.config import PRESETS, STRATEGIES
from colm_stream.evaluate import SourceLosses, source_losses

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The strategies the demo compares: all but the presets, which are colm with other scoring settings.
DEMO_STRATEGIES = tuple(s for s in STRATEGIES if s not in PRESETS)


@dataclass
class DemoConfig:
    """The demo's knobs; the defaults finish in a few minutes on 2 CPU cores."""

    out: Path = Path("demo-output")
    strategies: list[str] = field(default_factory=lambda: ["colm", "random", "full"])
    steps: int = 120             # optimizer steps per run
    large: int = 32              # L: samples per rank in each large batch
    small: int = 8               # b: coreset samples per rank and step
    world: int = 2               # trainer ranks (torchrun, gloo on CPU)
    lr: float = 3e-3
    warmup: int = 5
    push_every: int = 10         # adapter pushed to the selector every N steps
    lora_r: int = 16
    max_length: int = 64
    records: int = 12000         # synthetic training records written as shards
    heldout_per_source: int = 64
    base_steps: int = 150        # pretraining steps of the tiny base model
    seed: int = 0

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if not 1 <= self.small <= self.large:
            raise ValueError(f"small: must be in [1, large={self.large}], got {self.small}")
        for name in ("steps", "world", "records", "heldout_per_source", "base_steps", "push_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        unknown = set(self.strategies) - set(DEMO_STRATEGIES)
        if unknown or not self.strategies:
            raise ValueError(f"strategies: unknown or none: {sorted(unknown) or self.strategies}")

    @property
    def lora(self) -> dict:
        return {"r": self.lora_r, "alpha": 2 * self.lora_r, "targets": LORA_TARGETS}


def job_config(*, base: Path, manifest: Path, work_dir: Path, strategy: str, large: int, small: int,
               world: int, lora: dict, max_length: int, seed: int) -> dict:
    """The selector's YAML document for one demo run."""
    return {
        "model": {"source": str(base), "lora_r": lora["r"], "lora_alpha": lora["alpha"],
                  "lora_targets": lora["targets"]},
        "data": {"urls": str(manifest), "seed": seed, "buffer": 1000},
        "tokenize": {"max_length": max_length, "chat_template": True},
        "selector": {"strategy": strategy, "large_batch_size": large,
                     "batch_size": large if strategy == "full" else small, "seed": seed},
        "service": {"world_size": world, "work_dir": str(work_dir), "prefetch": 2},
    }


def heldout_records(per_source: int, seed: int) -> list[dict]:
    """``per_source`` fresh records of every task, from a seed the training shards do not use."""
    records: dict[str, list[dict]] = {name: [] for name in TASKS}
    for rec in synthetic_stream(seed=seed + 7_919, balanced=True):
        bucket = records[rec["source"]]
        if len(bucket) < per_source:
            bucket.append({**rec, "id": "heldout-" + rec["id"]})
        if all(len(b) == per_source for b in records.values()):
            return [r for b in records.values() for r in b]
    raise AssertionError("unreachable: the stream is endless")


OWNED = ("shards", "base", "runs")  # what the demo writes under its output folder


def clear_previous(out: Path) -> list[Path]:
    """Remove what an earlier demo wrote under ``out``; returns what was removed.

    A selector resumes from its journal and a trainer from its checkpoints, so a second run
    into old run folders would continue the old jobs instead of starting new ones.
    """
    removed = [out / name for name in OWNED if (out / name).exists()]
    for path in removed:
        shutil.rmtree(path)
    return removed


def run_demo(cfg: DemoConfig) -> Path:
    """Run every strategy and write ``report.md`` and ``report.png`` under ``cfg.out``; returns the .md."""
    from colm_stream.demo.base import pretrain_base
    from colm_stream.demo.report import markdown, plot
    from colm_stream.jobs import final_adapter, run_job

    if importlib.util.find_spec("matplotlib") is None:  # fail now, not after the runs
        raise RuntimeError("the demo's plot needs matplotlib: pip install 'colm-stream[demo]'")
    hf_logging.disable_progress_bar()  # model loads print bars of their own; keep ours readable
    started = time.perf_counter()
    for path in clear_previous(cfg.out):
        print(f"removed {path} from an earlier demo")
    cfg.out.mkdir(parents=True, exist_ok=True)
    shards = cfg.out / "shards"
    manifest = write_shards(itertools.islice(synthetic_stream(cfg.seed), cfg.records), shards,
                            shard_max_records=2000, inputs=[f"synthetic(seed={cfg.seed})"])
    print(f"wrote {manifest['total']} records in {len(manifest['shards'])} shards to {shards}")
    base = pretrain_base(cfg.out / "base", steps=cfg.base_steps, max_length=cfg.max_length, seed=cfg.seed)

    runs = []
    for name in cfg.strategies:
        run_dir = cfg.out / "runs" / name
        job = job_config(base=base, manifest=shards / "manifest.json", work_dir=run_dir / "work",
                         strategy=name, large=cfg.large, small=cfg.small, world=cfg.world, lora=cfg.lora,
                         max_length=cfg.max_length, seed=cfg.seed)
        runs.append(run_job(name, job, steps=cfg.steps, run_dir=run_dir, lr=cfg.lr, warmup=cfg.warmup,
                            push_every=cfg.push_every, seed=cfg.seed))

    heldout = heldout_records(cfg.heldout_per_source, cfg.seed)
    collator = Collator(load_tokenizer(str(base)), max_length=cfg.max_length, chat_template=True)
    losses: dict[str, SourceLosses] = {"base": source_losses(load_model(str(base)), collator, heldout)}
    for r in runs:
        model = attach_lora(load_model(str(base)), adapter=final_adapter(r, cfg.steps))
        losses[r.name] = source_losses(model, collator, heldout)

    small = sorted(s for s, n in manifest["sources"].items() if n / manifest["total"] < 0.03)
    sizes = manifest["sources"].values()
    setup = [
        f"Data: {manifest['total']} synthetic records from {len(sizes)} tasks "
        f"(largest {max(sizes) / min(sizes):.0f}x the smallest), "
        f"held-out: {cfg.heldout_per_source} fresh records per task.",
        f"Model: tiny Llama (4 layers, hidden 128, character tokenizer) pretrained {cfg.base_steps} steps on "
        f"a balanced mix, then LoRA r={cfg.lora_r} on all linear layers, {cfg.steps} steps, lr {cfg.lr}, "
        f"AdamW, {cfg.world} ranks.",
        f"Runs: `colm` and `random` train on b={cfg.small} of L={cfg.large} samples per rank and step; "
        f"`full` trains on all L={cfg.large}. Small sources (under 3% of the stream): {', '.join(small)}.",
        "These are the figures of one seed on a toy task: they show the pipeline working, "
        "not a quality result (see `bench/` for the benchmarks).",
    ]
    report = cfg.out / "report.md"
    text = markdown(setup, runs, losses, small)
    text += f"\nTotal demo time: {time.perf_counter() - started:.0f} s.\n"
    report.write_text(text)
    plot(cfg.out / "report.png", runs, losses)
    (cfg.out / "report.json").write_text(json.dumps({
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "heldout": {name: asdict(v) for name, v in losses.items()},
        "runs": [{k: str(v) if isinstance(v, Path) else v for k, v in asdict(r).items()} for r in runs],
    }, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="colm-stream demo", description=__doc__.split("\n\n")[0])
    defaults = DemoConfig()
    p.add_argument("--out", type=Path, default=defaults.out, help="output folder (shards, runs, report)")
    p.add_argument("--strategies", nargs="+", default=defaults.strategies, help="runs to compare")
    for name in ("steps", "large", "small", "world", "records", "base_steps", "seed"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    args = p.parse_args(argv)
    try:
        cfg = DemoConfig(**vars(args))
    except ValueError as exc:
        p.error(str(exc))
    report = run_demo(cfg)
    print()
    print(report.read_text())
    print(f"report: {report.resolve()}\nplot:   {report.with_suffix('.png').resolve()}")
