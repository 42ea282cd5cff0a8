"""`colm-selector serve` as a real process: SIGTERM, a restart on the same work dir, bad configs, and a
selector whose shards are gone (it never serves and exits non-zero).

What a trainer rank sees when its selector stops (pinned by the tests below): batches already
delivered to it still arrive, then its live stream ends with status UNAVAILABLE, details "selector
is shutting down". `CoresetStream` never surfaces that: the iterator neither ends nor raises; it
logs "selector unavailable (...); reconnecting at step N" and reconnects with backoff. The new call
uses `wait_for_ready` without a deadline, so while no process listens on the port it just waits
(`reconnect_timeout` does not bound that wait): the iterator blocks until a selector serves the
target again, then resumes at the first step it has not yielded.
"""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from colm_client.status import SERVICE_NAME
from colm_client.stream import CoresetStream
from colm_server.config import fingerprint, load_config
from colm_stream.launch import SelectorProcess, free_port
from test_service import B, L, W, take, write_shards

SELECTOR = shutil.which("colm-selector", path=str(Path(sys.executable).parent))
START_TIMEOUT = 120.0  # importing torch and building the tiny model on a busy 2-core machine
EXIT_TIMEOUT = 60.0  # SIGTERM to exit: finish the step being selected, end the streams
RANK_TIMEOUT = 120.0  # a rank waiting for its batches (includes a restart and reconnect backoff)

pytestmark = pytest.mark.skipif(SELECTOR is None, reason="console script colm-selector is not installed")


