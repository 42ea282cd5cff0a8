"""Score one large batch on several processes: each scores its share, the sketches are gathered.

Every replica holds the same batch and the same model. Replica ``r`` of ``R`` scores a
contiguous share of the rows; the per-sample sketches (``[n_r, D]``, small after projection)
and losses are all-gathered, so every replica ends up with the sketch of the whole batch and
runs the same budgets and facility location on it. Per-sample scores do not depend on which
other samples share a chunk, so the gathered sketch is the single-process one up to float
rounding, and so is the selection.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from colm_server.select.batch import TokenBatch
from colm_server.select.scoring import Scorer
from colm_server.select.sketch import DenseSketch, LowRankSketch, Sketch


def share(num_rows: int, rank: int, world: int) -> range:
    """Rows replica ``rank`` scores: contiguous, sizes differing by at most one."""
    base, extra = divmod(num_rows, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def all_gather_rows(local: torch.Tensor, sizes: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate every replica's ``[sizes[r], ...]`` rows in rank order (padded to gather).

    Gathered through host memory, so one gloo group serves CPU and GPU replicas alike: the rows
    are sketches (``[n, D]``, small), not activations.
    """
    longest = max(sizes)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype)
    padded[: local.shape[0]] = local.cpu()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]).to(local.device)


class ReplicaScorer:
    """A `Scorer` whose work on each batch is split over the replicas of ``group``."""

    def __init__(self, scorer: Scorer, group: dist.ProcessGroup | None = None):
        if not dist.is_initialized():
            raise RuntimeError("ReplicaScorer needs torch.distributed to be initialised")
        self.scorer, self.group = scorer, group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    @property
    def config(self):
        return self.scorer.config

    def _mine(self, batch: TokenBatch) -> tuple[TokenBatch, list[int]]:
        rows = share(len(batch), self.rank, self.world)
        sizes = [len(share(len(batch), r, self.world)) for r in range(self.world)]
        return batch.subset(list(rows)), sizes

    def sketch(self, batch: TokenBatch, step: int) -> Sketch:
        """The whole batch's sketch, each replica having scored its share."""
        mine, sizes = self._mine(batch)
        local = self.scorer.sketch(mine, step)
        if isinstance(local, LowRankSketch):  # zo: probes are a function of (seed, step)
            return LowRankSketch(all_gather_rows(local.coeffs, sizes, self.group), local.directions)
        if isinstance(local, DenseSketch):
            return DenseSketch(all_gather_rows(local.grads, sizes, self.group))
        raise TypeError(f"cannot gather a {type(local).__name__}")

    def losses(self, batch: TokenBatch) -> torch.Tensor:
        """Per-sample losses of the whole batch, each replica having computed its share."""
        mine, sizes = self._mine(batch)
        return all_gather_rows(self.scorer.losses(mine), sizes, self.group)
