"""Activation sketch: a forward-only stand-in for per-sample LoRA gradients.

A LoRA matrix's per-sample gradient is ``sum_t dy[t] x[t]^T``; without a backward ``dy`` is
unknown, but the inputs ``x`` are not. This sketch keeps, for every distinct input of the
sketched LoRA matrices, the sample's mean input over its scored (response-predicting)
positions, count-sketched to ``dim`` coordinates: one inference forward, no backward.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from colm_server.model.split import LayerSplit, PrefixCache
from colm_server.select.exact import count_sketch, tap_inputs
from colm_server.select.sketch import DenseSketch
from colm_server.select.targets import SketchTarget


@torch.inference_mode()
def mean_inputs(split: LayerSplit, cache: PrefixCache, targets: list[SketchTarget]) -> list[torch.Tensor]:
    """Per sample, the mean input of each target over its scored positions, ``[N, in]`` each;
    an input a layer feeds to several targets (q, k and v share theirs) is kept once."""
    layer_of = [t.name.split(".", 1)[0] for t in targets]
    means: list[torch.Tensor] = []
    # The current layer's inputs by identity (no host sync), held so that an id is not reused;
    # released when the next layer starts, as no input is shared across layers.
    held: dict[int, torch.Tensor] = {}
    layer: list[str | None] = [None]

    def keep(i: int, x: torch.Tensor, output: torch.Tensor) -> None:
        if layer_of[i] != layer[0]:
            held.clear()
            layer[0] = layer_of[i]
        if id(x) in held:
            return
        held[id(x)] = x
        at = x[cache.rows, cache.positions].float()
        sums = at.new_zeros(cache.num_samples, at.shape[1]).index_add_(0, cache.rows, at)
        means.append(sums / cache.token_counts.clamp(min=1)[:, None])

    try:
        with tap_inputs(split.top, targets, keep):
            split.top_hidden(cache)
    finally:
        held.clear()
    return means


def activation_sketch(
    split: LayerSplit, caches: Iterable[PrefixCache], targets: list[SketchTarget], *, dim: int, seed: int
) -> DenseSketch:
    """Mean inputs of the sketched LoRA matrices per sample, count-sketched to ``dim``."""
    rows = []
    for cache in caches:
        parts = mean_inputs(split, cache, targets)
        rows.append(sum(count_sketch(x, dim, seed, i) for i, x in enumerate(parts)))
    return DenseSketch(torch.cat(rows))
