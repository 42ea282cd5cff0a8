"""The step journal: every step's per-rank batches and the service state after it, on disk.

A step is journaled before any rank may receive it, so a reconnecting rank gets exactly the
batches it would have had and a restarted selector continues where it stopped.

Layout under ``work_dir/journal/``: ``step-<012d>.pt`` per step and ``state.pt`` holding the last
committed step number and the service state. Files are written to ``*.tmp``, fsynced and moved
into place with ``os.replace``; the state file goes last, so it is the commit point.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from colm_server.service.batches import RankBatch

STATE_FILE = "state.pt"
CACHE_STEPS = 64  # recent steps kept decoded: streaming to W ranks reads each step file once
_STEP_FILE = re.compile(r"step-(\d+)\.pt")
_PLAIN = (type(None), bool, int, float, str, bytes, torch.Tensor, torch.dtype)


class StepNotJournaled(KeyError):
    """A step outside the journal's window: older than retention, or not selected yet."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _step_path(root: Path, step: int) -> Path:
    return root / f"step-{step:012d}.pt"


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, obj: Any) -> None:
    """Save `obj` to `path` so that `path` is either the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _check_plain(value: Any, where: str = "state") -> None:
    """Refuse what ``torch.load(weights_only=True)`` could not read back, before it is committed."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} must be str or int")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(f"{where}: {type(value).__name__} is not a plain value or tensor")


def _pack(rb: RankBatch) -> dict:
    """One rank's batch as compact tensors: tokens flat int32 with per-row lengths."""
    return {
        "rank": rb.rank,
        "epoch": rb.epoch,
        "param_version": rb.param_version,
        "ids": list(rb.ids),
        "sources": list(rb.sources),
        "weights": torch.tensor(rb.weights, dtype=torch.float64),
        "tokens": rb.tokens.to(torch.int32).contiguous(),
        "lengths": torch.tensor(rb.lengths, dtype=torch.int64),
        "prompt_lens": torch.tensor(rb.prompt_lens, dtype=torch.int32),
        "step_weight_sum": float(rb.step_weight_sum),
    }


def _unpack(step: int, d: dict, step_weight_sum: float) -> RankBatch:
    return RankBatch(
        step=step,
        rank=d["rank"],
        epoch=d["epoch"],
        param_version=d["param_version"],
        ids=list(d["ids"]),
        sources=list(d["sources"]),
        weights=d["weights"].tolist(),
        tokens=d["tokens"],
        lengths=d["lengths"].tolist(),
        prompt_lens=d["prompt_lens"].tolist(),
        step_weight_sum=float(d.get("step_weight_sum", step_weight_sum)),
    )


def _unpack_step(step: int, packed: list[dict]) -> dict[int, RankBatch]:
    """Every rank's batch of a step file, by rank. A file written before batches carried the step's
    total weight gets it from the step itself: the sum of every rank's weights."""
    total = float(sum(d["weights"].sum() for d in packed))
    return {d["rank"]: _unpack(step, d, total) for d in packed}


