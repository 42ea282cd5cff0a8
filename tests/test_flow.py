"""Flow control and retention of a `Job`: prefetch bound, per-rank credit, pushes while idle.

Most tests drive a `Job` directly with a fake selector and a fake record stream (real
`Journal`, real `Collator`). The job's condition is swapped for one that records every wait,
so "the producer is idle" and "a rank is blocked" are observed, not guessed with sleeps.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import pytest
import torch

from colm_client.stream import CoresetStream, CoresetStreamError
from colm_server.data.collate import Collator
from colm_server.model.tiny import build_tokenizer
from colm_server.service.job import Job, JobStopped
from colm_server.service.journal import Journal
from colm_server.service.server import SelectorServer
from colm_wire.proto import selector_pb2 as pb
from colm_wire.proto import selector_pb2_grpc as pb_grpc
from test_service import make_config, take, target

TIMEOUT = 30.0  # upper bound of every wait; a passing test never gets near it
B, L = 2, 4  # per rank: selected, drawn
PRODUCER = "colm-producer"


class FakeStream:
    """An endless record stream with the parts of `ShardStream` a `Job` uses."""

    def __init__(self):
        self.taken, self.epoch, self.skipped = 0, 0, {}

    def take(self, n: int) -> list[dict]:
        out = [{"id": f"s-{i}", "source": "a" if i % 3 else "b", "prompt": f"{i} + {i} = ?",
                "response": str(2 * i), "epoch": 0} for i in range(self.taken, self.taken + n)]
        self.taken += n
        return out

    def state_dict(self) -> dict:
        return {"taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        self.taken = state["taken"]


class FakeSelector:
    """Picks the first W*b rows; records each step, the adapter it saw and bound violations.

    ``gate`` (step -> event) holds the selection of that step until the event is set.
    """

    def __init__(self, adapter: dict[str, torch.Tensor]):
        self.adapter, self.job = adapter, None
        self.steps: list[int] = []
        self.adapter_at: dict[int, dict[str, torch.Tensor]] = {}
        self.violations: list[str] = []
        self.gate: dict[int, threading.Event] = {}
        self.entered = threading.Event()
        self.tracker = SimpleNamespace(counts={})

    def target_shares(self) -> dict[str, float]:
        return {}

    def select(self, batch, step: int):
        job = self.job
        slowest_acked = min(r.acked for r in job.ranks)  # acks only grow: a weaker check
        if step > slowest_acked + job.prefetch:
            self.violations.append(f"step {step} selected with slowest ack {slowest_acked}")
        self.steps.append(step)
        self.adapter_at[step] = {k: v.clone() for k, v in self.adapter.items()}
        if step in self.gate:
            self.entered.set()
            assert self.gate[step].wait(TIMEOUT), "gate never opened"
        n = job.world_size * B
        return SimpleNamespace(indices=torch.arange(n), weights=torch.ones(n), stats={})

    def state_dict(self) -> dict:
        return {"steps": len(self.steps)}

    def load_state_dict(self, state: dict) -> None:
        pass


class WatchedCondition(threading.Condition):
    """The job's condition, recording who waits and, for the producer, at which next_step."""

    def __init__(self, job: Job):
        super().__init__()
        self.job = job
        self.waits: Counter[str] = Counter()
        self.idle_at: list[int] = []  # job.next_step each time the producer went to sleep
        self.seen = threading.Condition()

    def wait(self, timeout=None):
        name = threading.current_thread().name
        with self.seen:
            self.waits[name] += 1
            if name == PRODUCER:
                self.idle_at.append(self.job.next_step)
            self.seen.notify_all()
        return super().wait(timeout)

    def until(self, predicate, what: str) -> None:
        with self.seen:
            assert self.seen.wait_for(predicate, TIMEOUT), f"timed out waiting for {what}"

    def idle(self, at: int, after: int = 0) -> None:
        """Wait until the producer sleeps (its wait number > `after`); it must be at step `at`.

        next_step only grows, so a producer that went past `at` fails here at once.
        """
        self.until(lambda: len(self.idle_at) > after and self.idle_at[-1] >= at,
                   f"the producer to idle at step {at} (idled at {self.idle_at})")
        assert self.idle_at[-1] == at, f"the producer went to step {self.idle_at[-1]}, bound {at}"


@pytest.fixture()
def make_job(tmp_path):
    jobs: list[Job] = []

    def make(world_size: int, prefetch: int, max_inflight: int, adapter=None, on_adapter=None):
        adapter = adapter if adapter is not None else {"w": torch.zeros(3)}
        selector = FakeSelector(adapter)
        job = Job(selector=selector, collator=Collator(build_tokenizer(), max_length=32),
                  stream=FakeStream(), journal=Journal(tmp_path / f"work{len(jobs)}", retention=100),
                  world_size=world_size, records_per_step=world_size * L, prefetch=prefetch,
                  max_inflight=max_inflight, adapter=adapter, on_adapter=on_adapter)
        selector.job = job
        watch = job._cond = WatchedCondition(job)
        jobs.append(job)
        return job, selector, watch

    yield make
    for job in jobs:
        for gate in job.selector.gate.values():
            gate.set()
        job.stop(timeout=TIMEOUT)
        assert job._thread is None or not job._thread.is_alive()


