"""Peak memory of this process: resident set (CPU) and torch's accelerator allocations.

The CUDA peak can be watched per window (one selection: `DevicePeakWindow`) while
`peak_device_bytes` still reports the process's lifetime peak: a window's reset first folds
the peak so far into the lifetime figure.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from pathlib import Path

import torch

_lock = threading.Lock()
_closed_windows_peak = 0  # the largest CUDA peak of the windows ended by `reset_device_peak`


def peak_rss_bytes() -> int:
    """The largest resident set size this process has had, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _window_peak() -> int:
    """The largest of the devices' peaks since their last reset."""
    return int(max((torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())),
                   default=0))


def peak_device_bytes() -> int:
    """The most CUDA memory torch has held allocated at once in this process (0 without CUDA),
    over its whole life: per-window resets do not lower it."""
    if not _cuda_in_use():
        return 0
    with _lock:
        return max(_closed_windows_peak, _window_peak())


def window_peak_device_bytes() -> int:
    """The most CUDA memory held at once since the last `reset_device_peak` (0 without CUDA)."""
    if not _cuda_in_use():
        return 0
    with _lock:
        return _window_peak()


def reset_device_peak() -> None:
    """Start a new peak window on every CUDA device; the lifetime peak keeps the ended one's."""
    global _closed_windows_peak
    if not _cuda_in_use():
        return
    with _lock:
        _closed_windows_peak = max(_closed_windows_peak, _window_peak())
        for d in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(d)


class DevicePeakWindow:
    """``with DevicePeakWindow() as w: ...``; then ``w.device_bytes`` is the CUDA peak of the
    block alone (the memory already held when it began included), 0 without CUDA."""

    device_bytes: int = 0

    def __enter__(self) -> DevicePeakWindow:
        reset_device_peak()
        return self

    def __exit__(self, *exc: object) -> None:
        self.device_bytes = window_peak_device_bytes()


def current_rss_bytes() -> int:
    """This process's resident set size now, in bytes (Linux; 0 where /proc is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def current_device_bytes() -> int:
    """CUDA memory torch holds allocated now (0 without CUDA)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0
    return int(max(torch.cuda.memory_allocated(d) for d in range(torch.cuda.device_count())))
