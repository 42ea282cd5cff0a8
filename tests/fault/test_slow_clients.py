"""Clients that stall, trickle or flood: the selector stays answerable and bounds what they cost.

A real selector on 127.0.0.1 with clients that open calls and never send their first message,
pushes that send a header and stop, a push that declares the right header and then sends 100 MB
(to a selector process of its own, whose peak RSS is read from /proc). The server counts the calls
it has waiting on their clients (``SelectorServer.waiting``), so the tests wait for "all stalled
calls are open" instead of guessing with sleeps; the deadline tests configure deadlines of a
second or two.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from colm_client.stream import CoresetStream
from colm_client.sync import AdapterSync
from colm_server.config import to_dict
from colm_server.model.load import attach_lora, load_model
from colm_server.service.server import SelectorServer
from colm_stream.launch import SelectorProcess
from colm_wire.adapter import adapter_state
from colm_wire.proto import selector_pb2 as pb
from colm_wire.proto import selector_pb2_grpc as pb_grpc
from conftest import lora_model
from test_flow import bounded
from test_prometheus import scrape
from test_service import make_config, take, target

TIMEOUT = 60.0  # upper bound of every wait; a passing test never gets near it
STALLED = 24  # idle streams, and as many stalled pushes
MIB = 1 << 20


def start(tmp_path: Path, **service) -> SelectorServer:
    overrides = {"service.world_size": 1, **{f"service.{k}": v for k, v in service.items()}}
    srv = SelectorServer(make_config(tmp_path, **overrides))
    srv.start()
    return srv


class Held:
    """A request stream the test controls: it sends what it is given and otherwise stalls."""

    def __init__(self, *first: pb.AdapterChunk | pb.StreamRequest):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        for message in first:
            self._queue.put(message)

    def __iter__(self) -> Iterator:
        while (message := self._queue.get()) is not None:
            yield message

    def end(self) -> None:
        self._queue.put(None)


def header_chunk(srv: SelectorServer) -> pb.AdapterChunk:
    """A valid first chunk: the header of the selector's first LoRA tensor, no data yet."""
    name, tensor = next(iter(srv.job.adapter.items()))
    return pb.AdapterChunk(job_id="default", header=pb.TensorHeader(
        name=name, shape=list(tensor.shape), dtype="float32", nbytes=tensor.numel() * 4))


def waiting_for(srv: SelectorServer, **expected: int) -> None:
    """Block until the server counts exactly these calls waiting on their clients."""
    def reached(counts: dict[str, int]) -> bool:
        return all(counts.get(on, 0) == n for on, n in expected.items())

    assert srv.waiting.wait_for(reached, TIMEOUT), f"waiting {srv.waiting.counts()}, expected {expected}"


def health_and_status_seconds(srv: SelectorServer) -> tuple[float, float]:
    """Seconds a fresh client takes for a health check and for a Status, each with a 1 s deadline."""
    started = time.perf_counter()
    with grpc.insecure_channel(target(srv)) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
    health = time.perf_counter() - started
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    started = time.perf_counter()
    with grpc.insecure_channel(target(srv)) as channel:
        status = pb_grpc.SelectorStub(channel).Status(pb.StatusRequest(), timeout=1.0)
    assert status.job_id == "default"
    return health, time.perf_counter() - started


