"""Zeroth-order sketch: per-sample directional derivatives along seeded random probes.

For probe ``z_k`` the top layers run twice, with the sketched weights at ``P + eps z_k``
and ``P - eps z_k``; ``p[n, k] = (loss_n(+) - loss_n(-)) / (2 eps)``. No backward pass
and no activations are kept. The weights are restored from a saved copy afterwards.

The re-run part (top layers, final norm, lm_head) is computed in float32 whatever the model's
dtype: in bfloat16 the change an ``eps = 1e-3`` step makes to the activations is below their
rounding, and the differences would be noise.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from itertools import chain
from typing import Any

import torch
from torch import nn

from colm_server.model.split import LayerSplit, PrefixCache
from colm_server.select.sketch import LowRankSketch
from colm_server.select.targets import SketchTarget

_HALF = (torch.bfloat16, torch.float16)


def probe_directions(dim: int, probes: int, seed: int, step: int) -> torch.Tensor:
    """``Z[K, D] ~ N(0, I)``, the same for the same (seed, step) on any device."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randn(probes, dim, generator=gen)


def _to_float32(value: Any) -> Any:
    """``value`` with its half-precision tensors (recursively in tuples, lists, dicts) as float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in _HALF else value
    if isinstance(value, (tuple, list)):
        return type(value)(_to_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_float32(v) for k, v in value.items()}
    return value


@contextmanager
def _float32_modules(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Run ``modules`` in float32: half-precision parameters and buffers hold float32 copies
    meanwhile, and get their own tensors back, untouched, on exit. Float32 models are left as they are."""
    swapped: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for module in modules:
                for t in chain(module.parameters(), module.buffers()):
                    if t.dtype in _HALF:  # a tensor shared by two modules is swapped once
                        swapped.append((t, t.data))
                        t.data = t.data.float()
        yield
    finally:
        for t, data in reversed(swapped):
            t.data = data


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
    """Projected gradients ``p[N, K]`` of the per-sample losses, with their probes.

    The top layers, final norm and lm_head run in float32 (temporary copies of those of them that
    are in half precision: with one sketched layer, about one layer and the lm_head).
    """
    with _float32_modules([*split.top, split.norm, split.head]), torch.inference_mode():
        cache = replace(cache, hidden=_to_float32(cache.hidden), layer_kwargs=_to_float32(cache.layer_kwargs))
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
