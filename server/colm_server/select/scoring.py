"""Scores a batch on the model: per-sample gradient sketches or per-sample losses."""

from __future__ import annotations

import torch
from torch import nn

from colm_server.data.collate import Batch
from colm_server.model.split import LayerSplit, PrefixCache
from colm_server.select.config import SelectorConfig
from colm_server.select.exact import exact_sketch
from colm_server.select.sketch import Sketch
from colm_server.select.targets import sketch_targets
from colm_server.select.zo import zo_sketch


class Scorer:
    """Runs the frozen model on a large batch: the prefix once, then the top layers."""

    def __init__(self, model: nn.Module, config: SelectorConfig):
        self.config = config
        self.split = LayerSplit(model, config.sketch_layers, chunk_tokens=config.chunk_tokens)
        self.targets = sketch_targets(
            self.split.top, params=config.sketch_params, probe_module=config.probe_module
        )

    def prefix(self, batch: Batch) -> PrefixCache:
        """Run the model up to the top layers once for `batch`."""
        return self.split.prefix(batch.input_ids, batch.attention_mask, batch.labels)

    def sketch(self, batch: Batch, step: int) -> Sketch:
        """Per-sample gradient sketch of the batch at the current weights."""
        cfg = self.config
        cache = self.prefix(batch)
        if cfg.sketch == "zo":
            return zo_sketch(self.split, cache, self.targets, probes=cfg.zo_probes,
                             eps=cfg.zo_eps, seed=cfg.seed, step=step)
        sketch, _ = exact_sketch(self.split, cache, self.targets,
                                 max_dim=cfg.sketch_max_dim, seed=cfg.seed)
        return sketch

    @torch.inference_mode()
    def losses(self, batch: Batch) -> torch.Tensor:
        """Per-sample mean response-token losses ``[N]``."""
        return self.split.losses(self.prefix(batch))