def test_stalled_streams_and_pushes_leave_health_status_and_a_trainer_answered(tmp_path):
    srv = start(tmp_path, first_message_timeout=600.0, chunk_timeout=600.0,  # only the test ends them
                metrics_port=0)
    held: list[Held] = []
    calls = []
    try:
        with grpc.insecure_channel(target(srv)) as channel:
            stub = pb_grpc.SelectorStub(channel)
            for _ in range(STALLED):
                held.append(Held())
                calls.append(stub.Stream(iter(held[-1]), timeout=TIMEOUT * 10))
                held.append(Held(header_chunk(srv)))
                calls.append(stub.PushAdapter.future(iter(held[-1]), timeout=TIMEOUT * 10))
            slots = srv.config.service.max_pushes
            waiting_for(srv, join=STALLED, next_chunk=slots, push_slot=STALLED - slots)
            gauge = {dict(labels)["on"]: v for (name, labels), v in scrape(srv).items()
                     if name == "colm_calls_waiting"}
            assert gauge == {"first_chunk": 0, "join": STALLED, "next_chunk": slots,
                             "push_slot": STALLED - slots}

            timings = [health_and_status_seconds(srv) for _ in range(5)]
            worst_health, worst_status = (max(t[i] for t in timings) for i in range(2))
            print(f"\n{STALLED} idle streams + {STALLED} stalled pushes open: health answered in "
                  f"<= {worst_health * 1000:.0f} ms, Status in <= {worst_status * 1000:.0f} ms")
            assert worst_health < 1.0 and worst_status < 1.0

            # A trainer joins while all of them are still open, and gets its steps in order.
            stream = CoresetStream(target(srv), rank=0, world_size=1, reconnect_timeout=TIMEOUT)
            assert [b.step for b in bounded(take, stream, 4)] == [0, 1, 2, 3]
            waiting_for(srv, join=STALLED, next_chunk=slots, push_slot=STALLED - slots)

            for call in calls:
                call.cancel()
            # Cancelled by their clients, the calls leave the server.
            waiting_for(srv, join=0, first_chunk=0, next_chunk=0, push_slot=0)
    finally:
        for h in held:
            h.end()
        srv.stop(grace=1)


def test_each_awaited_message_has_a_deadline_naming_it(tmp_path):
    srv = start(tmp_path, first_message_timeout=1.0, chunk_timeout=1.5)
    held = [Held(), Held(), Held(header_chunk(srv))]
    try:
        with grpc.insecure_channel(target(srv)) as channel:
            stub = pb_grpc.SelectorStub(channel)
            started = time.perf_counter()
            stream = stub.Stream(iter(held[0]), timeout=TIMEOUT)
            silent = stub.PushAdapter.future(iter(held[1]), timeout=TIMEOUT)
            stalled = stub.PushAdapter.future(iter(held[2]), timeout=TIMEOUT)
            with pytest.raises(grpc.RpcError) as joined:
                next(stream)
            errors = [joined.value, silent.exception(TIMEOUT), stalled.exception(TIMEOUT)]
            elapsed = time.perf_counter() - started
        assert [e.code() for e in errors] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 3
        assert [e.details() for e in errors] == [
            "the first message (a Join) was not received within 1 s (service.first_message_timeout)",
            "the first adapter chunk was not received within 1 s (service.first_message_timeout)",
            "the next adapter chunk was not received within 1.5 s (service.chunk_timeout)"]
        assert 1.0 <= elapsed < TIMEOUT  # ended by the selector, long before the calls' own deadlines
        assert srv.job.param_version == 0
        health, status = health_and_status_seconds(srv)  # and it serves as before
        assert health < 1.0 and status < 1.0
    finally:
        for h in held:
            h.end()
        srv.stop(grace=1)


def test_a_push_beyond_max_pushes_waits_for_a_slot(tmp_path):
    srv = start(tmp_path, max_pushes=1, chunk_timeout=600.0)
    holder = Held(header_chunk(srv))
    try:
        with grpc.insecure_channel(target(srv)) as channel:
            held = pb_grpc.SelectorStub(channel).PushAdapter.future(iter(holder), timeout=TIMEOUT)
            waiting_for(srv, next_chunk=1)
            sync = AdapterSync(target(srv), lora_model("llama", seed=3), every=1, rank=0, timeout=TIMEOUT)
            try:
                versions: list[int] = []
                pushed = threading.Thread(target=lambda: versions.append(sync.push(step=0)), daemon=True)
                pushed.start()
                waiting_for(srv, next_chunk=1, push_slot=1)  # the valid push waits behind the stalled one
                assert not versions
                held.cancel()  # the slot frees: the waiting push is received and applied
                pushed.join(TIMEOUT)
                assert versions == [1] and srv.job.param_version == 1
            finally:
                sync.close()
    finally:
        holder.end()
        srv.stop(grace=1)