def always() -> bool:
    return True


def bounded(fn, *args):
    """fn(*args) in a daemon thread, its result or its exception; fails instead of hanging."""
    out: list = []

    def run():
        try:
            out.append((True, fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            out.append((False, exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(TIMEOUT)
    assert out, f"{getattr(fn, '__name__', fn)} did not return within {TIMEOUT}s"
    ok, value = out[0]
    if not ok:
        raise value
    return value


def read(job: Job, rank: int, connection: int, n: int) -> list[int]:
    """The steps of a rank's next n batches, which must be committed and within its credit."""
    return [bounded(job.next_batch, rank, connection, 0.05).step for _ in range(n)]


def pull(srv, n: int, rank: int, start_step: int = 0) -> list:
    """n batches of one rank over gRPC, bounded (a stream gives up reconnecting after 5 s)."""
    stream = CoresetStream(target(srv), rank=rank, world_size=2, start_step=start_step,
                           reconnect_timeout=5)
    return bounded(take, stream, n)


def test_a_rank_that_never_acks_holds_production_within_prefetch(make_job):
    job, selector, watch = make_job(world_size=2, prefetch=2, max_inflight=4)
    conns = [job.connect(r, 0, always) for r in range(2)]
    job.start()
    watch.idle(at=2)  # slowest ack -1: steps 0 and 1, then nothing
    assert selector.steps == [0, 1]

    # Rank 0 races ahead; rank 1 has not acked anything, so production stays held.
    assert read(job, 0, conns[0], 2) == [0, 1]
    n = len(watch.idle_at)
    job.ack(0, 1)  # wakes the producer, which must go back to sleep at step 2
    watch.idle(at=2, after=n)
    with job._cond:
        assert job.next_step <= min(r.acked for r in job.ranks) + 1 + job.prefetch
    assert selector.steps == [0, 1]

    # The slow rank acks: production resumes, one step per acked step, and stops again.
    assert read(job, 1, conns[1], 1) == [0]
    job.ack(1, 0)
    watch.idle(at=3)
    assert read(job, 1, conns[1], 2) == [1, 2]
    job.ack(1, 2)  # the slowest is now rank 0 (acked 1)
    watch.idle(at=4)
    assert selector.steps == [0, 1, 2, 3]
    assert not selector.violations
    assert job.journal.last_step == job.next_step - 1 == 3
    for step in range(4):  # every step journaled with b rows per rank
        assert all(len(job.journal.read(step, r).ids) == B for r in range(2))


def test_a_rank_holds_at_most_max_inflight_unacked_batches(make_job):
    job, _, watch = make_job(world_size=1, prefetch=4, max_inflight=2)
    conn = job.connect(0, 0, always)
    job.start()
    watch.idle(at=4)  # steps 0..3 are committed: only credit limits the rank now
    assert read(job, 0, conn, 2) == [0, 1]

    got, result = threading.Event(), []

    def reader():
        try:
            result.append(job.next_batch(0, conn, poll=0.02))
        finally:
            got.set()

    thread = threading.Thread(target=reader, name="reader", daemon=True)
    thread.start()
    # Blocked: it re-checked its credit several times and still has no batch.
    watch.until(lambda: watch.waits["reader"] >= 3 or got.is_set(), "the reader to poll")
    assert not got.is_set()
    with job._cond:
        assert job.ranks[0].next_step == 2 and job.ranks[0].acked == -1

    job.ack(0, 0)  # one credit back: step 2 goes out, 2 unacked again
    assert got.wait(TIMEOUT)
    thread.join(TIMEOUT)
    assert result[0].step == 2
    assert result[0].step - job.ranks[0].acked <= job.max_inflight


def test_a_push_while_the_producer_waits_for_a_stalled_rank_is_applied(make_job):
    applied = []
    job, selector, watch = make_job(
        world_size=2, prefetch=1, max_inflight=1,
        on_adapter=lambda t, v: applied.append((v, threading.current_thread().name)))
    conns = [job.connect(r, 0, always) for r in range(2)]
    job.start()
    watch.idle(at=1)  # both ranks stalled at step 0

    version = job.push_adapter({"w": torch.ones(3)}, trainer_step=7, timeout=TIMEOUT)
    assert version == job.param_version == 1
    assert torch.equal(job.adapter["w"], torch.ones(3))
    assert applied == [(1, PRODUCER)]  # swapped in by the idle producer, not around it
    assert selector.steps == [0]  # and it did not lift the prefetch bound

    for r in range(2):
        assert read(job, r, conns[r], 1) == [0]
        job.ack(r, 0)
    watch.idle(at=2)
    assert torch.equal(selector.adapter_at[0]["w"], torch.zeros(3))
    assert torch.equal(selector.adapter_at[1]["w"], torch.ones(3))
    assert [job.journal.read(s, r).param_version for s in (0, 1) for r in range(2)] == [0, 0, 1, 1]

    # A second push while idle again: the next version.
    assert job.push_adapter({"w": torch.full((3,), 2.0)}, trainer_step=8, timeout=TIMEOUT) == 2
    assert applied[-1] == (2, PRODUCER)


def test_a_push_during_a_selection_waits_for_the_gap_between_two(make_job):
    job, selector, _ = make_job(world_size=1, prefetch=2, max_inflight=2)
    selector.gate[0] = threading.Event()
    job.connect(0, 0, always)
    job.start()
    assert selector.entered.wait(TIMEOUT)  # the producer is inside select(step 0)

    versions = []
    pusher = threading.Thread(target=lambda: versions.append(
        job.push_adapter({"w": torch.ones(3)}, trainer_step=0, timeout=TIMEOUT)), daemon=True)
    pusher.start()
    with job._cond:
        assert job._cond.wait_for(lambda: job._pending is not None, TIMEOUT)
        assert job.param_version == 0 and torch.equal(job.adapter["w"], torch.zeros(3))
    selector.gate[0].set()
    pusher.join(TIMEOUT)
    assert versions == [1]
    with job._cond:
        assert job._cond.wait_for(lambda: job.next_step == 2, TIMEOUT)
    assert job.journal.read(0, 0).param_version == 0
    assert job.journal.read(1, 0).param_version == 1
    assert torch.equal(selector.adapter_at[1]["w"], torch.ones(3))


def test_stop_ends_a_waiting_rank_with_job_stopped(make_job):
    job, _, watch = make_job(world_size=1, prefetch=1, max_inflight=1)
    conn = job.connect(0, 0, always)
    job.start()
    watch.idle(at=1)
    assert read(job, 0, conn, 1) == [0]
    errors = []

    def reader():
        try:
            job.next_batch(0, conn, poll=0.02)
        except JobStopped as exc:
            errors.append(exc)

    thread = threading.Thread(target=reader, name="reader", daemon=True)
    thread.start()
    watch.until(lambda: watch.waits["reader"] >= 1, "the reader to block")
    job.stop(timeout=TIMEOUT)
    thread.join(TIMEOUT)
    assert not thread.is_alive() and len(errors) == 1


def test_a_join_older_than_the_journal_is_refused_out_of_range(tmp_path):
    config = make_config(tmp_path, **{"service.prefetch": 1, "service.max_inflight": 1,
                                      "service.journal_retention": 4, "selector.strategy": "random"})
    srv = SelectorServer(config)
    srv.start()
    try:
        with ThreadPoolExecutor(2) as pool:  # the ranks pull side by side, as in training
            ranks = list(pool.map(lambda r: pull(srv, 8, r), range(2)))
        # Steps 0..7 consumed, 0..6 acked: step 7 is selected, then the producer waits.
        assert [[b.step for b in batches] for batches in ranks] == [list(range(8))] * 2
        job = srv.job
        with job._cond:
            assert job._cond.wait_for(lambda: job.next_step == 8, TIMEOUT)
        first = job.journal.first_step
        assert first == 8 - 4

        with pytest.raises(CoresetStreamError) as err:
            pull(srv, 1, rank=0, start_step=first - 2)
        assert err.value.code == grpc.StatusCode.OUT_OF_RANGE
        assert f"oldest is {first}" in err.value.details
        assert f"step {first - 2}" in err.value.details

        # The oldest journaled step itself is still served, and Status reports the window.
        (batch,) = pull(srv, 1, rank=0, start_step=first)
        assert batch.step == first
        with grpc.insecure_channel(target(srv)) as channel:
            status = pb_grpc.SelectorStub(channel).Status(pb.StatusRequest(), timeout=TIMEOUT)
        assert status.journal_first_step == first
    finally:
        srv.stop(grace=1)


def test_a_push_superseded_before_the_gap_is_answered_with_the_version_that_replaced_it(make_job):
    job, selector, _ = make_job(world_size=1, prefetch=2, max_inflight=2)
    selector.gate[0] = threading.Event()
    job.connect(0, 0, always)
    job.start()
    assert selector.entered.wait(TIMEOUT)  # the producer is inside select(step 0)

    versions: dict[str, int] = {}

    def push(name: str, value: float) -> None:
        versions[name] = job.push_adapter({"w": torch.full((3,), value)}, trainer_step=0, timeout=TIMEOUT)

    first = threading.Thread(target=push, args=("first", 1.0), daemon=True)
    first.start()
    with job._cond:
        assert job._cond.wait_for(lambda: job._pending is not None, TIMEOUT)
    second = threading.Thread(target=push, args=("second", 2.0), daemon=True)
    second.start()
    with job._cond:  # the second push replaced the first before either was applied
        assert job._cond.wait_for(lambda: job._pending.tensors["w"][0] == 2.0, TIMEOUT)
    selector.gate[0].set()
    first.join(TIMEOUT)
    second.join(TIMEOUT)
    assert versions == {"first": 1, "second": 1}  # one swap, both callers answered
    assert torch.equal(job.adapter["w"], torch.full((3,), 2.0))
