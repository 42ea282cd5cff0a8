"""Run one training job end to end as real processes and collect what it measured.

A ``colm-selector`` process serves the job; ``colm-train`` (one process, or torchrun ranks) pulls
its coresets and trains. The result gathers the selector's counters and costs from its Status and
each rank's summary and ledger. The demo and the benchmarks run their comparisons through this.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tqdm import tqdm

from colm_server.config import from_dict
from colm_stream.launch import SelectorProcess, trainer_command
from colm_stream.model_flags import model_arguments

PROGRESS_POLL = 0.5  # seconds between two looks at the selector's Status for the progress bar


@dataclass
class RunResult:
    """What one strategy's run produced: counters from the selector, summaries from the trainers."""

    name: str
    output_dir: Path           # the trainers' checkpoints, ledgers and summaries
    selected_steps: int  # may run past the trained steps by the prefetch
    source_seen: dict[str, int]
    source_selected: dict[str, int]
    selection_seconds: float
    selections: int
    selector_peak_rss: int
    selector_peak_device: int  # CUDA bytes; 0 on CPU
    trainer_peak_rss: int      # the largest of the ranks
    trainer_peak_device: int
    trainer_seconds: float     # the slowest rank's time in its training loop (model load excluded)
    wall_seconds: float        # the whole job: selector start to trainers' exit
    samples_per_rank_step: float
    train_loss: list[float] = field(default_factory=list)  # mean over ranks, per step
    weight_share: dict[str, float] = field(default_factory=dict)  # of the total training weight
    trainer_start_rss: int = 0     # resident when the loop began (model and optimizer loaded); 0: unknown
    trainer_start_device: int = 0
    effective_batch: float = 0.0   # mean over steps of effective_batch(); 0: unknown


