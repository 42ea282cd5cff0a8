"""Held-out loss per source: how a model does on each part of a mixture, not only on the bulk."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from colm_client.loss import per_sample_loss
from colm_server.data.collate import Collator


@dataclass(frozen=True)
class SourceLosses:
    """Mean response-token loss per source; ``macro`` weighs sources equally, ``micro`` records."""

    per_source: dict[str, float]
    macro: float
    micro: float


@torch.no_grad()
def source_losses(model: nn.Module, collator: Collator, records: Sequence[Mapping[str, Any]],
                  batch_size: int = 64) -> SourceLosses:
    """Evaluate ``model`` on ``records`` in batches; a small source counts as much as a large one in macro."""
    if not records:
        raise ValueError("records: need at least one held-out record")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_source: dict[str, list[float]] = defaultdict(list)
    try:
        for i in range(0, len(records), batch_size):
            batch = collator(records[i:i + batch_size]).to(device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            for source, loss in zip(batch.sources, per_sample_loss(logits, batch.labels).tolist()):
                per_source[source].append(loss)
    finally:
        model.train(was_training)
    means = {s: sum(v) / len(v) for s, v in sorted(per_source.items())}
    everything = [x for v in per_source.values() for x in v]
    return SourceLosses(means, sum(means.values()) / len(means), sum(everything) / len(everything))
