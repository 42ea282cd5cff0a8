"""Load: many ranks pulling many steps from one selector process, with its memory watched.

Starts a real ``colm-selector`` (tiny Llama + LoRA, colm strategy) on loopback and W rank
processes, each pulling every step through ``CoresetStream`` (tokens included) and checking
what it gets. The selector's resident memory is sampled from /proc while it works; its growth
after warm-up shows whether anything accumulates per step.

    python bench/load.py                      # 8 ranks x 2000 steps
    python bench/load.py --ranks 2 --steps 200
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

import webdataset as wds
import yaml

from colm_server.data.synthetic import synthetic_stream
from colm_stream.launch import SelectorProcess

L, B = 8, 4


def pull(target: str, rank: int, world: int, steps: int, out: mp.Queue) -> None:
    """One rank: pull ``steps`` batches; report count, errors and whether every step came in order."""
    from colm_client import CoresetStream

    started, errors, in_order, samples = time.perf_counter(), [], True, 0
    try:
        stream = CoresetStream(target, rank=rank, world_size=world, reconnect_timeout=60)
        for expected, batch in zip(range(steps), stream):
            in_order &= batch.step == expected and len(batch.ids) == B
            samples += len(batch.ids)
        stream.close()
    except Exception as exc:  # noqa: BLE001 - counted and reported
        errors.append(repr(exc))
    out.put({"rank": rank, "samples": samples, "errors": errors, "in_order": in_order,
             "seconds": time.perf_counter() - started})


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    command = "python bench/load.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        records = [r for _, r in zip(range(20000), synthetic_stream(seed=0))]
        (tmp / "shards").mkdir()
        for s in range(8):
            with wds.TarWriter(str(tmp / "shards" / f"shard-{s}.tar")) as sink:
                for r in records[s::8]:
                    sink.write({"__key__": r["id"], "json": r})
        config = tmp / "job.yaml"
        config.write_text(yaml.safe_dump({
            "model": {"source": "tiny:llama", "lora_r": 4},
            "data": {"urls": str(tmp / "shards" / "shard-{0..7}.tar")},
            "tokenize": {"max_length": 64},
            "selector": {"strategy": "colm", "batch_size": B, "large_batch_size": L, "zo_dim": 256},
            "service": {"world_size": args.ranks, "work_dir": str(tmp / "work"), "prefetch": 4,
                        "journal_retention": 64},
        }))
        env = os.environ | {"OMP_NUM_THREADS": "1"}
        with SelectorProcess(config, log_path=tmp / "selector.log", env=env) as selector:
            selector.wait_serving()
            samples_rss: list[tuple[float, int]] = []
            stop = threading.Event()

            def watch() -> None:
                while not stop.wait(0.5):
                    samples_rss.append((time.perf_counter(), rss(selector.proc.pid)))

            watcher = threading.Thread(target=watch, daemon=True)
            queue: mp.Queue = mp.get_context("spawn").Queue()
            ranks = [mp.get_context("spawn").Process(target=pull, args=(selector.target, r, args.ranks,
                                                                         args.steps, queue))
                     for r in range(args.ranks)]
            started = time.perf_counter()
            watcher.start()
            for proc in ranks:
                proc.start()
            results = [queue.get() for _ in ranks]
            for proc in ranks:
                proc.join()
            seconds = time.perf_counter() - started
            stop.set()
            watcher.join()
            status = selector.status()
            assert selector.terminate() == 0, selector.log()
    steps_done = int(status["selected_steps"])
    warm = [m for t, m in samples_rss if t - started > 0.1 * seconds]  # after the first tenth
    growth = (warm[-1] - warm[0]) / warm[0] if len(warm) > 1 else float("nan")
    errors = [e for r in results for e in r["errors"]]
    result = {
        "command": command, "ranks": args.ranks, "steps": args.steps, "seconds": seconds,
        "steps_per_second": args.steps / seconds,
        "samples_per_second": sum(r["samples"] for r in results) / seconds,
        "errors": errors, "all_in_order": all(r["in_order"] for r in results),
        "selected_steps": steps_done, "rss_after_warmup": warm[0] if warm else None,
        "rss_end": warm[-1] if warm else None, "rss_peak": max(m for _, m in samples_rss),
        "rss_growth_after_warmup": growth, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load.json").write_text(json.dumps(result, indent=2) + "\n")
    text = (
        f"# Load: {args.ranks} ranks x {args.steps} steps on loopback\n\n"
        f"Command: `{command}`  \nMachine: {result['machine']}\n\n"
        f"Selector: `colm-selector` process, tiny Llama + LoRA r=4, colm strategy, b={B} of L={L} per "
        f"rank; each rank a process pulling every step (tokens included) through CoresetStream.\n\n"
        "| ranks | steps | errors | every step in order | wall time | steps/s | samples/s "
        "| selector RSS after warm-up | at the end | growth | peak |\n"
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n"
        f"| {args.ranks} | {args.steps} | {len(errors)} | {'yes' if result['all_in_order'] else 'NO'} "
        f"| {seconds:.0f} s | {result['steps_per_second']:.1f} | {result['samples_per_second']:.0f} "
        f"| {result['rss_after_warmup'] / 2**20:.0f} MiB | {result['rss_end'] / 2**20:.0f} MiB "
        f"| {growth:+.1%} | {result['rss_peak'] / 2**20:.0f} MiB |\n\n"
        "Warm-up: the first tenth of the run. RSS sampled from /proc every 0.5 s.\n"
    )
    if errors:
        text += "\nErrors:\n" + "".join(f"- {e}\n" for e in errors[:10])
    (args.out / "load.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
