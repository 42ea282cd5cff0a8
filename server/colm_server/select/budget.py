"""Per-source budgets: keep small sources whole, share the rest in proportion (CoLM, section 2.1).

Small sources are where uniform sampling loses the most; CoLM keeps all of their samples
and spends what is left of the budget on the large sources, in proportion to their counts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any


class SourceTracker:
    """Running counts of each source seen in the stream, to tell small sources from large."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.total = 0

    def observe(self, sources: Sequence[str]) -> None:
        """Count one more sample of each entry of ``sources``."""
        self.counts.update(sources)
        self.total += len(sources)

    def observe_counts(self, counts: Mapping[str, int]) -> None:
        """Count ``counts[s]`` more samples of each source ``s`` at once (e.g. a dataset's sizes)."""
        _check_counts(counts)
        self.counts.update(counts)
        self.total += sum(counts.values())

    def share(self, source: str) -> float:
        """Fraction of the samples seen so far that came from ``source`` (0 before any)."""
        return self.counts[source] / self.total if self.total else 0.0

    def small_sources(
        self, present: Iterable[str], keep: Collection[str], threshold: float
    ) -> set[str]:
        """The sources of ``present`` named in ``keep`` or whose running share is under ``threshold``."""
        return {s for s in present if s in keep or self.share(s) < threshold}

    def state_dict(self) -> dict[str, Any]:
        """A copy of the running counts."""
        return {"counts": dict(self.counts)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict()``."""
        counts = {str(s): int(c) for s, c in state["counts"].items()}
        if any(c < 0 for c in counts.values()):
            raise ValueError("source counts must be non-negative")
        self.counts = Counter(counts)
        self.total = sum(counts.values())


def _check_counts(counts: Mapping[str, int]) -> None:
    negative = [s for s, c in counts.items() if c < 0]
    if negative:
        raise ValueError(f"source counts must be non-negative, got {negative}")


def proportional_split(counts: Mapping[str, int], total: int) -> dict[str, int]:
    """Split ``min(total, sum(counts))`` over sources in proportion to ``counts``, exactly.

    Largest remainder: floors of the exact quotas, then one more each to the largest
    fractions (ties: larger count, then name). Integer arithmetic, so no rounding drift.
    """
    _check_counts(counts)
    whole = sum(counts.values())
    total = max(0, min(total, whole))
    if total == 0:
        return {s: 0 for s in counts}
    # quota of s = total * c / whole = share[s] + remainder[s] / whole
    share = {s: total * c // whole for s, c in counts.items()}
    remainder = {s: total * c % whole for s, c in counts.items()}
    left = total - sum(share.values())
    for s in sorted(counts, key=lambda s: (-remainder[s], -counts[s], s)):
        if left == 0:
            break
        if share[s] < counts[s]:
            share[s] += 1
            left -= 1
    return share


def allocate_budget(
    counts: Mapping[str, int], budget: int, small: Collection[str]
) -> dict[str, int]:
    """How many samples to take from each source of ``counts``; they sum to ``min(budget, total)``.

    Small sources are kept whole when they fit and the large ones share the rest in
    proportion; when the small ones alone exceed the budget they share it and large get 0.
    """
    _check_counts(counts)
    budget = max(0, budget)
    small_counts = {s: c for s, c in counts.items() if s in small}
    large_counts = {s: c for s, c in counts.items() if s not in small}
    small_total = sum(small_counts.values())
    if small_total <= budget:
        alloc = dict(small_counts)
        alloc.update(proportional_split(large_counts, budget - small_total))
    else:
        alloc = proportional_split(small_counts, budget)
        alloc.update({s: 0 for s in large_counts})
    return {s: alloc[s] for s in counts}
