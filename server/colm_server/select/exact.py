"""Exact sketch: per-sample gradients of the sketched linear maps from one backward.

The gradient of a linear map's weight for sample n is ``sum_t dy[n,t] x[n,t]^T``: forward
hooks keep each sketched map's input ``x`` and output ``y``, one backward from the
per-sample losses gives ``dy``, and an einsum gives every sample's gradient at once.
Only the top layers are traversed; the lm_head is backpropagated by hand in chunks.
"""

from __future__ import annotations

import torch
from torch import nn

from colm_server.model.split import LayerSplit, PrefixCache
from colm_server.select.sketch import DenseSketch
from colm_server.select.targets import SketchTarget


def count_sketch(grads: torch.Tensor, out_dim: int, seed: int, offset: int) -> torch.Tensor:
    """Project ``[N, d]`` columns into ``out_dim`` buckets with seeded signs (fixed per seed)."""
    gen = torch.Generator().manual_seed(seed * 7_919 + offset)
    bucket = torch.randint(out_dim, (grads.shape[1],), generator=gen).to(grads.device)
    sign = (torch.randint(2, (grads.shape[1],), generator=gen) * 2 - 1).to(grads)
    out = grads.new_zeros(grads.shape[0], out_dim)
    return out.index_add_(1, bucket, grads * sign)


def per_sample_grads(
    split: LayerSplit, cache: PrefixCache, targets: list[SketchTarget]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-sample gradients ``[N, numel]`` of each target's weight, and the per-sample losses."""
    inputs: dict[nn.Module, torch.Tensor] = {}
    outputs: dict[nn.Module, torch.Tensor] = {}

    def keep(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        inputs[module] = args[0].detach()
        outputs[module] = output

    handles = [t.module.register_forward_hook(keep) for t in targets]
    try:
        with torch.enable_grad():
            # A leaf that requires grad makes the graph exist even when every weight is frozen.
            hidden = cache.hidden.detach().requires_grad_(True)
            h = split.top_hidden(cache, hidden)
            losses, dh = split.losses_and_head_grad(h, cache)
            modules = [t.module for t in targets]
            dys = torch.autograd.grad(h, [outputs[m] for m in modules], grad_outputs=dh)
    finally:
        for handle in handles:
            handle.remove()
    grads = [
        torch.einsum("nto,nti->noi", dy.float(), inputs[m].float()).flatten(1)
        for m, dy in zip(modules, dys)
    ]
    return grads, losses.detach()


def exact_sketch(
    split: LayerSplit,
    cache: PrefixCache,
    targets: list[SketchTarget],
    *,
    max_dim: int,
    seed: int,
) -> tuple[DenseSketch, torch.Tensor]:
    """All targets' per-sample gradients side by side; count-sketched when over ``max_dim``."""
    grads, losses = per_sample_grads(split, cache, targets)
    total = sum(g.shape[1] for g in grads)
    if total <= max_dim:
        return DenseSketch(torch.cat(grads, dim=1)), losses
    projected = sum(count_sketch(g, max_dim, seed, i) for i, g in enumerate(grads))
    return DenseSketch(projected), losses
