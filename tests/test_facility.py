"""Facility location: both greedy methods equal the textbook greedy and are near-optimal."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from colm_server.select import facility
from colm_server.select.facility import GREEDY, SIMILARITIES, facility_location, pairwise_similarity


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


def naive_counts(sim: torch.Tensor, picks: list[int]) -> list[int]:
    """Reference: each point goes to its most similar pick, the earliest on ties; a pick tied
    with an earlier one for itself keeps itself."""
    rows, counts = sim.tolist(), [0] * len(picks)
    for i, row in enumerate(rows):
        best = max(row[p] for p in picks)
        slot = picks.index(i) if i in picks and row[i] >= best else [row[p] for p in picks].index(best)
        counts[slot] += 1
    return counts


def random_points(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("metric", SIMILARITIES)
def test_similarity_is_symmetric_nonnegative_with_self_as_row_max(metric):
    sim = pairwise_similarity(random_points(15, 4, seed=0), metric)
    assert sim.shape == (15, 15)
    assert torch.all(sim >= 0)
    assert torch.equal(sim, sim.T)  # exactly: tied gains must stay tied
    assert torch.all(sim.diagonal() >= sim.max(dim=1).values)


def test_l1_similarity_is_max_distance_minus_distance():
    x = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, -1.0]])
    dist = torch.tensor([[0.0, 3.0, 4.0], [3.0, 0.0, 5.0], [4.0, 5.0, 0.0]])
    torch.testing.assert_close(pairwise_similarity(x, "l1"), 5.0 - dist)


def test_unknown_similarity_or_method_and_non_finite_similarity_are_refused():
    with pytest.raises(ValueError, match="similarity"):
        pairwise_similarity(torch.randn(3, 2), "manhattan")
    with pytest.raises(ValueError, match="greedy method"):
        facility_location(torch.ones(3, 3), 2, method="lazy")
    with pytest.raises(ValueError, match="finite"):
        facility_location(torch.tensor([[1.0, math.nan], [math.nan, 1.0]]), 1)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_euclidean_similarity_matches_direct_differences(dtype, rtol):
    # Distances come from the Gram matrix; the reference takes every difference x_i - x_j.
    # An offset far from the origin is where the Gram matrix would lose most without centring.
    x = random_points(200, 64, seed=4).to(dtype) + 100.0
    direct = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    sim = pairwise_similarity(x, "euclidean")
    torch.testing.assert_close(sim, direct.max() - direct, rtol=0, atol=rtol * float(direct.max()))


def test_euclidean_picks_match_direct_differences_on_clustered_points():
    gen = torch.Generator().manual_seed(5)
    centres = 4 * torch.randn(12, 32, generator=gen)
    x = centres[torch.randint(12, (240,), generator=gen)] + torch.randn(240, 32, generator=gen)
    direct = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    for k in (60, 120):
        order, counts = facility_location(pairwise_similarity(x, "euclidean"), k)
        want_order, want_counts = facility_location(direct.max() - direct, k)
        assert order.tolist() == want_order.tolist() and counts.tolist() == want_counts.tolist()


@pytest.mark.parametrize("method", GREEDY)
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("metric", SIMILARITIES)
def test_greedy_equals_naive_greedy_with_its_cluster_sizes(method, seed, metric):
    sim = pairwise_similarity(random_points(14, 3, seed), metric)
    order, counts = facility_location(sim, 6, method=method)
    assert order.tolist() == naive_greedy(sim, 6)
    assert counts.tolist() == naive_counts(sim, order.tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("metric", SIMILARITIES)
def test_incremental_greedy_makes_the_dense_greedys_picks(metric, dtype):
    # Sizes and budgets as the selector gives them (b/L = 1/2, 1/4, all); rounded points have
    # many exactly tied gains, which both methods must give to the lowest index.
    gen = torch.Generator().manual_seed(7)
    for n, k, rounded in [(300, 150, False), (256, 64, False), (200, 200, True), (120, 60, True)]:
        x = torch.randn(n, 6, generator=gen, dtype=dtype) * (1.5 if rounded else 1.0)
        sim = pairwise_similarity(x.round() if rounded else x, metric)
        order, counts = facility_location(sim, k)
        want_order, want_counts = facility_location(sim, k, method="dense")
        assert order.tolist() == want_order.tolist(), (n, k, rounded)
        assert counts.tolist() == want_counts.tolist(), (n, k, rounded)


def test_exactly_tied_gains_go_to_the_lowest_index_whatever_the_rounding():
    # Zo coefficients of one source of five samples. Once 4 is picked, 1 and 2 are each
    # other's nearest: picking either gains d(1, S) + d(2, S) - d(1, 2) in exact arithmetic.
    # Features that differ by rounding (replicas scoring other chunks) must not move the tie.
    x = torch.tensor([[0.596, -0.392, 1.199, -0.659], [-0.208, -1.122, -0.213, -1.563],
                      [-0.276, -1.429, -0.362, -1.463], [-0.284, -0.208, -0.134, -1.184],
                      [-0.005, -1.015, 0.342, -1.107]])
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        noisy = x + 1e-6 * torch.randn(x.shape, generator=gen)
        order, counts = facility_location(pairwise_similarity(noisy, "euclidean"), 2)
        assert order.tolist() == [4, 1] and counts.tolist() == [3, 2]


def test_blockwise_work_gives_the_same_picks(monkeypatch):
    # Large batches are worked through in blocks of rows; blocks of 40 entries here.
    sim = pairwise_similarity(random_points(90, 5, seed=3).round(), "euclidean")
    whole = facility_location(sim, 45)
    monkeypatch.setattr(facility, "BLOCK_ELEMENTS", 40)
    blocked = facility_location(sim, 45)
    assert torch.equal(whole[0], blocked[0]) and torch.equal(whole[1], blocked[1])


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
