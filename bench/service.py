"""What the service adds to a training step: delivery overhead and time spent waiting for data.

A real selector process (`colm-selector serve`) on loopback serves W rank processes.
1. Delivery overhead: the selector first journals `--steps` steps (prefetch covers them),
   then every rank pulls them as fast as it can; the time of each `next()` is what
   delivering a step costs a trainer (journal read, tensors to bytes, gRPC, bytes to tensors).
2. Waiting: the ranks do `--compute-ms` of matrix work per step while the selector keeps
   ahead (the `random` strategy); the share of wall time spent inside `next()` is the
   share a trainer waits for data.

    python bench/service.py                  # b=64 x 512 tokens, W in 1 2 4
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
import torch
import webdataset as wds

from colm_client.stream import CoresetStream
from colm_wire.proto import selector_pb2 as pb
from colm_wire.proto import selector_pb2_grpc as pb_grpc

BIN = Path(sys.executable).parent


def write_shards(folder: Path, n: int, chars: int) -> str:
    """n records of about `chars` characters (the tiny tokenizer: one token per character)."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    shards = 8
    for s in range(shards):
        with wds.TarWriter(str(folder / f"s-{s}.tar")) as sink:
            for i in range(s, n, shards):
                text = "".join(rng.choice("abcdefgh ") for _ in range(chars))
                rec = {"id": f"r{i}", "source": f"src{i % 5}", "prompt": text[: chars // 4],
                       "response": text[chars // 4:]}
                sink.write({"__key__": f"r{i}", "json": rec})
    return str(folder / f"s-{{0..{shards - 1}}}.tar")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_selector(urls: str, work: Path, world: int, b: int, prefetch: int, length: int):
    port = free_port()
    sets = {
        "data.urls": urls, "data.buffer": 0, "model.source": "tiny:llama",
        "tokenize.max_length": length, "tokenize.chat_template": "false",
        "selector.strategy": "random", "selector.batch_size": b, "selector.large_batch_size": 2 * b,
        "service.world_size": world, "service.port": port, "service.work_dir": str(work),
        "service.prefetch": prefetch, "service.max_inflight": prefetch,
        "service.journal_retention": 2 * prefetch + 8,
    }
    args = [str(BIN / "colm-selector"), "serve", "--log-level", "WARNING"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    proc = subprocess.Popen(args)
    target = f"127.0.0.1:{port}"
    grpc.channel_ready_future(grpc.insecure_channel(target)).result(timeout=120)
    return proc, target


def wait_selected(target: str, steps: int, timeout: float = 600) -> None:
    """Poll Status until `steps` steps are journaled."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.SelectorStub(ch)
        while stub.Status(pb.StatusRequest()).selected_steps < steps:
            if time.monotonic() > deadline:
                raise TimeoutError("selector too slow")
            time.sleep(0.05)  # polling interval of a progress check, not synchronisation


def rank_main(target: str, rank: int, world: int, steps: int, compute_ms: float, out) -> None:
    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    waits, computes = [], []
    stream = iter(CoresetStream(target, rank=rank, world_size=world))
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(stream)
        t1 = time.perf_counter()
        waits.append(t1 - t0)
        assert batch.input_ids.shape[0] > 0
        while (time.perf_counter() - t1) * 1000 < compute_ms:  # stand-in for a training step
            a = (a @ a).tanh_()
        computes.append(time.perf_counter() - t1)
    total = time.perf_counter() - start
    out.put({"rank": rank, "waits": waits, "total": total, "tokens": int(batch.attention_mask.sum())})


def run_ranks(target: str, world: int, steps: int, compute_ms: float) -> list[dict]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(target, r, world, steps, compute_ms, q))
             for r in range(world)]
    for p in procs:
        p.start()
    results = [q.get(timeout=900) for _ in procs]
    for p in procs:
        p.join(60)
    return results


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--b", type=int, default=64)
    p.add_argument("--length", type=int, default=512, help="tokens per sample")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--compute-ms", type=float, default=200.0)
    p.add_argument("--work", type=Path, default=Path("/tmp/colm-bench-service"))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results/service.md")
    args = p.parse_args(argv)
    rows = []
    for world in args.ranks:
        records = 2 * args.b * world * (args.steps + 4) * 2
        urls = write_shards(args.work / f"w{world}/shards", records, args.length)
        for mode, compute in (("delivery", 0.0), ("waiting", args.compute_ms)):
            work = args.work / f"w{world}/{mode}"
            shutil.rmtree(work, ignore_errors=True)
            prefetch = args.steps + 1 if mode == "delivery" else 4
            proc, target = start_selector(urls, work, world, args.b, prefetch, args.length)
            try:
                if mode == "delivery":
                    wait_selected(target, args.steps)
                res = run_ranks(target, world, args.steps, compute)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
            waits = [w * 1000 for r in res for w in r["waits"][1:]]  # the first includes the join
            wait_share = sum(sum(r["waits"][1:]) for r in res) / sum(r["total"] for r in res)
            rows.append({"ranks": world, "mode": mode, "median_ms": statistics.median(waits),
                         "p99_ms": percentile(waits, 0.99), "wait_share": wait_share,
                         "tokens": res[0]["tokens"]})
            print(rows[-1], flush=True)
    lines = ["# Service: delivery overhead and data waits on loopback", "",
             f"Command: `python bench/service.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
             "", f"b={args.b} samples of {args.length} tokens per rank and step, {args.steps} steps, "
             f"{os.cpu_count()} CPU cores shared by the selector and the ranks.", "",
             "| ranks | mode | median ms / step | p99 ms / step | share of time waiting |",
             "|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['ranks']} | {r['mode']} | {r['median_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['wait_share']:.2%} |")
    lines += ["", "delivery: steps already journaled, ranks pull back to back (pure overhead). "
              f"waiting: ranks compute {args.compute_ms:.0f} ms per step while the selector "
              "(strategy random) keeps ahead."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    (args.out.with_suffix(".json")).write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
