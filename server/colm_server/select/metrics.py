"""How well a weighted coreset stands in for its large batch."""

from __future__ import annotations

import torch
from torch import nn

from colm_server.model.load import decoder_layers
from colm_server.model.split import LayerSplit
from colm_server.select.batch import TokenBatch
from colm_server.select.exact import per_sample_grads
from colm_server.select.targets import SketchTarget, sketch_targets


def adapter_targets(model: nn.Module) -> list[SketchTarget]:
    """Every LoRA matrix of the model, bottom layer first."""
    return sketch_targets(list(decoder_layers(model)), params="adapter", probe_module="v_proj")


def adapter_grads(model: nn.Module, batch: TokenBatch, micro_batch: int = 8,
                  exit_after: int | None = None) -> torch.Tensor:
    """Exact per-sample gradients of every LoRA matrix, ``[N, D]``, a few samples at a time.

    ``exit_after=k``: those of the first ``k`` layers' matrices under the early-exit proxy's loss
    (layer ``k``'s output read by the final norm and lm_head), in the same column order."""
    split = LayerSplit(model, num_top_layers=exit_after or len(decoder_layers(model)), exit_after=exit_after)
    targets = sketch_targets(split.top, params="adapter", probe_module="v_proj")
    rows = []
    for i in range(0, len(batch), micro_batch):
        sub = batch.subset(list(range(i, min(i + micro_batch, len(batch)))))
        cache = split.prefix(sub.input_ids, sub.attention_mask, sub.labels)
        grads, _ = per_sample_grads(split, cache, targets)
        rows.append(torch.cat(grads, dim=1))
    return torch.cat(rows)


def matching_error(grads: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> float:
    """``||G - sum w_i g_i / sum w_i|| / ||G||`` with G the mean of all rows of `grads`."""
    full = grads.mean(0)
    w = weights.to(grads).view(-1, 1)
    approx = (w * grads[rows.to(grads.device)]).sum(0) / w.sum()
    return ((full - approx).norm() / full.norm()).item()


class GramMatching:
    """`matching_error` of many weighted subsets of one ``[N, D]`` gradient matrix, each in
    ``O(N^2)`` from the Gram matrix instead of ``O(N D)``: ``||G - approx||^2 = a^T K a`` with
    ``a`` the difference of the mean's and the subset's row weights."""

    def __init__(self, grads: torch.Tensor):
        g = grads.double()
        self.gram = g @ g.T
        self.mean = torch.full((len(g),), 1.0 / len(g), dtype=torch.float64, device=g.device)
        self.norm2 = float(self.mean @ self.gram @ self.mean)

    def __call__(self, rows: torch.Tensor, weights: torch.Tensor) -> float:
        w = weights.to(self.gram)
        a = self.mean.index_add(0, rows.to(self.gram.device), -w / w.sum())
        return max(float(a @ self.gram @ a), 0.0) ** 0.5 / self.norm2 ** 0.5
