"""Activation sketch: a forward-only stand-in for per-sample LoRA gradients.

A LoRA matrix's per-sample gradient is ``sum_t dy[t] x[t]^T``; without a backward ``dy`` is
unknown, but the inputs ``x`` are not. This sketch keeps, for every distinct input of the
sketched LoRA matrices, the sample's mean input over its scored (response-predicting)
positions, count-sketched to ``dim`` coordinates: one inference forward, no backward.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from colm_server.model.split import LayerSplit, PrefixCache
from colm_server.select.exact import count_sketch
from colm_server.select.sketch import DenseSketch
from colm_server.select.targets import SketchTarget


@torch.inference_mode()
def mean_inputs(split: LayerSplit, cache: PrefixCache, targets: list[SketchTarget]) -> list[torch.Tensor]:
    """Per sample, the mean input of each target over its scored positions, ``[N, in]`` each;
    an input a layer feeds to several targets (q, k and v share theirs) is kept once."""
    per_layer: dict[str, list[torch.Tensor]] = {}
    layer_of = {t.module: t.name.split(".", 1)[0] for t in targets}

    def keep(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        at = args[0][cache.rows, cache.positions].float()
        sums = at.new_zeros(cache.num_samples, at.shape[1]).index_add_(0, cache.rows, at)
        mean = sums / cache.token_counts.clamp(min=1)[:, None]
        kept = per_layer.setdefault(layer_of[module], [])
        # Compared by value: a freed tensor's address can come back for the next module.
        if not any(k.shape == mean.shape and torch.equal(k, mean) for k in kept):
            kept.append(mean)

    handles = [t.module.register_forward_hook(keep) for t in targets]
    try:
        split.top_hidden(cache)
    finally:
        for handle in handles:
            handle.remove()
    return [m for kept in per_layer.values() for m in kept]


def activation_sketch(
    split: LayerSplit, caches: Iterable[PrefixCache], targets: list[SketchTarget], *, dim: int, seed: int
) -> DenseSketch:
    """Mean inputs of the sketched LoRA matrices per sample, count-sketched to ``dim``."""
    rows = []
    for cache in caches:
        parts = mean_inputs(split, cache, targets)
        rows.append(sum(count_sketch(x, dim, seed, i) for i, x in enumerate(parts)))
    return DenseSketch(torch.cat(rows))
