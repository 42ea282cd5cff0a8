"""Wall time and peak memory of one call, comparable side by side within a run."""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _release_freed_memory() -> None:
    """Hand memory that earlier calls freed back to the OS (glibc keeps it otherwise), so the
    resident set before a call is what is live and its growth is the call's own peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: growth may then be under-counted
        pass


def measure(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, float, int]:
    """Run `fn`; return its result, seconds, and peak memory it added.

    On CUDA the peak is ``max_memory_allocated`` above the allocation at the start; on CPU it
    is the peak resident set size above the start, sampled every millisecond.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(device)
        return out, time.perf_counter() - start, torch.cuda.max_memory_allocated(device) - base
    _release_freed_memory()
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.001):
            peak[0] = max(peak[0], _rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        out = fn()
    finally:
        elapsed = time.perf_counter() - start
        done.set()
        sampler.join()
    peak[0] = max(peak[0], _rss())
    return out, elapsed, peak[0] - base
