"""The engine reads batches through `TokenBatch`: any type with its members will do."""

from __future__ import annotations

import ast
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import colm_server.select
from colm_server.select import SelectorConfig, TokenBatch, build_selector
from conftest import lora_model


@dataclass(frozen=True)
class PlainBatch:
    """A caller's own batch type: the four tensors and lists the engine reads, nothing else."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    sources: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.sources)

    def subset(self, indices: Sequence[int]) -> PlainBatch:
        idx = list(indices)
        return PlainBatch(self.input_ids[idx], self.attention_mask[idx], self.labels[idx],
                          tuple(self.sources[i] for i in idx))


def test_the_collated_batch_is_a_token_batch(batch):
    assert isinstance(batch, TokenBatch)
    assert isinstance(batch.subset([0, 2]), TokenBatch)


def test_selector_selects_the_same_from_any_token_batch(batch):
    plain = PlainBatch(batch.input_ids, batch.attention_mask, batch.labels, tuple(batch.sources))
    assert isinstance(plain, TokenBatch)
    config = SelectorConfig(batch_size=6, large_batch_size=16, small_source_share=0.1)
    picks = [build_selector(lora_model(), config).select(b, step=0) for b in (batch, plain)]
    assert torch.equal(picks[0].indices, picks[1].indices)
    assert torch.equal(picks[0].weights, picks[1].weights)


def test_select_imports_no_data_loader_or_service_code():
    imported = set()
    for path in Path(colm_server.select.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add((path.name, node.module))
            elif isinstance(node, ast.Import):
                imported.update((path.name, alias.name) for alias in node.names)
    outside = sorted((f, m) for f, m in imported
                     if m.startswith(("colm_server.data", "colm_server.service")))
    assert not outside
    assert ("selector.py", "colm_server.select.batch") in imported  # the walk does see imports
