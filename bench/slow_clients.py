"""A selector under misbehaving clients: calls that stall, and a push that floods after a right header.

A real selector process on loopback (``python -m colm_server.service serve``, the tiny model, one
rank). The probe
1. opens ``--stalled`` Stream calls that never send their Join and as many pushes that send a
   valid header and stall, waits until the selector counts them all (``colm_calls_waiting``; a
   selector without that gauge gets ``--settle`` seconds), then times health checks and Status
   calls from fresh connections, each with a 1 s deadline, and has a trainer (CoresetStream) pull
   ``--steps`` steps while all of them stay open;
2. resets the selector's peak RSS (``/proc/PID/clear_refs``) and sends ``--floods`` concurrent
   pushes that declare the right header of a LoRA tensor and then send ``--flood-mb`` MiB each in
   1 MiB chunks; reports how the peak RSS (VmHWM) grew and how each push ended.

``--code DIR`` runs the selector from another copy of the project's ``server/`` and ``client/``
(e.g. ``git archive HEAD server client | tar -x -C DIR``) for a before/after comparison; with
``--no-deadlines`` no ``service.*_timeout`` keys are passed (a selector that predates them).

    python bench/slow_clients.py
    python bench/slow_clients.py --code /tmp/old --no-deadlines --floods 1 --flood-mb 100
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import webdataset as wds
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from colm_client.stream import CoresetStream
from colm_server.data.synthetic import synthetic_stream
from colm_server.model.load import attach_lora, load_model
from colm_stream.launch import SelectorProcess, free_port
from colm_wire.adapter import adapter_state
from colm_wire.proto import selector_pb2 as pb
from colm_wire.proto import selector_pb2_grpc as pb_grpc

MIB = 1 << 20
LORA_R = 4


class Held:
    """A request stream that sends what it was given and then stalls until ended."""

    def __init__(self, *first):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        for message in first:
            self._queue.put(message)

    def __iter__(self) -> Iterator:
        while (message := self._queue.get()) is not None:
            yield message

    def end(self) -> None:
        self._queue.put(None)


def write_job(folder: Path, metrics_port: int) -> Path:
    """Shards of the synthetic mixture and a job file for a one-rank selector on the tiny model."""
    records = synthetic_stream(seed=0)
    with wds.TarWriter(str(folder / "s-0.tar")) as sink:
        for _ in range(4000):
            record = next(records)
            sink.write({"__key__": record["id"], "json": record})
    doc = {
        "data": {"urls": str(folder / "s-0.tar"), "buffer": 64},
        "model": {"source": "tiny:llama", "lora_r": LORA_R},
        "tokenize": {"max_length": 64, "chat_template": False},
        "selector": {"strategy": "random", "batch_size": 4, "large_batch_size": 8},
        "service": {"world_size": 1, "prefetch": 2, "max_inflight": 2, "work_dir": str(folder / "work"),
                    "metrics_port": metrics_port},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def first_tensor() -> tuple[str, list[int]]:
    """Name and shape of the selector's first LoRA tensor (the same tiny model, built here)."""
    name, tensor = next(iter(adapter_state(attach_lora(load_model("tiny:llama"), r=LORA_R)).items()))
    return name, list(tensor.shape)


def waiting(metrics: str) -> dict[str, float] | None:
    """``colm_calls_waiting`` by label from the selector's metrics; None when it has no such gauge."""
    try:
        text = urllib.request.urlopen(metrics, timeout=2).read().decode()
    except OSError:
        return None
    found = dict(re.findall(r'^colm_calls_waiting\{on="(\w+)"\} ([0-9.e+]+)$', text, re.M))
    return {k: float(v) for k, v in found.items()} if "colm_calls_waiting" in text else None


