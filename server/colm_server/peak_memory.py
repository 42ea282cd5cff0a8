"""Peak memory of this process: resident set (CPU) and torch's accelerator allocations."""

from __future__ import annotations

import resource
import sys

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