def write_config(tmp_path: Path) -> tuple[Path, list[str], str]:
    """A YAML job file plus the `--set` overrides for it, and the job's fingerprint."""
    shards = tmp_path / "shards"
    shards.mkdir()
    doc = {
        "data": {"urls": write_shards(shards), "buffer": 16},
        "model": {"source": "tiny:llama", "lora_r": 4},
        "tokenize": {"max_length": 48, "chat_template": False},
        "selector": {"batch_size": 1, "large_batch_size": L, "zo_dim": 64, "small_source_share": 0.1},
        "service": {"world_size": W, "prefetch": 2, "max_inflight": 2, "port": 1},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    overrides = [f"selector.batch_size={B}", f"service.work_dir={tmp_path / 'work'}"]
    return path, overrides, fingerprint(load_config(path, overrides))


class Rank(threading.Thread):
    """A trainer rank pulling `total` batches through one CoresetStream; it may pause after `pause_at`.

    While paused its stream stays open: the selector holds a live connection for it.
    """

    def __init__(self, target: str, rank: int, fp: str, total: int, pause_at: int | None = None):
        super().__init__(name=f"rank-{rank}", daemon=True)
        self.stream = CoresetStream(target, rank=rank, world_size=W, config_fingerprint=fp,
                                    reconnect_timeout=RANK_TIMEOUT)
        self.total, self.pause_at = total, pause_at
        self.batches: list = []
        self.error: BaseException | None = None
        self.paused, self.go = threading.Event(), threading.Event()

    def run(self) -> None:
        try:
            for batch in self.stream:
                self.batches.append(batch)
                if len(self.batches) == self.total:
                    break
                if len(self.batches) == self.pause_at:
                    self.paused.set()
                    if not self.go.wait(RANK_TIMEOUT):
                        raise TimeoutError("never told to go on")
        except BaseException as exc:  # noqa: BLE001 - checked by the test
            self.error = exc
        finally:
            self.paused.set()  # wake a waiter also when the rank failed or ended early
            self.stream.close()

    def wait_paused(self) -> None:
        assert self.paused.wait(RANK_TIMEOUT), f"{self.name} did not get {self.pause_at} batches"
        assert self.error is None and len(self.batches) == self.pause_at, (self.error, len(self.batches))

    def finish(self) -> list:
        self.join(RANK_TIMEOUT)
        assert not self.is_alive(), (
            f"{self.name} still waiting after {RANK_TIMEOUT}s with {len(self.batches)} batches")
        assert self.error is None, f"{self.name} raised {self.error!r}"
        return self.batches

    def abort(self) -> None:
        """Teardown after a failure: end the stream however it is blocked."""
        self.go.set()
        deadline = time.monotonic() + 30
        while self.is_alive() and time.monotonic() < deadline:
            call = self.stream._call  # private: only to unblock a failed test's thread
            if call is not None:
                call.cancel()  # CANCELLED is not retried: the iterator raises and the thread ends
            self.join(0.2)


class Reconnects(logging.Handler):
    """The reconnect warnings CoresetStream logs, per rank thread, with an event at the first."""

    def __init__(self, names: list[str]):
        super().__init__(logging.WARNING)
        self.messages: dict[str, list[str]] = {n: [] for n in names}
        self.seen = {n: threading.Event() for n in names}

    def emit(self, record: logging.LogRecord) -> None:
        if record.threadName in self.seen:
            self.messages[record.threadName].append(record.getMessage())
            self.seen[record.threadName].set()


@pytest.fixture()
def procs():
    """Start selector processes and ranks; whatever is still running at the end is stopped."""
    selectors: list[SelectorProcess] = []
    ranks: list[Rank] = []

    class Procs:
        @staticmethod
        def selector(config: Path, overrides: list[str], log: Path, port: int) -> SelectorProcess:
            selectors.append(SelectorProcess(config, overrides, log_path=log, port=port))
            return selectors[-1]

        @staticmethod
        def ranks(target: str, fp: str, total: int, pause_at: int | None = None) -> list[Rank]:
            new = [Rank(target, r, fp, total, pause_at) for r in range(W)]
            ranks.extend(new)
            for rank in new:
                rank.start()
            return new

    yield Procs
    for rank in ranks:
        rank.abort()
    for sel in selectors:
        sel.close()


@pytest.fixture()
def reconnects():
    handler = Reconnects([f"rank-{r}" for r in range(W)])
    logger = logging.getLogger("colm_client.stream")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def assert_same_batches(got: list, expected: list) -> None:
    assert [b.step for b in got] == [b.step for b in expected]
    for a, b in zip(got, expected):
        assert a.ids == b.ids, f"step {a.step}"
        assert torch.equal(a.weights, b.weights) and torch.equal(a.input_ids, b.input_ids), f"step {a.step}"


def test_sigterm_exits_cleanly_and_a_new_selector_serves_the_journaled_steps(tmp_path, procs, reconnects):
    config, overrides, fp = write_config(tmp_path)
    port = free_port()
    target = f"127.0.0.1:{port}"
    first = procs.selector(config, overrides, tmp_path / "first.log", port)
    first.wait_serving(START_TIMEOUT)
    pause = 3
    # One batch past the pause may already be in flight; the second must come after the restart.
    ranks = procs.ranks(target, fp, total=pause + 2, pause_at=pause)
    for rank in ranks:
        rank.wait_paused()

    # SIGTERM while both ranks hold a live stream (each paused between two batches).
    started = time.monotonic()
    assert first.terminate() == 0, first.log()
    stop_s = time.monotonic() - started
    assert "Traceback" not in first.log()
    assert stop_s < EXIT_TIMEOUT

    # The ranks go on: what was already delivered, then UNAVAILABLE, which CoresetStream logs and
    # retries; the iterator does not end and does not raise, it waits for a selector.
    for rank in ranks:
        rank.go.set()
    for rank in ranks:
        assert reconnects.seen[rank.name].wait(RANK_TIMEOUT), f"{rank.name} saw no UNAVAILABLE"
        assert rank.is_alive() and rank.error is None
        assert reconnects.messages[rank.name][0].startswith(
            "selector unavailable (selector is shutting down); reconnecting at step"), reconnects.messages

    # A new selector on the same port and work dir: the waiting ranks resume by themselves.
    second = procs.selector(config, overrides, tmp_path / "second.log", port)
    second.wait_serving(START_TIMEOUT)
    received = [rank.finish() for rank in ranks]
    for batches in received:
        assert [b.step for b in batches] == list(range(pause + 2))
    assert "resumed at step" in second.log()

    # The journal survived: a rank rejoining at step 1 gets what it was sent before, step by step.
    for r in range(W):
        again = take(CoresetStream(target, rank=r, world_size=W, start_step=1, config_fingerprint=fp),
                     pause + 1)
        assert_same_batches(again, received[r][1:])
    assert second.terminate() == 0, second.log()
    assert "Traceback" not in second.log()


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_streams_continue_across_a_selector_restart(tmp_path, procs, reconnects, stop):
    config, overrides, fp = write_config(tmp_path)
    port = free_port()
    target = f"127.0.0.1:{port}"
    first = procs.selector(config, overrides, tmp_path / "first.log", port)
    first.wait_serving(START_TIMEOUT)
    total, pause = 8, 2
    ranks = procs.ranks(target, fp, total=total, pause_at=pause)
    for rank in ranks:
        rank.wait_paused()
    # Both ranks pull as fast as they can while the selector is stopped; at most a step or two
    # more can be selected before it goes, the rest must come from its successor.
    for rank in ranks:
        rank.go.set()
    if stop == "sigterm":
        assert first.terminate() == 0, first.log()
    else:  # a crash: no shutdown code runs; the journal's commit protocol must hold by itself
        first.proc.kill()
        assert first.proc.wait(EXIT_TIMEOUT) == -signal.SIGKILL
    second = procs.selector(config, overrides, tmp_path / "second.log", port)
    second.wait_serving(START_TIMEOUT)
    received = [rank.finish() for rank in ranks]

    for rank, batches in zip(ranks, received):
        assert reconnects.seen[rank.name].is_set(), f"{rank.name} never went through the restart"
        assert all(m.startswith("selector unavailable (") for m in reconnects.messages[rank.name])
        assert [b.step for b in batches] == list(range(total)), "each step exactly once, in order"
    for step in range(total):
        ids = [i for r in range(W) for i in received[r][step].ids]
        assert len(ids) == W * B and len(set(ids)) == W * B  # the ranks' shares stay disjoint

    # Everything delivered was journaled first: a fresh stream from step 0 reads the same batches.
    for r in range(W):
        fresh = take(CoresetStream(target, rank=r, world_size=W, start_step=0, config_fingerprint=fp),
                     total)
        assert_same_batches(received[r], fresh)
    assert second.terminate() == 0, second.log()
    assert "Traceback" not in first.log() + second.log()


@pytest.mark.parametrize("yaml_extra,overrides,key", [
    ({}, ["selector.batch_size=100"], "selector.batch_size"),  # b > L = 64
    ({}, ["selector.batch_sise=4"], "selector.batch_sise"),  # unknown key on the command line
    ({"service": {"prot": 50051}}, [], "service.prot"),  # unknown key in the file
])
def test_a_bad_config_exits_nonzero_naming_the_key(tmp_path, yaml_extra, overrides, key):
    port = free_port()
    work = tmp_path / "work"
    doc = {"data": {"urls": str(tmp_path / "shard-{0..1}.tar")},
           "selector": {"batch_size": 4, "large_batch_size": 64},
           "service": {"port": port, "work_dir": str(work)}}
    for section, body in yaml_extra.items():
        doc[section].update(body)
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(doc))
    args = [SELECTOR, "serve", "--config", str(config)]
    for item in overrides:
        args += ["--set", item]
    done = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=START_TIMEOUT)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert f"error: {key}" in done.stderr
    assert "serving on" not in done.stdout + done.stderr
    assert not work.exists()  # refused before anything was built
    with socket.socket() as s:  # and nothing is listening on its port
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_a_selector_whose_shards_are_missing_never_serves_and_exits_nonzero(tmp_path, procs):
    config, overrides, _ = write_config(tmp_path)
    shutil.rmtree(tmp_path / "shards")  # the job names shards that do not exist
    sel = procs.selector(config, overrides, tmp_path / "selector.log", free_port())
    deadline = time.monotonic() + START_TIMEOUT + EXIT_TIMEOUT  # load, fail, stop
    answers = []
    request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
    with grpc.insecure_channel(sel.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while sel.proc.poll() is None:
            assert time.monotonic() < deadline, (
                f"still running after {START_TIMEOUT + EXIT_TIMEOUT:.0f}s:\n{sel.log()}")
            try:
                answers.append(health_pb2.HealthCheckResponse.ServingStatus.Name(
                    stub.Check(request, timeout=1.0, wait_for_ready=True).status))
            except grpc.RpcError as err:  # not listening yet, or no longer
                answers.append(err.code().name)
            try:  # between two checks: wait on the process, not a sleep
                sel.proc.wait(0.1)
            except subprocess.TimeoutExpired:
                pass
    log = sel.log()
    assert "SERVING" not in answers, (answers, log)
    assert sel.proc.returncode == 1, log
    assert "producer failed" in log and "no valid record in 4 shard(s)" in log
    assert "cannot go on: RuntimeError: no valid record" in log and "health is NOT_SERVING" in log
    assert "selector exiting with status 1" in log
    assert "selector for job 'default' serving" not in log


def _writes_refused(folder: Path) -> bool:
    """True when creating a file in ``folder`` fails, as its permission bits say it should."""
    probe = folder / "probe"
    try:
        probe.touch()
    except PermissionError:
        return True
    probe.unlink()
    return False


@pytest.mark.parametrize("kind", ["a file", "under a file", "not writable"])
def test_a_work_dir_that_is_not_a_writable_folder_is_a_config_error(tmp_path, kind):
    config, overrides, _ = write_config(tmp_path)
    work = tmp_path / "work"  # write_config's service.work_dir
    if kind == "not writable":
        work.mkdir()
        work.chmod(0o555)
        if not _writes_refused(work):
            work.chmod(0o755)
            pytest.skip("permission bits do not stop writes here (running as root)")
    else:
        work.write_text("a file\n")
        if kind == "under a file":
            overrides = [*overrides, f"service.work_dir={work / 'sub'}"]
    port = free_port()
    args = [SELECTOR, "serve", "--config", str(config)]
    for item in [*overrides, f"service.port={port}"]:
        args += ["--set", item]
    try:
        done = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=START_TIMEOUT)
    finally:
        if work.is_dir():
            work.chmod(0o755)
    assert done.returncode == 2, (done.returncode, done.stderr)
    message = {"a file": f"error: service.work_dir: '{work}' exists and is not a directory",
               "under a file": f"error: service.work_dir: cannot create '{work / 'sub'}': '{work}' is not a "
                               "directory",
               "not writable": f"error: service.work_dir: '{work}' is not writable (Permission denied)"}[kind]
    assert message in done.stderr
    assert "Traceback" not in done.stderr and "listening on" not in done.stdout + done.stderr
    assert work.read_text() == "a file\n" if kind != "not writable" else not any(work.iterdir())
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