def wait_open(metrics: str, stalled: int, settle: float) -> str:
    """Wait until the selector counts every stalled call; say how that was known."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        counts = waiting(metrics)
        if counts is None:
            time.sleep(settle)
            return f"no colm_calls_waiting gauge: waited {settle:g} s"
        if counts.get("join", 0) == stalled and sum(counts.values()) == 2 * stalled:
            return f"colm_calls_waiting: {counts}"
        time.sleep(0.05)
    return f"not all counted after 60 s: {waiting(metrics)}"


def timed_calls(target: str, n: int) -> dict[str, list]:
    """Seconds of n health checks and n Status calls, each from a fresh connection, or the error code."""
    out: dict[str, list] = {"health": [], "status": []}
    for _ in range(n):
        for kind in out:
            started = time.perf_counter()
            try:
                with grpc.insecure_channel(target) as channel:
                    if kind == "health":
                        request = health_pb2.HealthCheckRequest()
                        health_pb2_grpc.HealthStub(channel).Check(request, timeout=1.0)
                    else:
                        pb_grpc.SelectorStub(channel).Status(pb.StatusRequest(), timeout=1.0)
                out[kind].append(time.perf_counter() - started)
            except grpc.RpcError as err:
                out[kind].append(err.code().name)
    return out


def pull(target: str, steps: int, limit: float) -> dict:
    """A trainer pulling ``steps`` steps; how many it got within ``limit`` seconds and how long each took."""
    got: list[float] = []
    stream = CoresetStream(target, rank=0, world_size=1, reconnect_timeout=limit)

    def run() -> None:
        last = time.perf_counter()
        for _ in stream:
            now = time.perf_counter()
            got.append(now - last)
            last = now
            if len(got) == steps:
                break

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    return {"steps": len(got), "of": steps, "within_s": limit,
            "step_ms": [round(s * 1000, 1) for s in got]}


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing for pid {pid}")


def flood(target: str, pid: int, floods: int, mib: int) -> dict:
    """``floods`` concurrent pushes: a right header, then ``mib`` MiB; the selector's peak RSS growth."""
    name, shape = first_tensor()
    header = pb.AdapterChunk(job_id="default", header=pb.TensorHeader(
        name=name, shape=shape, dtype="float32", nbytes=4 * math.prod(shape)))
    made = [0] * floods

    def chunks(i: int) -> Iterator[pb.AdapterChunk]:
        yield header
        for _ in range(mib):
            made[i] += 1
            yield pb.AdapterChunk(data=bytes(MIB))

    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = rss_kib(pid, "VmRSS")
    started = time.perf_counter()
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.SelectorStub(channel)
        calls = [stub.PushAdapter.future(chunks(i), timeout=600) for i in range(floods)]
        ends = []
        for call in calls:
            err = call.exception()
            ends.append("OK" if err is None else f"{err.code().name}: {err.details()}")
    return {"floods": floods, "mib_each": mib, "seconds": round(time.perf_counter() - started, 2),
            "rss_before_mib": round(before / 1024, 1),
            "peak_growth_mib": round((rss_kib(pid, "VmHWM") - before) / 1024, 1),
            "mib_made_by_clients": made, "ended": sorted(set(ends))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stalled", type=int, default=24, help="idle streams, and as many stalled pushes")
    parser.add_argument("--calls", type=int, default=20, help="health checks and Status calls timed")
    parser.add_argument("--steps", type=int, default=8, help="steps the trainer pulls meanwhile")
    parser.add_argument("--floods", type=int, default=4, help="concurrent flooding pushes")
    parser.add_argument("--flood-mb", type=int, default=400, help="MiB each flooding push sends")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds given to open calls on a selector without the gauge")
    parser.add_argument("--code", type=Path, help="run the selector from this copy's server/ and client/")
    parser.add_argument("--no-deadlines", action="store_true", help="pass no service.*_timeout keys")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()

    env = dict(os.environ)
    if args.code is not None:
        env["PYTHONPATH"] = os.pathsep.join(str(args.code / p) for p in ("server", "client"))
    with tempfile.TemporaryDirectory() as tmp:
        metrics_port = free_port()
        job = write_job(Path(tmp), metrics_port)
        # Deadlines far beyond the probe: the stalled calls stay open while it measures.
        overrides = [] if args.no_deadlines else ["service.first_message_timeout=600",
                                                  "service.chunk_timeout=600"]
        result: dict = {"stalled_streams": args.stalled, "stalled_pushes": args.stalled,
                        "code": str(args.code or "this checkout")}
        with SelectorProcess(job, overrides, log_path=Path(tmp) / "selector.log", env=env) as selector:
            selector.wait_serving()
            target, pid = selector.target, selector.proc.pid
            held = [Held() for _ in range(args.stalled)]
            name, shape = first_tensor()
            header = pb.AdapterChunk(job_id="default", header=pb.TensorHeader(
                name=name, shape=shape, dtype="float32", nbytes=4 * math.prod(shape)))
            held += [Held(header) for _ in range(args.stalled)]
            channel = grpc.insecure_channel(target)
            stub = pb_grpc.SelectorStub(channel)
            calls = [stub.Stream(iter(h), timeout=900) for h in held[:args.stalled]]
            calls += [stub.PushAdapter.future(iter(h), timeout=900) for h in held[args.stalled:]]
            result["open"] = wait_open(f"http://127.0.0.1:{metrics_port}/metrics", args.stalled, args.settle)
            times = timed_calls(target, args.calls)
            for kind, values in times.items():
                ok = [v for v in values if isinstance(v, float)]
                result[kind] = {"answered": len(ok), "of": len(values),
                                "errors": sorted({v for v in values if isinstance(v, str)}),
                                "median_ms": round(statistics.median(ok) * 1000, 1) if ok else None,
                                "max_ms": round(max(ok) * 1000, 1) if ok else None}
            result["trainer"] = pull(target, args.steps, limit=20.0)
            for call in calls:
                call.cancel()
            for h in held:
                h.end()
            channel.close()
            result["flood"] = flood(target, pid, args.floods, args.flood_mb)
            selector.terminate()
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
