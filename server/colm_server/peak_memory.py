"""Peak memory of this process: resident set (CPU) and torch's accelerator allocations."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import torch


def peak_rss_bytes() -> int:
    """The largest resident set size this process has had, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def peak_device_bytes() -> int:
    """The most CUDA memory torch has held allocated at once in this process (0 without CUDA)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0
    return int(max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())))


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
