"""Scores a batch on the model: per-sample gradient sketches or per-sample losses."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from colm_server.model.load import decoder_layers
from colm_server.model.split import LayerSplit, PrefixCache
from colm_server.select.activations import activation_sketch
from colm_server.select.batch import TokenBatch
from colm_server.select.config import SelectorConfig
from colm_server.select.exact import exact_sketch
from colm_server.select.sketch import Sketch
from colm_server.select.targets import sketch_targets
from colm_server.select.zo import zo_sketch


class Scorer:
    """Runs the frozen model on a large batch: the prefix once, then the sketched layers.

    With ``scorer_layers=k`` it runs an early-exit proxy instead: the first ``k`` layers, then the
    final norm and lm_head, so the sketch costs about ``k / layers`` of the whole model's.
    """

    def __init__(self, model: nn.Module, config: SelectorConfig):
        self.config = config.scoring()  # idempotent: a resolved config stays as it is
        depth = len(decoder_layers(model))
        exit_after = min(self.config.scorer_layers, depth) or None  # None (or all): the whole model
        layers = min(self.config.sketch_layers or depth, exit_after or depth)
        self.split = LayerSplit(model, layers, chunk_tokens=self.config.chunk_tokens, exit_after=exit_after)
        self.targets = sketch_targets(
            self.split.top, params=self.config.sketch_params, probe_module=self.config.probe_module
        )

    def prefix(self, batch: TokenBatch) -> PrefixCache:
        """Run the model up to the sketched layers once for `batch`."""
        return self.split.prefix(batch.input_ids, batch.attention_mask, batch.labels)

    def chunks(self, batch: TokenBatch) -> Iterator[PrefixCache]:
        """Prefix caches of consecutive chunks of ``sketch_chunk`` samples, made one at a time."""
        size = self.config.sketch_chunk
        for start in range(0, len(batch), size):
            yield self.prefix(batch.subset(list(range(start, min(start + size, len(batch))))))

    def sketch(self, batch: TokenBatch, step: int) -> Sketch:
        """Per-sample gradient sketch of the batch at the current weights."""
        cfg = self.config
        if cfg.sketch == "zo":
            return zo_sketch(self.split, self.prefix(batch), self.targets, probes=cfg.zo_probes,
                             eps=cfg.zo_eps, seed=cfg.seed, step=step)
        build = activation_sketch if cfg.sketch == "activations" else exact_sketch
        return build(self.split, self.chunks(batch), self.targets, dim=cfg.sketch_dim, seed=cfg.seed)

    @torch.inference_mode()
    def losses(self, batch: TokenBatch) -> torch.Tensor:
        """Per-sample mean response-token losses ``[N]``."""
        return self.split.losses(self.prefix(batch))
