"""Zeroth-order sketch: per-sample directional derivatives along seeded random probes.

For probe ``z_k`` the top layers run twice, with the sketched weights at ``P + eps z_k``
and ``P - eps z_k``; ``p[n, k] = (loss_n(+) - loss_n(-)) / (2 eps)``. No backward pass
and no activations are kept. The weights are restored from a saved copy afterwards.
"""

from __future__ import annotations

import torch

from colm_server.model.split import LayerSplit, PrefixCache
from colm_server.select.sketch import LowRankSketch
from colm_server.select.targets import SketchTarget


def probe_directions(dim: int, probes: int, seed: int, step: int) -> torch.Tensor:
    """``Z[K, D] ~ N(0, I)``, the same for the same (seed, step) on any device."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randn(probes, dim, generator=gen)


@torch.inference_mode()
def zo_sketch(
    split: LayerSplit,
    cache: PrefixCache,
    targets: list[SketchTarget],
    *,
    probes: int,
    eps: float,
    seed: int,
    step: int,
) -> LowRankSketch:
    """Projected gradients ``p[N, K]`` of the per-sample losses, with their probes."""
    weights = [t.module.weight for t in targets]
    sizes = [w.numel() for w in weights]
    z = probe_directions(sum(sizes), probes, seed, step).to(weights[0].device)
    saved = [w.detach().clone() for w in weights]
    coeffs = torch.empty(cache.num_samples, probes, device=z.device)
    try:
        for k in range(probes):
            parts = [d.view_as(w) for d, w in zip(z[k].split(sizes), weights)]
            losses = []
            for sign in (1.0, -1.0):
                for w, w0, d in zip(weights, saved, parts):
                    w.copy_(w0 + sign * eps * d.to(w.dtype))
                losses.append(split.losses(cache))
            coeffs[:, k] = (losses[0] - losses[1]) / (2 * eps)
    finally:
        for w, w0 in zip(weights, saved):
            w.copy_(w0)
    return LowRankSketch(coeffs=coeffs, directions=z)
