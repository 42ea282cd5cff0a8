"""Facility location: the vectorised greedy equals the textbook greedy and is near-optimal."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from colm_server.select.facility import SIMILARITIES, facility_location, pairwise_similarity


def coverage(sim: torch.Tensor, picks) -> float:
    """F(S) = sum_i max_{s in S} sim[i, s], with F(empty) = 0."""
    picks = list(picks)
    return float(sim[:, picks].max(dim=1).values.sum()) if picks else 0.0


def naive_greedy(sim: torch.Tensor, k: int) -> list[int]:
    """Reference: one candidate at a time, python loops, first maximum wins."""
    rows = sim.tolist()
    n, chosen, cover = len(rows), [], [0.0] * len(rows)
    for _ in range(min(k, n)):
        best, best_gain = None, -math.inf
        for j in range(n):
            if j not in chosen:
                gain = sum(max(rows[i][j] - cover[i], 0.0) for i in range(n))
                if gain > best_gain:
                    best, best_gain = j, gain
        chosen.append(best)
        cover = [max(c, rows[i][best]) for i, c in enumerate(cover)]
    return chosen


def random_points(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("metric", SIMILARITIES)
def test_similarity_is_symmetric_nonnegative_with_self_as_row_max(metric):
    sim = pairwise_similarity(random_points(15, 4, seed=0), metric)
    assert sim.shape == (15, 15)
    assert torch.all(sim >= 0)
    torch.testing.assert_close(sim, sim.T)
    assert torch.all(sim.diagonal() >= sim.max(dim=1).values)


def test_l1_similarity_is_max_distance_minus_distance():
    x = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, -1.0]])
    dist = torch.tensor([[0.0, 3.0, 4.0], [3.0, 0.0, 5.0], [4.0, 5.0, 0.0]])
    torch.testing.assert_close(pairwise_similarity(x, "l1"), 5.0 - dist)


def test_unknown_similarity_is_refused_by_name():
    with pytest.raises(ValueError, match="similarity"):
        pairwise_similarity(torch.randn(3, 2), "manhattan")


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("metric", SIMILARITIES)
def test_vectorised_greedy_equals_naive_greedy(seed, metric):
    sim = pairwise_similarity(random_points(14, 3, seed), metric)
    order, counts = facility_location(sim, 6)
    assert order.tolist() == naive_greedy(sim, 6)
    assert counts.sum() == 14 and torch.all(counts >= 1)


@pytest.mark.parametrize("seed", range(10))
def test_greedy_reaches_one_minus_one_over_e_of_the_optimum(seed):
    n, k = 9, 3
    sim = pairwise_similarity(random_points(n, 2, seed + 100), "l1")
    optimum = max(coverage(sim, s) for s in itertools.combinations(range(n), k))
    order, _ = facility_location(sim, k)
    assert coverage(sim, order.tolist()) >= (1 - 1 / math.e) * optimum - 1e-9


def test_counts_are_the_sizes_of_each_picks_cluster():
    # Two tight clusters far apart: two picks, one per cluster, weighted by cluster size.
    x = torch.cat([torch.zeros(5, 2), torch.full((3, 2), 10.0)]) + 0.01 * random_points(8, 2, 0)
    order, counts = facility_location(pairwise_similarity(x.float()), 2)
    clusters = {int(i) // 5: int(c) for i, c in zip(order, counts)}
    assert clusters == {0: 5, 1: 3}


def test_duplicate_points_each_keep_themselves():
    # All points equal: every pick ties with every other, yet each covers at least itself.
    sim = pairwise_similarity(torch.ones(6, 3))
    order, counts = facility_location(sim, 4)
    assert sorted(order.tolist()) == order.tolist() == [0, 1, 2, 3]
    assert counts.tolist() == [3, 1, 1, 1]


def test_k_bounds():
    sim = pairwise_similarity(random_points(7, 2, seed=5))
    order, counts = facility_location(sim, 50)
    assert sorted(order.tolist()) == list(range(7)) and counts.tolist() == [1] * 7
    for k in (0, -3):
        order, counts = facility_location(sim, k)
        assert order.numel() == 0 and counts.numel() == 0
    order, counts = facility_location(torch.zeros(0, 0), 3)
    assert order.numel() == 0 and counts.numel() == 0
