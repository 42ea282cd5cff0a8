"""Greedy facility location: pick the samples whose gradients best cover a source's batch.

The weighted gradient of the picks approximates the whole batch's gradient when each
pick is weighted by the number of samples it covers (CoLM, section 2.5; CRAIG).
"""

from __future__ import annotations

import torch

SIMILARITIES = ("l1", "euclidean", "cosine")


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
        unit = torch.nn.functional.normalize(x, dim=1)
        sim = ((1 + unit @ unit.T) / 2).clamp_(0.0, 1.0)
        sim.fill_diagonal_(1.0)
        return sim
    # The matmul shortcut for p=2 loses precision (non-zero self-distances); avoid it.
    dist = torch.cdist(
        x, x, p=1.0 if metric == "l1" else 2.0, compute_mode="donot_use_mm_for_euclid_dist"
    )
    dist.fill_diagonal_(0.0)
    return dist.max() - dist


def facility_location(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedily maximise ``F(S) = sum_i max_{s in S} sim[i, s]`` over ``|S| = k``; ``sim >= 0``.

    Returns ``order`` (the picks, in the order chosen) and ``counts`` (how many of the ``n``
    points each pick covers best; they sum to ``n``), the picks' weights.
    """
    n = sim.shape[0]
    if sim.shape != (n, n):
        raise ValueError(f"similarity must be square, got shape {tuple(sim.shape)}")
    if not sim.is_floating_point():
        sim = sim.float()
    k = min(k, n)
    empty = torch.empty(0, dtype=torch.long, device=sim.device)
    if k <= 0:
        return empty, empty.clone()
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
    return order, assignment_counts(sim, order)


def assignment_counts(sim: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """For each pick, how many points have it as their most similar pick.

    Ties go to the earliest pick, except that a pick tied with itself keeps itself, so
    every count is at least 1 whenever ``sim[s, s]`` is the row's maximum.
    """
    k = order.numel()
    picked = sim[:, order]  # [n, k]
    best, assign = picked.max(dim=1)
    slot = torch.arange(k, device=sim.device)
    keeps_self = picked[order, slot] >= best[order]
    assign[order[keeps_self]] = slot[keeps_self]
    return torch.bincount(assign, minlength=k)
