"""Budgets: small sources kept whole, the rest split in proportion, always the exact total."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from colm_server.select.budget import SourceTracker, allocate_budget, proportional_split

NAMES = ["gsm8k", "math", "aqua", "numglue", "theorem", "camel", "mathqa"]

source_counts = st.dictionaries(st.sampled_from(NAMES), st.integers(0, 60), min_size=1)


@st.composite
def mixes(draw):
    """A big batch's per-source counts, a budget and a set of small sources."""
    counts = draw(source_counts)
    small = draw(st.sets(st.sampled_from(sorted(counts))))
    budget = draw(st.integers(0, sum(counts.values()) + 20))
    return counts, budget, small


@given(source_counts, st.integers(0, 400))
def test_proportional_split_is_exact_and_within_one_of_the_quota(counts, total):
    split = proportional_split(counts, total)
    whole = sum(counts.values())
    assert split.keys() == counts.keys()
    assert sum(split.values()) == min(total, whole)
    for s, c in counts.items():
        assert 0 <= split[s] <= c
        if whole:
            assert abs(split[s] - min(total, whole) * c / whole) < 1


def test_proportional_split_gives_the_remainder_to_the_largest_fractions():
    # Quotas 10 * (5, 3, 2) / 10 are whole; 7 * (5, 3, 2) / 10 = 3.5, 2.1, 1.4.
    assert proportional_split({"a": 5, "b": 3, "c": 2}, 10) == {"a": 5, "b": 3, "c": 2}
    assert proportional_split({"a": 5, "b": 3, "c": 2}, 7) == {"a": 4, "b": 2, "c": 1}
    # Equal fractions: the larger count wins, then the earlier name.
    assert proportional_split({"a": 1, "b": 3}, 2) == {"a": 0, "b": 2}
    assert proportional_split({"x": 1, "y": 1, "z": 1}, 1) == {"x": 1, "y": 0, "z": 0}


@given(mixes())
def test_allocation_properties(mix):
    counts, budget, small = mix
    alloc = allocate_budget(counts, budget, small)
    total = sum(counts.values())
    assert alloc.keys() == counts.keys()
    assert sum(alloc.values()) == min(budget, total)
    assert all(0 <= alloc[s] <= counts[s] for s in counts)
    small_total = sum(counts[s] for s in small)
    if small_total <= budget:
        assert all(alloc[s] == counts[s] for s in small)
    else:
        assert all(alloc[s] == 0 for s in counts if s not in small)


@given(mixes())
def test_large_sources_share_the_rest_in_proportion(mix):
    counts, budget, small = mix
    alloc = allocate_budget(counts, budget, small)
    large = {s: c for s, c in counts.items() if s not in small}
    rest = budget - sum(counts[s] for s in small)
    if rest >= 0:
        assert {s: alloc[s] for s in large} == proportional_split(large, rest)


def test_edge_cases():
    assert allocate_budget({"only": 40}, 8, set()) == {"only": 8}
    assert allocate_budget({"only": 40}, 8, {"only"}) == {"only": 8}
    assert allocate_budget({"a": 3, "b": 4}, 100, set()) == {"a": 3, "b": 4}
    assert allocate_budget({"a": 3, "b": 4}, 0, {"a"}) == {"a": 0, "b": 0}
    assert allocate_budget({"a": 6, "b": 6}, 4, {"a", "b"}) == {"a": 2, "b": 2}
    # A one-sample small source is kept; the large ones share the remaining budget.
    assert allocate_budget({"tiny": 1, "a": 30, "b": 10}, 9, {"tiny"}) == {
        "tiny": 1,
        "a": 6,
        "b": 2,
    }
    assert allocate_budget({}, 5, set()) == {}
    with pytest.raises(ValueError, match="non-negative"):
        allocate_budget({"a": -1}, 5, set())


def test_tracker_marks_rare_and_named_sources_small():
    tracker = SourceTracker()
    tracker.observe(["math"] * 97 + ["theorem"] * 2 + ["gsm8k"])
    assert tracker.share("math") == pytest.approx(0.97)
    assert tracker.share("never-seen") == 0.0
    present = {"math", "theorem", "gsm8k"}
    assert tracker.small_sources(present, keep=(), threshold=0.03) == {"theorem", "gsm8k"}
    assert tracker.small_sources(present, keep={"math"}, threshold=0.0) == {"math"}


def test_tracker_state_round_trips():
    tracker = SourceTracker()
    tracker.observe(["a", "b", "a"])
    saved = tracker.state_dict()
    tracker.observe(["b"] * 10)  # must not leak into `saved`
    restored = SourceTracker()
    restored.load_state_dict(saved)
    assert restored.state_dict() == {"counts": {"a": 2, "b": 1}}
    assert restored.share("a") == pytest.approx(2 / 3)
