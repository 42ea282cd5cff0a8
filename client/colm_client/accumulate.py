"""Gradient accumulation: a step's batch in micro-batches, with the gradient of the whole step's loss."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from colm_client.loss import weighted_loss

Autocast = Callable[[], AbstractContextManager]  # e.g. lambda: torch.autocast("cuda", dtype=torch.bfloat16)


def backward_micro_batches(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           labels: torch.Tensor, weights: torch.Tensor, *, micro_batch: int | None,
                           total_weight: float | None = None, world_size: int | None = None,
                           autocast: Autocast | None = None) -> torch.Tensor:
    """Forward and backward the step's batch in micro-batches of at most `micro_batch` rows (None or
    >= rows: one pass), accumulating the gradient of weighted_loss over the WHOLE step; returns the
    step's loss, detached.

    Gradients are added to the parameters' ``.grad`` (the caller zeroes them between steps). With
    ``total_weight`` None the normaliser is ``weights.sum()`` of this batch; otherwise ``total_weight``
    and ``world_size`` are passed to ``weighted_loss`` as in one pass. A ``DistributedDataParallel``
    model all-reduces once, on the last micro-batch. Each micro-batch is cut after its last column
    that is not padding in some row (its longest row, for right-padded rows): a causal model's loss
    is unchanged. ``autocast`` (a context-manager factory) wraps each forward.
    """
    if micro_batch is not None and micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1 (or None: one pass), got {micro_batch}")
    n = input_ids.shape[0]
    if n == 0:
        raise ValueError("the batch has no rows")
    size = n if micro_batch is None else min(micro_batch, n)
    starts = range(0, n, size)
    if len(starts) > 1 and total_weight is None:
        total_weight, world_size = float(weights.sum()), 1  # this batch's own weighted mean
    ends = _last_token_ends(attention_mask)
    loss = torch.zeros((), device=input_ids.device)
    for i, start in enumerate(starts):
        rows = slice(start, start + size)
        width = max(max(ends[rows]), 1)
        last = i == len(starts) - 1
        with nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            loss += _backward_one(model, input_ids[rows, :width], attention_mask[rows, :width],
                                  labels[rows, :width], weights[rows], total_weight, world_size, autocast)
    return loss


def _last_token_ends(attention_mask: torch.Tensor) -> list[int]:
    """Per row, one past its last attended position (0 for a row of padding only)."""
    positions = torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)
    return (attention_mask.ne(0) * positions).amax(1).tolist()


def _backward_one(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  labels: torch.Tensor, weights: torch.Tensor, total_weight: float | None,
                  world_size: int | None, autocast: Autocast | None) -> torch.Tensor:
    """Forward and backward one micro-batch; its logits are freed on return, before the next forward."""
    with autocast() if autocast is not None else nullcontext():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    loss = weighted_loss(logits, labels, weights, total_weight, world_size=world_size)
    loss.backward()
    return loss.detach()
