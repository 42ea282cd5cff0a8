"""One rank's share of one step, and how a step's coreset is dealt to the ranks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from colm_server.data.collate import IGNORE_INDEX, Batch


@dataclass
class RankBatch:
    """What rank `rank` trains on at `step`: samples, weights and their tokens.

    Tokens are stored per sample without padding (``tokens[i]`` = prompt then response) with
    the prompt length, which is all a collated row holds: labels are the tokens after the
    prompt, the attention mask covers the tokens.
    """

    step: int
    rank: int
    epoch: int
    param_version: int
    ids: list[str]
    sources: list[str]
    weights: list[float]
    tokens: list[list[int]]
    prompt_lens: list[int]

    def to_batch(self, pad_id: int = 0) -> Batch:
        """The right-padded tensors a trainer feeds to its model."""
        n, width = len(self.tokens), max((len(t) for t in self.tokens), default=0)
        input_ids = torch.full((n, width), pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, (toks, p) in enumerate(zip(self.tokens, self.prompt_lens)):
            row = torch.tensor(toks, dtype=torch.long)
            input_ids[i, : len(toks)] = row
            labels[i, p : len(toks)] = row[p:]
            mask[i, : len(toks)] = 1
        return Batch(input_ids, mask, labels, list(self.ids), list(self.sources))


def rows_of(batch: Batch) -> tuple[list[list[int]], list[int]]:
    """Unpadded tokens and prompt lengths of every row of a collated batch."""
    lengths = batch.attention_mask.sum(1).tolist()
    # The first labelled position is where the response starts.
    labelled = batch.labels != IGNORE_INDEX
    starts = torch.where(labelled.any(1), labelled.float().argmax(1), batch.attention_mask.sum(1))
    tokens = [batch.input_ids[i, :n].tolist() for i, n in enumerate(lengths)]
    return tokens, starts.tolist()


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
