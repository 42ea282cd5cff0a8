"""AdamNormalizer: Adam-like moments over per-sample sketches, folded in after each selection."""

from __future__ import annotations

import pytest
import torch

from colm_server.select.normalize import AdamNormalizer
from colm_server.select.sketch import DenseSketch, LowRankSketch


class RecordingSketch(DenseSketch):
    """A dense sketch that remembers the widest column read it served."""

    widest = 0

    def columns(self, idx):
        out = super().columns(idx)
        self.widest = max(self.widest, out.shape[1])
        return out


def dense_features(norm: AdamNormalizer, g: torch.Tensor) -> torch.Tensor:
    """Reference: the CoLM formula over all coordinates at once."""
    m = norm.m if norm.m is not None else torch.zeros(g.shape[1])
    v = norm.v if norm.v is not None else torch.zeros(g.shape[1])
    t = norm.count + 1
    m_n = norm.beta1 * m + (1 - norm.beta1) * g
    v_n = norm.beta2 * v + (1 - norm.beta2) * g**2
    return (m_n / (1 - norm.beta1**t)) / ((v_n / (1 - norm.beta2**t)).sqrt() + norm.eps)


def test_first_features_are_the_sign_of_the_gradient():
    # At t = 1 with zero state, m_hat = g and v_hat = g^2, so u = g / (|g| + eps).
    g = torch.randn(5, 7) * 10
    u = AdamNormalizer().features(g, slice(0, 7))
    torch.testing.assert_close(u, torch.sign(g), atol=1e-6, rtol=0)


def test_moments_follow_the_adam_recurrence():
    norm = AdamNormalizer()
    norm.ensure(6, "cpu")
    norm.m.copy_(torch.arange(6.0))
    norm.v.copy_(torch.ones(6))
    g = torch.randn(3, 2)
    cols = torch.tensor([4, 1])
    m_n, v_n = norm.moments(g, cols)
    torch.testing.assert_close(m_n, 0.9 * torch.tensor([4.0, 1.0]) + 0.1 * g)
    torch.testing.assert_close(v_n, 0.999 + 0.001 * g**2)
    # A slice and the equivalent index tensor read the same coordinates.
    torch.testing.assert_close(
        norm.features(g, slice(1, 3)), norm.features(g, torch.tensor([1, 2]))
    )


@pytest.mark.parametrize("block", [1, 3, 5, 11, 64])
def test_update_is_the_mean_of_the_selected_moments(block):
    torch.manual_seed(block)
    grads = torch.randn(9, 11)
    rows = torch.tensor([0, 4, 7])
    norm = AdamNormalizer()
    for step in range(3):
        sketch = RecordingSketch(grads * (step + 1))
        g = sketch.grads[rows]
        m = norm.m if norm.m is not None else torch.zeros(11)
        v = norm.v if norm.v is not None else torch.zeros(11)
        want_m = (0.9 * m + 0.1 * g).mean(0)
        want_v = (0.999 * v + 0.001 * g**2).mean(0)
        norm.update(sketch, rows, block=block)
        assert sketch.widest <= block  # read block by block, never the whole matrix
        assert norm.count == step + 1
        torch.testing.assert_close(norm.m, want_m)
        torch.testing.assert_close(norm.v, want_v)


def test_features_match_the_dense_formula_after_updates():
    torch.manual_seed(0)
    coeffs, directions = torch.randn(8, 3), torch.randn(3, 20)
    sketch = LowRankSketch(coeffs, directions)
    norm = AdamNormalizer()
    for _ in range(4):
        norm.update(sketch, torch.tensor([1, 2, 5]), block=6)
    g = sketch.columns(slice(0, 20))
    torch.testing.assert_close(norm.features(g, slice(0, 20)), dense_features(norm, g))


def test_constant_gradient_keeps_features_at_its_sign():
    # Bias correction exactly undoes the zero start when every step sees the same gradient.
    g = torch.tensor([[2.0, -0.5, 3.0]]).repeat(4, 1)
    sketch, norm = DenseSketch(g), AdamNormalizer()
    for _ in range(5):
        torch.testing.assert_close(norm.features(g, slice(0, 3)), torch.sign(g), atol=1e-5, rtol=0)
        norm.update(sketch, torch.arange(4), block=2)


def test_state_dict_round_trips_and_is_a_copy():
    torch.manual_seed(1)
    sketch = DenseSketch(torch.randn(6, 10))
    norm = AdamNormalizer()
    norm.update(sketch, torch.tensor([0, 3]), block=4)
    saved = norm.state_dict()
    norm.update(sketch, torch.tensor([1]), block=4)  # must not leak into `saved`

    restored = AdamNormalizer()
    restored.load_state_dict(saved)
    again = AdamNormalizer()
    again.load_state_dict(restored.state_dict())
    assert again.count == 1
    assert torch.equal(again.m, saved["m"]) and torch.equal(again.v, saved["v"])
    assert not torch.equal(norm.m, saved["m"])


def test_fresh_state_round_trips():
    restored = AdamNormalizer()
    restored.load_state_dict(AdamNormalizer().state_dict())
    assert restored.m is None and restored.count == 0


def test_dim_mismatch_is_refused():
    norm = AdamNormalizer()
    norm.ensure(10, "cpu")
    other = AdamNormalizer()
    other.ensure(12, "cpu")
    with pytest.raises(ValueError, match="dim"):
        norm.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="dim"):
        norm.ensure(12, "cpu")
    with pytest.raises(ValueError, match="dim"):
        norm.update(DenseSketch(torch.randn(3, 12)), torch.tensor([0]))


def test_update_without_rows_is_refused():
    with pytest.raises(ValueError, match="row"):
        AdamNormalizer().update(DenseSketch(torch.randn(3, 4)), torch.tensor([], dtype=torch.long))