def trainer_args(job: dict, *, steps: int, output_dir: Path, lr: float, warmup: int = 0,
                 push_every: int = 0, seed: int = 0, precision: str = "fp32",
                 micro_batch: int = 0) -> list[str]:
    """``colm-train`` arguments that agree with ``job``, a selector config document: its model
    settings (``model_flags.model_arguments``) and its job id. The selector's address comes later.
    ``micro_batch`` > 0 accumulates each step's gradient over micro-batches of that many samples."""
    config = from_dict(job)  # the selector's defaults for what the document leaves out
    args = [*model_arguments(config.model), f"--job-id={config.service.job_id}"]
    return args + ["--steps", str(steps), "--lr", str(lr), "--warmup-steps", str(warmup),
                   "--output-dir", str(output_dir), "--save-every", "0", "--push-every", str(push_every),
                   "--log-every", str(max(steps // 5, 1)), "--seed", str(seed), "--precision", precision,
                   "--micro-batch", str(micro_batch)]


def run_job(name: str, job: dict, *, steps: int, run_dir: Path, lr: float, warmup: int = 0,
            push_every: int = 0, seed: int = 0, precision: str = "fp32", micro_batch: int = 0,
            threads: int | None = 1) -> RunResult:
    """Serve ``job`` (a selector config document) from a selector process and train ``steps`` steps.

    The trainers run as ``job['service']['world_size']`` ranks with checkpoints under
    ``run_dir/trainer``; ``threads`` sets OMP_NUM_THREADS of every process (None: leave it).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "job.yaml"
    config_path.write_text(yaml.safe_dump(job, sort_keys=False))
    world = job["service"]["world_size"]
    trainer_dir = run_dir / "trainer"
    args = trainer_args(job, steps=steps, output_dir=trainer_dir, lr=lr, warmup=warmup,
                        push_every=push_every, seed=seed, precision=precision, micro_batch=micro_batch)
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    with SelectorProcess(config_path, log_path=run_dir / "selector.log", env=env) as selector, \
            open(run_dir / "trainer.log", "wb") as trainer_log:
        selector.wait_serving()
        trainers = subprocess.Popen(trainer_command(world, [*args, "--selector", selector.target]),
                                    stdin=subprocess.DEVNULL, stdout=trainer_log, stderr=subprocess.STDOUT,
                                    env=env)
        try:
            _follow(trainers, selector, steps, f"training with {name}")
        finally:
            if trainers.poll() is None:
                trainers.kill()
                trainers.wait()
        wall = time.perf_counter() - started
        if trainers.returncode != 0:
            log = (run_dir / "trainer.log").read_text(errors="replace")[-4000:]
            raise RuntimeError(f"{name}: trainers exited with {trainers.returncode}; their log ends:\n{log}")
        status = selector.status()
        selector.terminate()
    summaries = [json.loads((trainer_dir / f"summary-rank{r}.json").read_text()) for r in range(world)]
    ledgers = read_ledgers(trainer_dir, world)
    return RunResult(
        name=name, output_dir=trainer_dir, selected_steps=int(status["selected_steps"]),
        source_seen={k: int(v) for k, v in status["source_seen"].items()},
        source_selected={k: int(v) for k, v in status["source_selected"].items()},
        selection_seconds=float(status["selection_seconds"]), selections=int(status["selections"]),
        selector_peak_rss=int(status["peak_rss_bytes"]),
        selector_peak_device=int(status["peak_device_bytes"]),
        trainer_peak_rss=max(s["peak_rss_bytes"] for s in summaries),
        trainer_peak_device=max(s["peak_device_bytes"] for s in summaries),
        trainer_seconds=max(s["wall_seconds"] for s in summaries), wall_seconds=wall,
        samples_per_rank_step=sum(s["samples"] for s in summaries) / sum(s["steps"] for s in summaries),
        train_loss=[sum(e["loss"] for e in step) / world for step in zip(*ledgers)],
        weight_share=_weight_share(ledgers),
        effective_batch=mean_effective_batch(ledgers),
        trainer_start_rss=max(s.get("start_rss_bytes", 0) for s in summaries),
        trainer_start_device=max(s.get("start_device_bytes", 0) for s in summaries),
    )


def read_ledgers(trainer_dir: Path, world: int) -> list[list[dict]]:
    """Every rank's ledger entries, in the order trained."""
    return [[json.loads(line) for line in (trainer_dir / f"ledger-rank{r}.jsonl").read_text().splitlines()]
            for r in range(world)]


def effective_batch(weights: list[float]) -> float:
    """``(sum w)^2 / sum w^2``: how many equally weighted samples a step's weighted loss is worth
    (b for uniform weights, 1 when one sample carries it all)."""
    return sum(weights) ** 2 / sum(w * w for w in weights)


def mean_effective_batch(ledgers: list[list[dict]]) -> float:
    """The mean of ``effective_batch`` over every rank's steps."""
    values = [effective_batch(e["weights"]) for ledger in ledgers for e in ledger]
    return sum(values) / len(values) if values else 0.0


def _weight_share(ledgers: list[list[dict]]) -> dict[str, float]:
    """Each source's share of the summed sample weights: its pull on the training loss."""
    per_source: dict[str, float] = {}
    for entry in (e for ledger in ledgers for e in ledger):
        for source, weight in zip(entry["sources"], entry["weights"]):
            per_source[source] = per_source.get(source, 0.0) + weight
    total = sum(per_source.values())
    return {s: w / total for s, w in per_source.items()}


def final_adapter(result: RunResult, steps: int) -> Path:
    """The adapter folder the trainers saved at their last step."""
    return result.output_dir / f"checkpoint-{steps - 1}" / "adapter"


def _follow(trainers: subprocess.Popen, selector: SelectorProcess, steps: int, desc: str) -> None:
    """A progress bar of the steps every rank has finished, until the trainers exit."""
    with tqdm(total=steps, desc=desc, unit="step") as bar:
        while True:
            try:
                trainers.wait(PROGRESS_POLL)
                done = steps if trainers.returncode == 0 else bar.n
            except subprocess.TimeoutExpired:
                ranks = selector.status()["ranks"]
                # A rank acknowledges step t when it asks for t+1: acked+1 steps are behind it.
                done = min((int(r["acked_step"]) + 1 if int(r["next_step"]) > 1 else 0 for r in ranks),
                           default=0)
            bar.update(max(done - bar.n, 0))
            if trainers.returncode is not None:
                return
