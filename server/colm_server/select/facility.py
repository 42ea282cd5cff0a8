"""Greedy facility location: pick the samples whose gradients best cover a source's batch.

The weighted gradient of the picks approximates the whole batch's gradient when each
pick is weighted by the number of samples it covers (CoLM, section 2.5; CRAIG).

Memory: one ``[n, n]`` similarity (float32: 4 MiB at n = 1024, 256 MiB at 8192, 1 GiB at
16384), ``O(n)`` vectors and working blocks of at most ``BLOCK_ELEMENTS`` entries.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

SIMILARITIES = ("l1", "euclidean", "cosine")
BLOCK_ELEMENTS = 1 << 21  # entries of a working block: at most 16 MiB (float64)


def pairwise_similarity(x: torch.Tensor, metric: str = "l1") -> torch.Tensor:
    """Non-negative ``[n, n]`` similarity of the rows of ``x``; each row's maximum is on the diagonal.

    ``l1``/``euclidean``: ``max(D) - D`` for pairwise distances ``D``; ``cosine``: ``(1 + cos) / 2``.
    """
    if metric not in SIMILARITIES:
        raise ValueError(f"unknown similarity {metric!r}; expected one of {SIMILARITIES}")
    if x.dtype != torch.float64:
        x = x.float()  # half precision loses the small distance differences greedy ranks by
    n = x.shape[0]
    if n == 0:
        return x.new_zeros(0, 0)
    if metric == "cosine":
        sim = gram(torch.nn.functional.normalize(x, dim=1)).add_(1).div_(2).clamp_(0.0, 1.0)
        sim.fill_diagonal_(1.0)
        return sim
    dist = euclidean_distances(x) if metric == "euclidean" else torch.cdist(x, x, p=1.0)
    dist.fill_diagonal_(0.0)
    farthest = dist.max()
    return dist.neg_().add_(farthest)


def euclidean_distances(x: torch.Tensor) -> torch.Tensor:
    """``[n, n]`` euclidean distances of the rows of ``x`` from one matmul (their Gram matrix).

    The rows are centred first: distances do not change, and ``|x|^2`` shrinks to the scale of
    the distances, so ``|a|^2 + |b|^2 - 2 a.b`` loses far less to cancellation in float32.
    Exactly symmetric, so that candidates whose gains are equal in exact arithmetic stay tied
    (and go to the lowest index) whatever the rounding of the features.
    """
    x = x - x.mean(dim=0)
    sq = x.square().sum(dim=1)
    d2 = gram(x).mul_(-2)
    size = max(1, BLOCK_ELEMENTS // max(len(x), 1))
    for start in range(0, len(x), size):  # |a|^2 + |b|^2 is the same sum for (a, b) and (b, a)
        d2[start:start + size].add_(sq[start:start + size, None] + sq[None, :])
    return d2.clamp_(min=0).sqrt_()


def gram(x: torch.Tensor) -> torch.Tensor:
    """``x @ x.T``, exactly symmetric. On the CPU through numpy, whose ``a @ a.T`` is one BLAS
    symmetric rank-k update (syrk): half the work of torch's general matmul."""
    if x.device.type != "cpu":
        g = x @ x.T
        return (g + g.T).div_(2)  # a general matmul need not round (i, j) and (j, i) alike
    a = x.detach().numpy()
    return torch.from_numpy(a @ a.T)