def test_a_push_that_finds_no_slot_in_time_is_refused_resource_exhausted(tmp_path):
    srv = start(tmp_path, max_pushes=1, chunk_timeout=2.0)
    stop = threading.Event()

    def trickle() -> Iterator[pb.AdapterChunk]:
        """Holds the only slot by sending empty chunks, each well within the chunk deadline."""
        yield header_chunk(srv)
        while not stop.is_set():
            yield pb.AdapterChunk()

    try:
        with grpc.insecure_channel(target(srv)) as channel:
            stub = pb_grpc.SelectorStub(channel)
            holder = stub.PushAdapter.future(trickle(), timeout=TIMEOUT)
            waiting_for(srv, next_chunk=1)
            with pytest.raises(grpc.RpcError) as err:
                stub.PushAdapter(iter([header_chunk(srv)]), timeout=TIMEOUT)
            stop.set()
            assert holder.exception(TIMEOUT).code() == grpc.StatusCode.INVALID_ARGUMENT  # incomplete
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.value.details() == ("all 1 push slots are taken (service.max_pushes) and none "
                                       "freed within 2 s (service.chunk_timeout)")
        assert srv.job.param_version == 0
    finally:
        stop.set()
        srv.stop(grace=1)


def rss_kib(pid: int, field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} missing from /proc/{pid}/status")


def reset_peak_rss(pid: int) -> bool:
    """Reset a process's peak RSS (VmHWM) to its current RSS; False where Linux does not allow it."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return rss_kib(pid, "VmHWM") <= rss_kib(pid, "VmRSS") + 1024


def first_tensor(config) -> tuple[str, list[int]]:
    """Name and shape of the first LoRA tensor of the model in ``config``, built as the selector does."""
    mc = config.model
    model = attach_lora(load_model(mc.source, num_layers=mc.num_layers), r=mc.lora_r, alpha=mc.lora_alpha,
                        targets=mc.lora_targets)
    name, tensor = next(iter(adapter_state(model).items()))
    return name, list(tensor.shape)


def test_a_push_sending_100_mb_after_a_right_header_is_refused_before_the_selector_grows(tmp_path):
    # prefetch 1: once SERVING, the producer idles at the bound and the selector allocates nothing else
    config = make_config(tmp_path, **{"service.world_size": 1, "service.prefetch": 1})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    name, shape = first_tensor(config)
    header = pb.AdapterChunk(job_id="default", header=pb.TensorHeader(
        name=name, shape=shape, dtype="float32", nbytes=4 * math.prod(shape)))
    sent = [0]

    def flood() -> Iterator[pb.AdapterChunk]:
        yield header
        for _ in range(100):  # 100 MiB, made lazily: the client holds one chunk at a time
            sent[0] += 1
            yield pb.AdapterChunk(data=bytes(MIB))

    with SelectorProcess(path, log_path=tmp_path / "selector.log") as selector:
        selector.wait_serving()
        pid = selector.proc.pid
        with grpc.insecure_channel(selector.target) as channel:
            stub = pb_grpc.SelectorStub(channel)
            with pytest.raises(grpc.RpcError):  # warm the connection up: a short push, refused
                stub.PushAdapter(iter([header, pb.AdapterChunk(data=bytes(8))]), timeout=TIMEOUT)
            if not reset_peak_rss(pid):
                pytest.skip("this kernel does not let a process reset its peak RSS (/proc/PID/clear_refs)")
            before = rss_kib(pid, "VmRSS")
            with pytest.raises(grpc.RpcError) as err:
                stub.PushAdapter(flood(), timeout=TIMEOUT)
            growth_mib = (rss_kib(pid, "VmHWM") - before) / 1024
            version = stub.Status(pb.StatusRequest(), timeout=TIMEOUT).param_version
    print(f"\n100 MiB after a right header: refused after the client made {sent[0]} MiB; "
          f"the selector's peak RSS grew by {growth_mib:.1f} MiB")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more bytes than the" in err.value.details()
    assert sent[0] < 20  # refused at the first chunk; most of the 100 MiB was never even made
    assert growth_mib < 8
    assert version == 0
