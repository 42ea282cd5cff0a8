"""`TokenBatch`: what the engine reads of a large batch, so that select/ needs no data loader.

`colm_server.data.collate.Batch` satisfies it as it is; so does any object with these members.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TokenBatch(Protocol):
    """Right-padded token rows with response-only labels, and the source of each row."""

    @property
    def input_ids(self) -> torch.Tensor:
        """``[N, T]`` token ids."""

    @property
    def attention_mask(self) -> torch.Tensor:
        """``[N, T]``: 1 on tokens, 0 on padding."""

    @property
    def labels(self) -> torch.Tensor:
        """``[N, T]``: the token id where the loss is scored (the response), -100 elsewhere."""

    @property
    def sources(self) -> Sequence[str]:
        """The source of each row: budgets and facility location are per source."""

    def __len__(self) -> int:
        """N, the number of rows."""

    def subset(self, indices: Sequence[int]) -> TokenBatch:
        """Rows ``indices`` in that order (the sketches score a large batch a chunk at a time)."""
