"""Collator: response-only labels, the truncation policy, text-only records, subsets."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from colm_server.data.collate import IGNORE_INDEX, Batch, Collator
from colm_server.model.tiny import BOS_ID, EOS_ID, PAD_ID


def rec(i: int, prompt: str, response: str, source: str = "s") -> dict:
    return {"id": str(i), "source": source, "prompt": prompt, "response": response}


def test_labels_are_ignored_exactly_on_prompt_and_padding(tokenizer):
    col = Collator(tokenizer, max_length=64)
    pairs = [("2 + 2 =", "4"), ("a longer prompt here", "a longer answer")]
    batch = col([rec(i, p, r) for i, (p, r) in enumerate(pairs)])
    for row, (p, r) in enumerate(pairs):
        prompt, response = col.prompt_ids(p), col.response_ids(r)
        n_p, n = len(prompt), len(prompt) + len(response)
        assert batch.input_ids[row, :n].tolist() == prompt + response
        assert (batch.labels[row, :n_p] == IGNORE_INDEX).all()
        assert batch.labels[row, n_p:n].tolist() == response
        assert (batch.labels[row, n:] == IGNORE_INDEX).all()
        assert (batch.input_ids[row, n:] == PAD_ID).all()
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (batch.input_ids.shape[1] - n)
    assert batch.input_ids[0, 0] == BOS_ID  # plain prompts get the tokenizer's BOS
    assert batch.labels[0, batch.token_counts()[0] - 1] == EOS_ID  # responses end with EOS
    assert batch.num_truncated == 0 and batch.ids == ["0", "1"] and batch.sources == ["s", "s"]


def test_text_only_record_is_all_response(tokenizer):
    col = Collator(tokenizer)
    batch = col([{"id": "t", "source": "web", "text": "hello"}])
    ids, labels, _ = col.encode("", "hello")
    body = tokenizer.encode("hello", add_special_tokens=False)
    assert batch.input_ids[0].tolist() == ids == [BOS_ID, *body, EOS_ID]
    assert labels[0] == IGNORE_INDEX and labels[1:] == ids[1:]


def test_record_errors_name_the_field(tokenizer):
    col = Collator(tokenizer)
    with pytest.raises(ValueError, match="id"):
        col([{"prompt": "p", "response": "r"}])
    with pytest.raises(ValueError, match="text"):
        col([{"id": "x", "prompt": "p"}])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"max_length": 1}, "max_length"), ({"min_prompt_fraction": 1.5}, "min_prompt_fraction")],
)
def test_bad_arguments_name_the_field(tokenizer, kwargs, field):
    with pytest.raises(ValueError, match=field):
        Collator(tokenizer, **kwargs)


def test_chat_template_on_and_off(tokenizer):
    plain = Collator(tokenizer, chat_template=False)
    chat = Collator(tokenizer, chat_template=True)
    assert plain.prompt_ids("hi") == tokenizer("hi")["input_ids"]
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat.prompt_ids("hi") == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert chat.prompt_ids("hi")[0] == BOS_ID  # once, from the template
    assert chat.prompt_ids("hi").count(BOS_ID) == 1
    assert chat.response_ids("ok") == plain.response_ids("ok")


def test_chat_template_falls_back_to_plain_without_one(tokenizer):
    bare = copy.deepcopy(tokenizer)  # the fixture is shared: copy, do not mutate
    bare.chat_template = None
    assert Collator(bare, chat_template=True).prompt_ids("hi") == tokenizer("hi")["input_ids"]


def test_truncation_cuts_the_prompt_head_first(tokenizer):
    col = Collator(tokenizer, max_length=20, min_prompt_fraction=0.25)
    p, r = col.prompt_ids("x" * 30), col.response_ids("y" * 5)  # 31 + 6 tokens
    ids, labels, truncated = col.encode("x" * 30, "y" * 5)
    assert truncated and len(ids) == 20
    assert ids == p[:14] + r  # the whole response, the prompt's head
    assert labels == [IGNORE_INDEX] * 14 + r


def test_truncation_keeps_the_minimum_prompt(tokenizer):
    col = Collator(tokenizer, max_length=20, min_prompt_fraction=0.25)
    p, r = col.prompt_ids("x" * 30), col.response_ids("y" * 40)
    ids, labels, truncated = col.encode("x" * 30, "y" * 40)
    assert truncated and len(ids) == 20
    assert ids == p[:5] + r[:15]  # floor(20 * 0.25) = 5 prompt tokens, response cut at its tail
    assert labels[:5] == [IGNORE_INDEX] * 5 and labels[5:] == r[:15]


def test_truncation_with_a_short_prompt_keeps_it_whole(tokenizer):
    col = Collator(tokenizer, max_length=20, min_prompt_fraction=0.5)
    p, r = col.prompt_ids("ab"), col.response_ids("y" * 40)  # 3 prompt tokens < floor(10)
    ids, _, truncated = col.encode("ab", "y" * 40)
    assert truncated and ids == p + r[:17]


def test_response_keeps_at_least_one_token(tokenizer):
    col = Collator(tokenizer, max_length=8, min_prompt_fraction=1.0)
    p, r = col.prompt_ids("x" * 30), col.response_ids("y" * 5)
    ids, labels, truncated = col.encode("x" * 30, "y" * 5)
    assert truncated and ids == p[:7] + r[:1]
    assert labels == [IGNORE_INDEX] * 7 + r[:1]


@settings(max_examples=60, deadline=None)
@given(
    n_prompt=st.integers(0, 40),
    n_response=st.integers(0, 40),
    max_length=st.integers(2, 48),
    fraction=st.floats(0.0, 1.0),
)
def test_truncation_policy_properties(tokenizer, n_prompt, n_response, max_length, fraction):
    col = Collator(tokenizer, max_length=max_length, min_prompt_fraction=fraction)
    p, r = col.prompt_ids("x" * n_prompt), col.response_ids("y" * n_response)
    ids, labels, truncated = col.encode("x" * n_prompt, "y" * n_response)
    kept_p = sum(1 for y in labels if y == IGNORE_INDEX)
    kept_r = len(ids) - kept_p
    assert truncated == (len(p) + len(r) > max_length)
    assert len(ids) == min(max_length, len(p) + len(r))
    assert ids == p[:kept_p] + r[:kept_r] and labels[kept_p:] == r[:kept_r]
    assert kept_r >= 1
    if truncated:  # the policy, stated directly
        floor_p = min(len(p), math.floor(max_length * fraction))
        assert kept_r == max(1, min(len(r), max_length - floor_p))
        assert kept_p == max_length - kept_r


def test_truncated_count_and_subset_trims_padding(tokenizer):
    col = Collator(tokenizer, max_length=16)
    records = [rec(0, "a", "b"), rec(1, "x" * 40, "y"), rec(2, "abc", "defgh"), rec(3, "q", "r")]
    batch = col(records)
    assert batch.num_truncated == 1 and batch.input_ids.shape[1] == 16
    sub = batch.subset([3, 0])
    assert sub.ids == ["3", "0"] and sub.num_truncated == 0
    assert sub.input_ids.shape[1] == int(sub.token_counts().max()) == 4
    assert torch.equal(sub.input_ids, batch.input_ids[[3, 0], :4])
    assert torch.equal(sub.labels, batch.labels[[3, 0], :4])
    sub = batch.subset(torch.tensor([2, 1]))
    assert sub.sources == ["s", "s"] and sub.num_truncated == 1 and sub.input_ids.shape[1] == 16
    assert len(batch.subset([])) == 0


def test_batch_to_and_shape_checks(tokenizer):
    batch = Collator(tokenizer)([rec(0, "a", "b")])
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.input_ids, batch.input_ids)
    assert moved.token_counts().dtype == torch.long
    with pytest.raises(ValueError, match="ids"):
        Batch(batch.input_ids, batch.attention_mask, batch.labels, ["a", "b"], ["s"], 0)


def test_pads_with_eos_when_the_tokenizer_has_no_pad(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = None
    batch = Collator(tok)([rec(0, "a", "b"), rec(1, "abcdef", "ghi")])
    assert batch.input_ids[0, -1] == EOS_ID and batch.attention_mask[0, -1] == 0