class Journal:
    """Durable, append-only record of selected steps with a retention window of the newest steps.

    One writer per work dir. ``read`` is safe to call from several threads while one commits.
    """

    def __init__(self, work_dir: str | Path, retention: int = 1000) -> None:
        if retention < 1:
            raise ValueError(f"retention must be >= 1, got {retention}")
        self.root = Path(work_dir) / "journal"
        self.root.mkdir(parents=True, exist_ok=True)
        self.retention = retention
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, dict[int, RankBatch]] = OrderedDict()
        self._first: int | None = None
        self._last: int | None = None
        self._recover()

    def _recover(self) -> None:
        """Take the last step from the state file; drop temp files and steps it does not cover."""
        for tmp in self.root.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        state_path = self.root / STATE_FILE
        if state_path.exists():
            self._last = int(torch.load(state_path, weights_only=True)["step"])
        steps = set()
        for path in self.root.glob("step-*.pt"):
            m = _STEP_FILE.fullmatch(path.name)
            if m is None:
                continue
            step = int(m.group(1))
            if self._last is None or step > self._last:
                path.unlink()  # written by a commit that never reached its state file
            else:
                steps.add(step)
        if self._last is not None and self._last not in steps:
            raise RuntimeError(f"{self.root}: state says step {self._last} but its step file is missing")
        if self._last is not None:
            first = self._last
            while first - 1 in steps:
                first -= 1
            self._first = first
            self._prune()

    def _prune(self) -> None:
        """Delete step files before the retention window (and any stragglers before a gap)."""
        assert self._first is not None and self._last is not None
        keep_from = max(self._first, self._last - self.retention + 1)
        for path in self.root.glob("step-*.pt"):
            m = _STEP_FILE.fullmatch(path.name)
            if m is not None and int(m.group(1)) < keep_from:
                path.unlink(missing_ok=True)
        self._first = keep_from
        for step in [s for s in self._cache if s < keep_from]:
            del self._cache[step]

    @property
    def first_step(self) -> int | None:
        """Oldest step still readable; None when nothing is journaled."""
        return self._first

    @property
    def last_step(self) -> int | None:
        """Newest committed step; None when nothing is journaled."""
        return self._last

    def commit(self, step: int, ranks: list[RankBatch], state: dict) -> None:
        """Durably record `step` (the next one in order) with the service state after it.

        Returns once both are on disk; on an exception nothing becomes visible and the same
        step may be committed again.
        """
        with self._lock:
            expected = 0 if self._last is None else self._last + 1
            if step != expected:
                raise ValueError(f"steps are committed in order: expected step {expected}, got {step}")
            rank_ids = [rb.rank for rb in ranks]
            if not ranks or len(set(rank_ids)) != len(rank_ids):
                raise ValueError(f"step {step}: need one batch per rank, got ranks {rank_ids}")
            if any(rb.step != step for rb in ranks):
                raise ValueError(f"step {step}: batches carry steps {[rb.step for rb in ranks]}")
            _check_plain(state)
            packed = [_pack(rb) for rb in ranks]
            _write_atomic(_step_path(self.root, step), {"step": step, "ranks": packed})
            _write_atomic(self.root / STATE_FILE, {"step": step, "state": state})
            self._last = step
            self._first = step if self._first is None else self._first
            # Cache what a reader after a restart would get, not the caller's (mutable) objects.
            self._remember(step, _unpack_step(step, packed))
            self._prune()

    def _remember(self, step: int, batches: dict[int, RankBatch]) -> None:
        self._cache[step] = batches
        self._cache.move_to_end(step)
        while len(self._cache) > CACHE_STEPS:
            self._cache.popitem(last=False)

    def _window(self) -> str:
        if self._last is None:
            return "the journal is empty"
        return f"available steps are {self._first}..{self._last}"

    def read(self, step: int, rank: int) -> RankBatch:
        """Rank `rank`'s batch of `step`, from the cache or the step file; shared, do not mutate."""
        with self._lock:
            if self._last is None or not self._first <= step <= self._last:
                raise StepNotJournaled(f"step {step} is not journaled: {self._window()}")
            batches = self._cache.get(step)
            if batches is None:
                data = torch.load(_step_path(self.root, step), weights_only=True)
                batches = _unpack_step(step, data["ranks"])
                self._remember(step, batches)
            else:
                self._cache.move_to_end(step)
        if rank not in batches:
            raise ValueError(f"step {step} has no rank {rank}; it has ranks {sorted(batches)}")
        return batches[rank]

    def state(self) -> dict | None:
        """The service state saved with the last committed step (what a restarted selector loads)."""
        with self._lock:
            path = self.root / STATE_FILE
            if self._last is None or not path.exists():
                return None
            return torch.load(path, weights_only=True)["state"]

    def size_bytes(self) -> int:
        """Bytes the journal occupies on disk."""
        with self._lock:  # a commit may be deleting files
            return sum(p.stat().st_size for p in self.root.iterdir() if p.is_file())
