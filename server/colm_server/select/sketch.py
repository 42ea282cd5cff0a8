"""Per-sample gradient sketches, read column block by column block.

A sketch stands for an ``[L, D]`` matrix ``G`` of per-sample gradient features.
``D`` can be large (a full weight matrix), so consumers never ask for all of ``G``:
they read ``columns(idx)`` for one block of coordinates at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


class Sketch:
    """An ``[num_samples, dim]`` matrix of per-sample gradient features, read by column blocks."""

    num_samples: int
    dim: int
    device: torch.device

    def columns(self, idx: torch.Tensor | slice) -> torch.Tensor:
        """Return ``G[:, idx]`` as a float32 tensor ``[num_samples, len(idx)]``."""
        raise NotImplementedError

    def features(self) -> torch.Tensor:
        """A compact ``[num_samples, d]`` matrix whose euclidean distances stand for ``G``'s."""
        return self.columns(slice(None))

    def blocks(self, block: int) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield ``(cols, G[:, cols])`` for consecutive column blocks of width ``block``."""
        for start in range(0, self.dim, block):
            cols = slice(start, min(start + block, self.dim))
            yield cols, self.columns(cols)


@dataclass
class DenseSketch(Sketch):
    """A sketch held whole, e.g. exact per-sample gradients."""

    grads: torch.Tensor  # [L, D]

    def __post_init__(self) -> None:
        self.num_samples, self.dim = self.grads.shape
        self.device = self.grads.device

    def columns(self, idx: torch.Tensor | slice) -> torch.Tensor:
        return self.grads[:, idx].float()


@dataclass
class LowRankSketch(Sketch):
    """``G = coeffs @ directions / K``: zeroth-order projected gradients times their probes.

    ``coeffs`` is ``p[L, K]`` (directional derivatives), ``directions`` is ``Z[K, D]``.
    """

    coeffs: torch.Tensor  # [L, K]
    directions: torch.Tensor  # [K, D]

    def __post_init__(self) -> None:
        self.num_samples = self.coeffs.shape[0]
        self.dim = self.directions.shape[1]
        self.device = self.coeffs.device

    def columns(self, idx: torch.Tensor | slice) -> torch.Tensor:
        k = self.directions.shape[0]
        return (self.coeffs.float() @ self.directions[:, idx].float()) / k

    def features(self) -> torch.Tensor:
        """The coefficients themselves: a Gaussian random projection of the gradients, so their
        distances are ``G``'s up to a common scale, without expanding to ``D`` coordinates."""
        return self.coeffs.float()
