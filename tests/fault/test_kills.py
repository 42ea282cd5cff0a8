"""Crash a training job at random and prove that no step was lost or trained twice.

A 2-rank job pulls coresets from a ``colm-selector`` process; each rank is a ``colm-train``
process of its own (``--rank r --world-size 2``: no process group, its own adapter and
checkpoints). A driver SIGKILLs a random rank (restarted at once; it resumes from its own
latest checkpoint) or the selector (restarted at once on its work dir and port) at random
points of the run. Afterwards the trainers' ledgers are checked against the journal:

- each rank's surviving lineage (the steps the final weights saw) covers every step exactly
  once: every process started at most one step past what had been trained before it, and the
  entries a restart discarded are exactly the ones it retrained;
- every step was trained on the batch the journal holds for it (ids and weights);
- no sample was selected twice within an epoch.

CI runs a short job; ``COLM_FAULT_LONG=1`` runs 1000 steps with at least 10 rank and 3
selector kills and records the outcome in ``bench/results/faults.md``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

import yaml

from colm_server.service.journal import Journal
from colm_stream.launch import SelectorProcess, free_port, trainer_command
from conftest import make_records

LONG = os.environ.get("COLM_FAULT_LONG") == "1"
STEPS, RANK_KILLS, SELECTOR_KILLS = (1000, 10, 3) if LONG else (30, 1, 1)
W, L, B = 2, 4, 2
SAVE_EVERY, PUSH_EVERY = 5, 7
JOB_TIMEOUT = 3600.0 if LONG else 600.0
START_TIMEOUT = 900.0 if LONG else 180.0  # a selector importing torch on a busy machine
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "faults.md"


def write_job(tmp_path: Path, port: int) -> Path:
    """Shards of a 3-source mixture and a selector config serving them to W ranks."""
    import webdataset as wds

    shards = tmp_path / "shards"
    shards.mkdir()
    records = make_records({"big": 300, "mid": 120, "tiny": 20}, seed=7)
    for s in range(4):
        with wds.TarWriter(str(shards / f"shard-{s}.tar")) as sink:
            for r in records[s::4]:
                sink.write({"__key__": r["id"], "json": r})
    doc = {
        "model": {"source": "tiny:llama", "lora_r": 4},
        "data": {"urls": str(shards / "shard-{0..3}.tar"), "buffer": 32},
        "tokenize": {"max_length": 48, "chat_template": False},
        "selector": {"batch_size": B, "large_batch_size": L, "zo_dim": 64, "small_source_share": 0.1},
        "service": {"world_size": W, "port": port, "work_dir": str(tmp_path / "work"), "prefetch": 2,
                    "journal_retention": STEPS + 16},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


class Rank:
    """One rank's trainer process, restartable; its log file collects every incarnation."""

    def __init__(self, rank: int, args: list[str], out: Path, env: dict):
        self.rank, self.out, self.env = rank, out / f"rank{rank}", env
        self.args = [*args, "--rank", str(rank), "--world-size", str(W), "--output-dir", str(self.out)]
        self.log = open(out / f"rank{rank}.log", "ab")
        self.proc = self.start()

    def start(self) -> subprocess.Popen:
        return subprocess.Popen(trainer_command(1, self.args), env=self.env, stdin=subprocess.DEVNULL,
                                stdout=self.log, stderr=subprocess.STDOUT)

    def kill_and_restart(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc = self.start()

    def logged(self) -> int:
        """Ledger lines so far (retrained steps included)."""
        path = self.out / f"ledger-rank{self.rank}.jsonl"
        return path.read_bytes().count(b"\n") if path.exists() else 0

    def entries(self) -> list[dict]:
        path = self.out / f"ledger-rank{self.rank}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def lineage(entries: list[dict]) -> dict[int, dict]:
    """The entries the final weights saw, step -> entry; AssertionError on a gap or a disorder.

    A process resuming at ``start`` discards what its predecessors logged from ``start`` on
    (their weights after the checkpoint were lost), so the surviving entry of a step is the
    last one logged for it. A gap (a start beyond the last step trained + 1) would be a lost step.
    """
    survived: dict[int, dict] = {}
    runs: list[str] = []
    for e in entries:
        if not runs or runs[-1] != e["run"]:  # a new process: its first entry is at its start
            runs.append(e["run"])
            assert e["step"] == e["start"], f"run {e['run']} began at step {e['step']}, not {e['start']}"
            assert e["start"] <= len(survived), f"steps {len(survived)}..{e['start'] - 1} never trained"
            for step in [s for s in survived if s >= e["start"]]:
                del survived[step]
        assert e["step"] == len(survived), f"run {e['run']}: step {e['step']} out of order"
        survived[e["step"]] = e
    return survived


def test_random_kills_of_ranks_and_selector_lose_and_repeat_nothing(tmp_path):
    rng = random.Random(20261129)
    port = free_port()
    config = write_job(tmp_path, port)
    out = tmp_path / "trainers"
    out.mkdir()
    args = ["--model", "tiny:llama", "--lora-r", "4", "--selector", f"127.0.0.1:{port}",
            "--steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--push-every", str(PUSH_EVERY),
            "--log-every", "50", "--lr", "1e-3"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    # Kill points, in steps logged by the slower rank; each kind spread over the run.
    plan = sorted([(rng.randint(3, STEPS - 3), "rank") for _ in range(RANK_KILLS)]
                  + [(rng.randint(3, STEPS - 3), "selector") for _ in range(SELECTOR_KILLS)])
    done: list[tuple[str, int]] = []
    started = time.monotonic()
    selectors = [SelectorProcess(config, log_path=tmp_path / "selector-0.log", port=port, env=env)]
    ranks: list[Rank] = []
    try:
        selectors[-1].wait_serving(START_TIMEOUT)
        ranks = [Rank(r, args, out, env) for r in range(W)]
        while any(r.proc.poll() is None for r in ranks):
            assert time.monotonic() - started < JOB_TIMEOUT, f"job not done in {JOB_TIMEOUT}s"
            for r in ranks:
                log = (out / f"rank{r.rank}.log").read_text()[-3000:] if r.proc.poll() else ""
                assert r.proc.poll() in (None, 0), f"rank {r.rank} failed:\n{log}"
            progress = min(r.logged() for r in ranks)
            if plan and progress >= plan[0][0]:
                at, kind = plan[0]
                if kind == "selector":
                    selectors[-1].proc.kill()
                    selectors[-1].proc.wait()
                    selectors[-1].close()
                    log = tmp_path / f"selector-{len(selectors)}.log"
                    selectors.append(SelectorProcess(config, log_path=log, port=port, env=env))
                    selectors[-1].wait_serving(START_TIMEOUT)
                    plan.pop(0)
                    done.append((kind, progress))
                else:
                    victim = ranks[rng.randrange(W)]
                    if victim.proc.poll() is None:
                        victim.kill_and_restart()
                        plan.pop(0)
                        done.append((f"rank {victim.rank}", progress))
            try:
                ranks[0].proc.wait(0.2)
            except subprocess.TimeoutExpired:
                pass
        assert all(r.proc.returncode == 0 for r in ranks), [r.proc.returncode for r in ranks]
        assert not plan, f"kills not done before the job ended: {plan}"
        assert selectors[-1].terminate() == 0
    finally:
        for r in ranks:
            r.close()
        for s in selectors:
            s.close()
    seconds = time.monotonic() - started

    journal = Journal(tmp_path / "work", retention=STEPS + 16)
    seen_in_epoch: dict[int, set[str]] = {}
    retrained = processes = lost = mismatched = selected_twice = 0
    for rank in range(W):
        entries = ranks[rank].entries()
        survived = lineage(entries)  # raises on a gap or a step out of order
        retrained += len(entries) - len(survived)
        processes += len({e["run"] for e in entries})
        lost += len(set(range(STEPS)) - set(survived))
        for step, entry in survived.items():
            batch = journal.read(step, rank)
            mismatched += entry["ids"] != batch.ids or entry["weights"] != batch.weights
            ids = seen_in_epoch.setdefault(batch.epoch, set())
            selected_twice += len(ids & set(batch.ids))
            ids.update(batch.ids)
    if LONG:
        RESULTS.write_text(
            "# Fault injection: random SIGKILLs of trainer ranks and the selector\n\n"
            "Command: `COLM_FAULT_LONG=1 .venv/bin/python -m pytest tests/fault/test_kills.py`\n\n"
            f"A 2-rank job (one colm-train process per rank, tiny Llama + LoRA) of {STEPS} steps, "
            f"b={B} of L={L} per rank, checkpoints every {SAVE_EVERY} steps, adapter push every "
            f"{PUSH_EVERY}.\n\n"
            "| kills of a rank | kills of the selector | steps retrained after a restart | lost steps "
            "| steps not on the journaled batch | samples selected twice in an epoch | wall time |\n"
            "|---:|---:|---:|---:|---:|---:|---:|\n"
            f"| {sum(k.startswith('rank') for k, _ in done)} | {sum(k == 'selector' for k, _ in done)} "
            f"| {retrained} (both ranks) | {lost} | {mismatched} | {selected_twice} "
            f"| {seconds / 60:.1f} min |\n\n"
            f"Kill points (steps logged by the slower rank when it happened): {done}. Trainer processes "
            f"over both ranks: {processes}. A step counts once per rank in the lineage the final weights "
            "saw (the entries a restart discarded and retrained are the 'retrained' column).\n")
    assert lost == 0 and mismatched == 0 and selected_twice == 0, (lost, mismatched, selected_twice)
    assert len(done) == RANK_KILLS + SELECTOR_KILLS and len(selectors) == SELECTOR_KILLS + 1
