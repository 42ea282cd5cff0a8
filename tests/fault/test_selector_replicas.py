"""Selector replicas under torchrun serve what one selector serves, and survive a replica's death.

Both tests run ``colm-selector serve`` as real processes on loopback, as one process or as 2
replicas under torchrun (gloo), each replica scoring half of every large batch; trainer ranks pull
their steps with `CoresetStream`, and an adapter push lands between two selections. A killed
replica ends the group with status 1; relaunched on the same work dir, it resumes from the journal.
"""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from colm_client import AdapterSync, CoresetStream, CoresetStreamError
from colm_server.service.journal import Journal
from colm_stream.launch import SelectorProcess
from conftest import lora_model
from fault.test_kills import write_job

W, STEPS = 2, 6
START_TIMEOUT = 300.0


def pull(target: str, steps: int, on_step=None) -> list[list]:
    """``steps`` batches for every rank, pulled side by side; ``on_step(rank, step)`` after each.

    A stream that fails (its selector failed) is reopened after the last step received, as a
    restarted trainer resumes after its last trained step.
    """
    def one(rank: int) -> list:
        out = []
        while len(out) < steps:
            stream = CoresetStream(target, rank=rank, world_size=W, payload=False, start_step=len(out),
                                   reconnect_timeout=240)
            try:
                for batch in stream:
                    out.append(batch)
                    if on_step is not None:
                        on_step(rank, batch.step)
                    if len(out) == steps:
                        break
            except CoresetStreamError as err:
                assert "selector failed" in err.details, err
            finally:
                stream.close()
        return out

    with ThreadPoolExecutor(W) as pool:
        return list(pool.map(one, range(W)))


def push(target: str) -> int:
    """A trained adapter, pushed while the selector waits at its prefetch bound (after step 0)."""
    sync = AdapterSync(target, lora_model("llama", seed=3), every=1, rank=0)
    try:
        return sync.push(step=0)
    finally:
        sync.close()


def run(tmp_path: Path, name: str, replicas: int) -> tuple[list[list], SelectorProcess]:
    root = tmp_path / name
    root.mkdir()
    config = write_job(root, port=0)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    selector = SelectorProcess(config, ["service.prefetch=1"], log_path=root / "selector.log", env=env,
                               replicas=replicas)
    selector.wait_serving(START_TIMEOUT)
    assert push(selector.target) == 1
    return root, selector


def rows(batches: list[list]) -> list[tuple]:
    """(rank, step, param version, ids, weights) of every batch, rank by rank."""
    return [(rank, b.step, b.param_version, list(b.ids), b.weights.tolist())
            for rank, per_rank in enumerate(batches) for b in per_rank]


def test_two_replicas_serve_the_steps_one_selector_serves(tmp_path):
    got = {}
    for name, replicas in (("one", 1), ("two", 2)):
        _, selector = run(tmp_path, name, replicas)
        try:
            got[name] = rows(pull(selector.target, STEPS))
            selector.terminate()  # (torchrun reports its own SIGTERM as a failure: status 1)
        finally:
            selector.close()
    assert [r[2] for r in got["one"]] == [0] * 1 + [1] * (STEPS - 1) + [0] + [1] * (STEPS - 1)
    assert got["two"] == got["one"]


def replica_pid(torchrun_pid: int, rank: int) -> int:
    """The pid of torchrun's worker with ``RANK=rank``."""
    children = []
    for task in Path(f"/proc/{torchrun_pid}/task").iterdir():
        children += [int(p) for p in (task / "children").read_text().split()]
    for pid in children:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return pid
    raise LookupError(f"no worker with RANK={rank} among {children}")


def test_a_killed_replica_stops_the_group_and_a_relaunch_resumes_from_the_journal(tmp_path):
    killed = threading.Event()

    def kill_rank_1_once(rank: int, step: int) -> None:
        if step == 2 and not killed.is_set():
            killed.set()
            os.kill(replica_pid(first.proc.pid, 1), signal.SIGKILL)

    root, first = run(tmp_path, "killed", 2)
    selectors = [first]
    try:
        with ThreadPoolExecutor(1) as pool:
            trainers = pool.submit(pull, first.target, STEPS, kill_rank_1_once)
            assert killed.wait(START_TIMEOUT), "the trainers never reached step 2"
            assert first.proc.wait(START_TIMEOUT) != 0  # the leader's producer failed: exit 1
            assert "cannot go on" in first.log()
            # The orchestrator's restart (compose: restart: on-failure), on the same work dir and port.
            env = os.environ | {"OMP_NUM_THREADS": "1"}
            selectors.append(SelectorProcess(root / "job.yaml", ["service.prefetch=1"], port=first.port,
                                             log_path=root / "selector-2.log", env=env, replicas=2))
            selectors[-1].wait_serving(START_TIMEOUT)
            batches = trainers.result(timeout=START_TIMEOUT)
        selectors[-1].terminate()
    finally:
        for s in selectors:
            s.close()
    assert "resumed at step" in selectors[-1].log()
    journal = Journal(root / "work", retention=100)
    for rank, per_rank in enumerate(batches):
        assert [b.step for b in per_rank] == list(range(STEPS))  # none lost, none repeated
        for b in per_rank:
            journaled = journal.read(b.step, rank)
            assert list(b.ids) == journaled.ids and b.weights.tolist() == journaled.weights
