"""The coreset training loss: per-sample mean response-token loss, combined with weights."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over each sample's labelled tokens, ``[N]``.

    ``labels`` are aligned with the inputs (-100 where no loss is taken); the shift by
    one position happens here. A sample without labelled tokens gets 0.
    """
    targets = labels[:, 1:]
    token = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none", ignore_index=-100
    ).view_as(targets)
    mask = (targets != -100).to(token.dtype)
    return (token * mask).sum(1) / mask.sum(1).clamp(min=1)


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                  total_weight: float | None = None, *, world_size: int | None = None) -> torch.Tensor:
    """``sum_n w_n l_n / sum_n w_n``: the coreset's estimate of the large batch's loss.

    Under data parallelism pass ``total_weight``, the step's weight summed over every rank
    (``CoresetBatch.step_weight_sum``): the result is then ``world_size * sum_n w_n l_n / total_weight``,
    so the mean of the ranks' gradients that DDP takes is exactly the gradient of
    ``sum_all w l / sum_all w`` over the whole step. ``world_size`` is the number of ranks whose
    gradients are averaged: by default the initialised process group's, else 1 (a single process,
    whose total is its own weights' sum, gets the same loss either way).
    Without ``total_weight`` (None: a selector that does not send it) each rank normalises by
    its own weights, and DDP's mean then pulls every rank equally whatever its weights; ranks
    that do not average their gradients (each training its own adapter) should pass none.
    """
    losses = per_sample_loss(logits, labels)
    weights = weights.to(losses)
    if total_weight is None:
        return (weights * losses).sum() / weights.sum()
    if not total_weight > 0:
        raise ValueError(f"total_weight must be positive, got {total_weight}")
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return (weights * losses).sum() * (world_size / float(total_weight))
