"""Sparsify: per-source top coordinates, read block by block, equal to the dense computation."""

from __future__ import annotations

import pytest
import torch

from colm_server.select.normalize import AdamNormalizer
from colm_server.select.sketch import DenseSketch, LowRankSketch
from colm_server.select.sparsify import gather_features, top_coordinates

L, D, K = 12, 23, 4


class RecordingSketch(LowRankSketch):
    """A low-rank sketch that remembers the widest column read it served."""

    widest = 0

    def columns(self, idx):
        out = super().columns(idx)
        self.widest = max(self.widest, out.shape[1])
        return out


def make_sketch(kind: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    if kind == "dense":
        return DenseSketch(torch.randn(L, D, generator=gen))
    return RecordingSketch(torch.randn(L, K, generator=gen), torch.randn(K, D, generator=gen))


def trained_normalizer(sketch) -> AdamNormalizer:
    """A normalizer with non-trivial state: two selections folded in."""
    norm = AdamNormalizer()
    norm.update(sketch, torch.tensor([0, 5, 6]))
    norm.update(sketch, torch.tensor([2, 3]))
    return norm


def dense_u(sketch, norm: AdamNormalizer | None) -> torch.Tensor:
    """Reference: materialise G and apply the normalisation formula to all of it."""
    g = sketch.columns(slice(0, sketch.dim))
    if norm is None:
        return g
    t = norm.count + 1
    m_n = norm.beta1 * norm.m + (1 - norm.beta1) * g
    v_n = norm.beta2 * norm.v + (1 - norm.beta2) * g**2
    return (m_n / (1 - norm.beta1**t)) / ((v_n / (1 - norm.beta2**t)).sqrt() + norm.eps)


GROUPS = [torch.tensor([0, 1, 2, 3]), torch.tensor([4, 9]), torch.tensor([5, 6, 7, 8, 10, 11])]


@pytest.mark.parametrize("kind", ["dense", "lowrank"])
@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("block", [1, 4, 7, D, 100])
@pytest.mark.parametrize("k", [1, 5, D - 1])
def test_chunked_top_coordinates_equal_dense_reference(kind, normalized, block, k):
    sketch = make_sketch(kind, seed=block * 31 + k)
    norm = trained_normalizer(sketch) if normalized else None
    u = dense_u(sketch, norm)
    if kind == "lowrank":
        sketch.widest = 0
    got = top_coordinates(sketch, norm, GROUPS, k, block=block)
    assert len(got) == len(GROUPS)
    for rows, coords in zip(GROUPS, got):
        want = u[rows].mean(0).abs().topk(k).indices.sort().values
        assert torch.equal(coords, want)
    if kind == "lowrank":
        assert sketch.widest <= block  # never more than one block of columns at a time


def test_indices_are_sorted_unique_and_in_range():
    sketch = make_sketch("lowrank", seed=3)
    for coords in top_coordinates(sketch, trained_normalizer(sketch), GROUPS, 9, block=5):
        assert coords.numel() == 9
        assert torch.all(coords[1:] > coords[:-1])
        assert 0 <= coords.min() and coords.max() < D


def test_k_at_least_dim_returns_every_coordinate():
    sketch = make_sketch("dense", seed=0)
    for k in (D, D + 10):
        for coords in top_coordinates(sketch, None, GROUPS, k):
            assert torch.equal(coords, torch.arange(D))


def test_empty_group_and_nonpositive_k_give_nothing():
    sketch = make_sketch("dense", seed=0)
    got = top_coordinates(
        sketch, None, [torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)], 3
    )
    assert got[0].numel() == 3 and got[1].numel() == 0
    assert all(c.numel() == 0 for c in top_coordinates(sketch, None, GROUPS, 0))


def test_a_source_whose_signal_lies_on_few_coordinates_finds_them():
    # Rows of group 0 share a large mean on coordinates 3 and 17; the rest is noise.
    gen = torch.Generator().manual_seed(7)
    grads = torch.randn(L, D, generator=gen) * 0.1
    grads[:6, 3] += 5.0
    grads[:6, 17] -= 5.0
    coords = top_coordinates(DenseSketch(grads), None, [torch.arange(6)], 2, block=4)[0]
    assert coords.tolist() == [3, 17]


@pytest.mark.parametrize("normalized", [False, True])
def test_gather_features_is_the_dense_submatrix(normalized):
    sketch = make_sketch("lowrank", seed=11)
    norm = trained_normalizer(sketch) if normalized else None
    rows, coords = torch.tensor([7, 1, 4]), torch.tensor([0, 5, 22, 9])
    got = gather_features(sketch, norm, rows, coords)
    assert got.shape == (3, 4)
    torch.testing.assert_close(got, dense_u(sketch, norm)[rows][:, coords])


def test_features_allocate_normalizer_state_lazily():
    sketch = make_sketch("dense", seed=2)
    norm = AdamNormalizer()
    top_coordinates(sketch, norm, GROUPS, 3, block=5)
    assert norm.m is not None and norm.m.shape == (D,) and norm.count == 0