def facility_location(
    sim: torch.Tensor, k: int, method: str = "incremental"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedily maximise ``F(S) = sum_i max_{s in S} sim[i, s]`` over ``|S| = k``; ``sim >= 0``.

    Returns ``order`` (the picks, in the order chosen) and ``counts`` (how many of the ``n``
    points each pick covers best; they sum to ``n``), the picks' weights. ``method`` is one of
    `GREEDY`; both make the textbook greedy's picks, the first maximum winning, and differ only
    where gains tie up to rounding: ``incremental`` compares those in float64, ``dense`` in
    ``sim``'s dtype.
    """
    n = sim.shape[0]
    if sim.shape != (n, n):
        raise ValueError(f"similarity must be square, got shape {tuple(sim.shape)}")
    if method not in GREEDY:
        raise ValueError(f"unknown greedy method {method!r}; expected one of {tuple(GREEDY)}")
    if sim.dtype not in (torch.float32, torch.float64):
        sim = sim.float()
    k = min(k, n)
    empty = torch.empty(0, dtype=torch.long, device=sim.device)
    if k <= 0:
        return empty, empty.clone()
    order = GREEDY[method](sim, k)
    return order, assignment_counts(sim, order)


def dense_greedy(sim: torch.Tensor, k: int) -> torch.Tensor:
    """Every candidate's gain recomputed from the whole matrix at every step, ``O(k n^2)``: the
    textbook greedy vectorised, kept as the reference the incremental one is measured against."""
    n = sim.shape[0]
    cover = sim.new_zeros(n)  # current max_{s in S} sim[i, s]
    taken = torch.zeros(n, dtype=torch.bool, device=sim.device)
    order = torch.empty(k, dtype=torch.long, device=sim.device)
    for step in range(k):
        gains = (sim - cover[:, None]).clamp_(min=0).sum(dim=0)  # gain of each candidate column
        gains[taken] = -torch.inf
        pick = gains.argmax()  # first maximum: ties go to the lowest index
        order[step] = pick
        taken[pick] = True
        cover = torch.maximum(cover, sim[:, pick])
    return order


def incremental_greedy(sim: torch.Tensor, k: int) -> torch.Tensor:
    """The same picks with the gains kept up to date: a pick changes them only through the rows
    whose cover it raises, ``O(raised rows x n)`` per step; few rows are raised after the first.

    Runs on the CPU (on a host copy of ``sim`` when it is elsewhere), summing in float64.
    """
    s = sim.detach().cpu().numpy()
    n = s.shape[0]
    gains = np.zeros(n)  # with nothing covered yet: sum_i max(s[i, j], 0)
    for rows in _blocks(np.arange(n), n):
        gains += np.maximum(s[rows], 0).sum(axis=0, dtype=np.float64)
    if not np.isfinite(gains).all():
        raise ValueError("similarity must be finite")
    top = float(max(s.max(), 0.0))
    drift = (n + k) * float(gains.max())  # bound on the rounding of the updates, in units of 2^-53
    cover = np.zeros(n, dtype=s.dtype)
    order = np.empty(k, dtype=np.int64)
    for step in range(k):
        # Candidates within twice the rounding bound of the best are compared on fresh gains,
        # so that ties go to the lowest index, as in the dense greedy.
        near = np.flatnonzero(gains >= gains.max() - drift * 2.0**-52)
        pick = near[0] if len(near) == 1 else near[np.argmax(_gains(s, cover, near))]
        order[step] = pick
        gains[pick] = -np.inf
        column = s[:, pick]
        raised = np.flatnonzero(column > cover)
        for rows in _blocks(raised, n):
            gains -= _lost_gains(s[rows], cover[rows], column[rows])
            drift += (2 * len(rows) + 1) * len(rows) * top
        cover[raised] = column[raised]
    return torch.from_numpy(order).to(sim.device)


def _blocks(index: np.ndarray, width: int) -> list[np.ndarray]:
    """``index`` in pieces of at most ``BLOCK_ELEMENTS // width`` entries."""
    size = max(1, BLOCK_ELEMENTS // max(width, 1))
    return [index[i:i + size] for i in range(0, len(index), size)]


def _lost_gains(rows: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """What each candidate's gain loses when these rows' cover rises from ``low`` to ``high``:
    ``sum_i max(s - low, 0) - max(s - high, 0) = sum_i clip(s, low, high) - sum_i low``.

    Clipping is exact in ``s``'s dtype; the two sums, in float64, round by at most
    ``len(rows)^2 * max(s) * 2^-53`` each, which the caller adds to its drift bound.
    """
    np.maximum(rows, low[:, None], out=rows)
    np.minimum(rows, high[:, None], out=rows)
    return rows.sum(axis=0, dtype=np.float64) - low.sum(dtype=np.float64)


def _gains(s: np.ndarray, cover: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Fresh gains ``sum_i max(s[i, j] - cover[i], 0)`` of the candidate ``columns``, in float64."""
    out = np.empty(len(columns))
    size = max(1, BLOCK_ELEMENTS // max(len(s), 1))
    for start in range(0, len(columns), size):
        part = s[:, columns[start:start + size]].astype(np.float64)
        part -= cover[:, None]
        out[start:start + size] = np.maximum(part, 0, out=part).sum(axis=0)
    return out


GREEDY: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "incremental": incremental_greedy,
    "dense": dense_greedy,
}


def assignment_counts(sim: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """For each pick, how many points have it as their most similar pick.

    Ties go to the earliest pick, except that a pick tied with itself keeps itself, so
    every count is at least 1 whenever ``sim[s, s]`` is the row's maximum.
    """
    n, k = sim.shape[0], order.numel()
    best = sim.new_empty(n)
    assign = torch.empty(n, dtype=torch.long, device=sim.device)
    size = max(1, BLOCK_ELEMENTS // max(k, 1))
    for start in range(0, n, size):  # [rows, k] at a time instead of the whole [n, k]
        best[start:start + size], assign[start:start + size] = sim[start:start + size, order].max(dim=1)
    slot = torch.arange(k, device=sim.device)
    keeps_self = sim[order, order] >= best[order]
    assign[order[keeps_self]] = slot[keeps_self]
    return torch.bincount(assign, minlength=k)
