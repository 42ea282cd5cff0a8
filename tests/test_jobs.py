"""What a job's ledgers say about how its steps weighted their samples."""

import pytest

from colm_stream.jobs import effective_batch, mean_effective_batch


def test_effective_batch_counts_equally_weighted_samples():
    assert effective_batch([1.0] * 8) == pytest.approx(8)
    assert effective_batch([3.0] * 8) == pytest.approx(8)  # the scale of the weights does not matter
    assert effective_batch([1.0, 0.0, 0.0, 0.0]) == pytest.approx(1)
    assert effective_batch([5.0, 1.0, 1.0, 1.0]) == pytest.approx(64 / 28)  # one sample carries most


def test_mean_effective_batch_averages_every_ranks_steps():
    ledgers = [[{"weights": [1.0, 1.0]}, {"weights": [1.0, 0.0]}], [{"weights": [2.0, 2.0]}]]
    assert mean_effective_batch(ledgers) == pytest.approx((2 + 1 + 2) / 3)
    assert mean_effective_batch([[]]) == 0.0
