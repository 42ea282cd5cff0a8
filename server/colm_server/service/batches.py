"""One rank's share of one step, and how a step's coreset is dealt to the ranks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from colm_server.data.collate import IGNORE_INDEX, Batch


@dataclass(eq=False)
class RankBatch:
    """What rank `rank` trains on at `step`: samples, weights and their tokens.

    Tokens are kept unpadded and flat (``tokens``: every sample's prompt then response,
    back to back, int32) with each sample's length and prompt length, which is all a
    collated row holds: labels are the tokens after the prompt, the mask covers the tokens.
    ``step_weight_sum`` is the sum of the weights of every rank's batch of the step (the same on
    each rank), what a data-parallel trainer normalises by; 0.0 when unknown.
    """

    step: int
    rank: int
    epoch: int
    param_version: int
    ids: list[str]
    sources: list[str]
    weights: list[float]
    tokens: torch.Tensor  # [sum(lengths)] int32
    lengths: list[int]
    prompt_lens: list[int]
    step_weight_sum: float = 0.0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RankBatch):
            return NotImplemented
        plain = ("step", "rank", "epoch", "param_version", "ids", "sources", "weights", "lengths",
                 "prompt_lens", "step_weight_sum")
        return all(getattr(self, f) == getattr(other, f) for f in plain) and torch.equal(
            self.tokens, other.tokens)

    def padded(self, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ``(input_ids, labels, attention_mask)``, int32, built without a loop."""
        lengths = torch.tensor(self.lengths, dtype=torch.long)
        width = int(lengths.max()) if len(self.lengths) else 0
        pos = torch.arange(width)
        mask = pos[None, :] < lengths[:, None]
        input_ids = torch.full((len(self.lengths), width), pad_id, dtype=torch.int32)
        input_ids[mask] = self.tokens.to(torch.int32)
        response = mask & (pos[None, :] >= torch.tensor(self.prompt_lens, dtype=torch.long)[:, None])
        labels = torch.where(response, input_ids, torch.tensor(IGNORE_INDEX, dtype=torch.int32))
        return input_ids, labels, mask.to(torch.int32)

    def to_batch(self, pad_id: int = 0) -> Batch:
        """The right-padded batch a trainer feeds to its model."""
        input_ids, labels, mask = self.padded(pad_id)
        return Batch(input_ids.long(), mask.long(), labels.long(), list(self.ids), list(self.sources))


def pack_rows(batch: Batch, rows: list[int]) -> tuple[torch.Tensor, list[int], list[int]]:
    """``(tokens, lengths, prompt_lens)`` of the given rows of a collated batch, as in RankBatch."""
    idx = torch.as_tensor(rows, dtype=torch.long)
    mask = batch.attention_mask[idx].bool()
    labelled = batch.labels[idx] != IGNORE_INDEX
    lengths = mask.sum(1)
    # The first labelled position is where the response starts.
    starts = torch.where(labelled.any(1), labelled.float().argmax(1), lengths)
    return batch.input_ids[idx][mask].to(torch.int32), lengths.tolist(), starts.tolist()


def deal(indices: list[int], token_counts: list[int], world_size: int) -> list[list[int]]:
    """Split ``W*b`` chosen rows into W lists of exactly b rows with balanced token totals.

    Longest first, each row to the rank with the fewest tokens among those not yet full:
    the classic greedy for balanced partitions, with a per-rank cardinality cap.
    """
    if len(indices) % world_size:
        raise ValueError(f"{len(indices)} rows cannot be dealt evenly to {world_size} ranks")
    per_rank = len(indices) // world_size
    order = sorted(range(len(indices)), key=lambda i: (-token_counts[i], i))
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for i in order:
        r = min((r for r in range(world_size) if len(ranks[r]) < per_rank), key=lambda r: (load[r], r))
        ranks[r].append(indices[i])
        load[r] += token_counts[i]
    return ranks
