"""Dealing a step's coreset to the ranks, and the compact per-rank form of a batch."""

import random

import torch
from hypothesis import given
from hypothesis import strategies as st

from colm_server.service.batches import RankBatch, deal, pack_rows
from conftest import make_records


@given(st.integers(1, 6), st.integers(1, 12), st.integers(0, 10_000))
def test_deal_gives_every_rank_exactly_b_rows_once(world, b, seed):
    rng = random.Random(seed)
    indices = rng.sample(range(1000), world * b)
    tokens = [rng.randint(1, 512) for _ in indices]
    ranks = deal(indices, tokens, world)
    assert [len(r) for r in ranks] == [b] * world
    assert sorted(i for r in ranks for i in r) == sorted(indices)
    # Greedy balancing: no rank carries more than the lightest plus the longest row.
    count = dict(zip(indices, tokens))
    loads = [sum(count[i] for i in r) for r in ranks]
    assert max(loads) - min(loads) <= max(tokens)


def test_deal_refuses_an_uneven_split():
    try:
        deal([1, 2, 3], [5, 5, 5], 2)
    except ValueError as exc:
        assert "evenly" in str(exc)
    else:
        raise AssertionError("expected ValueError")


def test_rank_batch_rebuilds_the_collated_rows(collator):
    batch = collator(make_records({"a": 5, "b": 2}, seed=3))
    rows = [4, 0, 6, 2]
    tokens, lengths, prompt_lens = pack_rows(batch, rows)
    rb = RankBatch(step=0, rank=0, epoch=0, param_version=0, ids=[batch.ids[i] for i in rows],
                   sources=[batch.sources[i] for i in rows], weights=[1.0] * len(rows),
                   tokens=tokens, lengths=lengths, prompt_lens=prompt_lens)
    again, want = rb.to_batch(pad_id=collator.pad_token_id), batch.subset(rows)
    assert torch.equal(again.input_ids, want.input_ids)
    assert torch.equal(again.labels, want.labels)
    assert torch.equal(again.attention_mask, want.attention_mask)
