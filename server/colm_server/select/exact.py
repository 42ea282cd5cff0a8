"""Exact sketch: per-sample gradients of the sketched linear maps from one chunked backward.

The gradient of a linear map's weight for sample n is ``sum_t dy[n,t] x[n,t]^T``: a forward
hook keeps each sketched map's input ``x`` and hooks its output, so that during one backward
from the per-sample losses each map's ``dy`` is turned into every sample's gradient by an
einsum and, when the gradients are large, count-sketched right away. Only one chunk of
samples and one map's per-sample gradient are ever held; the lm_head is backpropagated by
hand in chunks of positions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
from torch import nn

from colm_server.model.split import LayerSplit, PrefixCache
from colm_server.select.sketch import DenseSketch
from colm_server.select.targets import SketchTarget

Project = Callable[[int, torch.Tensor], torch.Tensor]  # (target index, [N, numel]) -> [N, d]


def count_sketch(grads: torch.Tensor, out_dim: int, seed: int, offset: int) -> torch.Tensor:
    """Project ``[N, d]`` columns into ``out_dim`` buckets with seeded signs (fixed per seed).

    Each target (``offset``) gets its own hash, so summing the targets' projections is one
    count sketch of their concatenation: inner products and distances are kept in expectation.
    """
    bucket, sign = _hash(grads.shape[1], out_dim, seed, offset, grads.device)
    out = grads.new_zeros(grads.shape[0], out_dim)
    return out.index_add_(1, bucket, grads * sign.to(grads.dtype))


@functools.lru_cache(maxsize=4096)
def _hash(dim: int, out_dim: int, seed: int, offset: int,
          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket and sign of each of ``dim`` coordinates, drawn once on the CPU and kept on ``device``:
    a backward hook then needs no host draw and no copy to the device."""
    gen = torch.Generator().manual_seed(seed * 7_919 + offset)
    bucket = torch.randint(out_dim, (dim,), generator=gen)
    sign = torch.randint(2, (dim,), generator=gen) * 2 - 1
    return bucket.to(device), sign.to(device, torch.float32)


def per_sample_grads(
    split: LayerSplit, cache: PrefixCache, targets: list[SketchTarget], project: Project | None = None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-sample gradients ``[N, numel]`` of each target's weight (or ``project(i, grad)``),
    and the per-sample losses."""
    index = {t.module: i for i, t in enumerate(targets)}
    grads: list[torch.Tensor | None] = [None] * len(targets)

    def keep(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        i, x = index[module], args[0].detach()

        def on_grad(dy: torch.Tensor) -> None:
            g = torch.einsum("nto,nti->noi", dy.float(), x.float()).flatten(1)
            grads[i] = g if project is None else project(i, g)

        output.register_hook(on_grad)

    handles = [t.module.register_forward_hook(keep) for t in targets]
    try:
        with torch.enable_grad():
            # A leaf that requires grad makes the graph exist even when every weight is frozen.
            hidden = cache.hidden.detach().requires_grad_(True)
            h = split.top_hidden(cache, hidden)
            losses, dh = split.losses_and_head_grad(h, cache)
            torch.autograd.backward(h, grad_tensors=dh, inputs=[hidden])
    finally:
        for handle in handles:
            handle.remove()
    missing = [targets[i].name for i, g in enumerate(grads) if g is None]
    if missing:
        raise RuntimeError(f"no gradient reached {missing[:3]}: are they on the loss's path?")
    return grads, losses.detach()


def exact_sketch(
    split: LayerSplit, caches: Iterable[PrefixCache], targets: list[SketchTarget], *, dim: int, seed: int
) -> DenseSketch:
    """All targets' per-sample gradients side by side, one chunk of samples per cache.

    When they have more than ``dim`` coordinates in all, each target's gradient is
    count-sketched as soon as it is formed and the projections are summed: ``[N, dim]``.
    """
    total = sum(t.numel for t in targets)
    project = None if total <= dim else (lambda i, g: count_sketch(g, dim, seed, i))
    rows = []
    for cache in caches:
        grads, _ = per_sample_grads(split, cache, targets, project)
        rows.append(torch.cat(grads, dim=1) if project is None else torch.stack(grads).sum(0))
    return DenseSketch(torch.cat(rows))
