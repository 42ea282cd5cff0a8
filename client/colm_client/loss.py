"""The coreset training loss: per-sample mean response-token loss, combined with weights."""

from __future__ import annotations

import torch
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


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_n w_n l_n / sum_n w_n``: the coreset's estimate of the large batch's loss."""
    losses = per_sample_loss(logits, labels)
    weights = weights.to(losses)
    return (weights * losses).sum() / weights.sum()
