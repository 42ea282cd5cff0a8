"""Target mixtures (``selector.mixture``): the shares themselves, and selections that reach them."""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass

import pytest
import torch

from colm_server.select import SelectorConfig, build_selector
from colm_server.select.mixture import realised_shares, target_shares, weight_factors

COUNTS = {"a": 7000, "b": 2500, "c": 500}  # a skewed mixture: 70%, 25%, 5%
STREAM = {s: c / sum(COUNTS.values()) for s, c in COUNTS.items()}
EXPLICIT = {"a": 1, "b": 2, "c": 1}  # -> 25%, 50%, 25%


@pytest.mark.parametrize("mixture", ["stream", "balanced", "temperature", EXPLICIT, {"a": 3}])
def test_target_shares_sum_to_one_over_every_source(mixture):
    shares = target_shares(COUNTS, mixture, temperature=3.0)
    assert set(shares) == set(COUNTS)
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-12)
    assert all(v > 0 for v in shares.values())


def test_stream_balanced_and_temperature_shares():
    assert target_shares(COUNTS, "stream") == pytest.approx(STREAM)
    assert target_shares(COUNTS, "balanced") == pytest.approx({s: 1 / 3 for s in COUNTS})
    assert target_shares(COUNTS, "temperature", 1.0) == pytest.approx(STREAM)
    # T = 2: proportional to the square roots of the counts.
    root = {s: math.sqrt(c) for s, c in COUNTS.items()}
    assert target_shares(COUNTS, "temperature", 2.0) == pytest.approx(
        {s: r / sum(root.values()) for s, r in root.items()})
    # A larger T moves every share towards balanced, monotonically.
    gaps = [max(abs(v - 1 / 3) for v in target_shares(COUNTS, "temperature", t).values())
            for t in (1, 2, 5, 50, 1e6)]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-5
    # A tiny T on huge counts: all to the largest source, without overflowing a float.
    assert target_shares({"a": 10**12, "b": 1}, "temperature", 0.01) == pytest.approx({"a": 1.0, "b": 0.0})


def test_explicit_shares_are_normalised_and_unnamed_sources_keep_their_stream_share():
    assert target_shares(COUNTS, EXPLICIT) == pytest.approx({"a": 0.25, "b": 0.5, "c": 0.25})
    assert target_shares(COUNTS, {"a": 0.2, "b": 0.4, "c": 0.2}) == target_shares(COUNTS, EXPLICIT)
    # c is not named: it keeps its 5% of the stream; a and b split the other 95% equally.
    assert target_shares(COUNTS, {"a": 1, "b": 1}) == pytest.approx({"a": 0.475, "b": 0.475, "c": 0.05})
    # Before any count, the map alone; sources without samples take no share of the others.
    assert target_shares({}, {"a": 1, "b": 3}) == pytest.approx({"a": 0.25, "b": 0.75})
    assert target_shares({"a": 0, "b": 0}, "balanced") == {}


@pytest.mark.parametrize("mixture", ["stream", "balanced", EXPLICIT, {"a": 1, "b": 1}])
def test_weight_factors_move_the_stream_share_to_the_target(mixture):
    factors = weight_factors(COUNTS, mixture)
    targets = target_shares(COUNTS, mixture)
    assert {s: STREAM[s] * f for s, f in factors.items()} == pytest.approx(targets)
    if mixture == "stream":
        assert factors == {"a": 1.0, "b": 1.0, "c": 1.0}  # exactly: weights stay as they were


def test_realised_shares_normalise_the_selected_weight():
    assert realised_shares({"a": 3.0, "b": 1.0}) == {"a": 0.75, "b": 0.25}
    assert realised_shares({}) == {}


@pytest.mark.parametrize("bad, field", [
    (dict(mixture="balance"), "mixture must be one of"),
    (dict(mixture={}), "mixture: an explicit mixture must name"),
    (dict(mixture={"a": 0}), "mixture: the share of 'a'"),
    (dict(mixture={"a": -1}), "mixture: the share of 'a'"),
    (dict(mixture={"a": float("inf")}), "mixture: the share of 'a'"),
    (dict(mixture={"a": True}), "mixture: the share of 'a'"),
    (dict(mixture={"": 1}), "mixture: source names"),
    (dict(mixture={1: 1}), "mixture: source names"),
    (dict(mixture={"a": 1e308, "b": 1e308}), "mixture: the shares must have a finite sum"),
    (dict(mixture=["a"]), "mixture must be one of"),
    (dict(mixture="temperature", mixture_temperature=0), "mixture_temperature must be"),
    (dict(mixture_temperature=float("nan")), "mixture_temperature: must be a finite number"),
])
def test_bad_mixtures_are_refused_naming_the_field(bad, field):
    with pytest.raises(ValueError, match="^" + field):
        SelectorConfig(**bad)


def test_colm_paper_keeps_the_stream_mixture_and_says_so():
    assert SelectorConfig(strategy="colm-paper").mixture == "stream"
    with pytest.raises(ValueError, match=r"^mixture 'balanced' .*strategy 'colm-paper'.*mixture must be"):
        SelectorConfig(strategy="colm-paper", mixture="balanced")


def test_an_explicit_mixture_round_trips_through_the_journaled_state():
    cfg = SelectorConfig(strategy="stratified", mixture={"b": 2, "a": 1})
    assert cfg.mixture == {"b": 2.0, "a": 1.0}  # plain floats, as given
    state = build_selector(None, cfg).state_dict()
    assert state["config"]["mixture"] == {"b": 2.0, "a": 1.0}
    assert state["config"]["mixture"] is not cfg.mixture  # a copy: the journal cannot alter the config
    assert SelectorConfig(**state["config"]) == cfg


def test_priming_refuses_an_explicit_mixture_naming_a_source_the_data_lacks():
    selector = build_selector(None, SelectorConfig(strategy="random", mixture={"a": 1, "zz": 1}))
    with pytest.raises(ValueError, match=r"^selector\.mixture names source\(s\) 'zz' .*its sources: a, b, c"):
        selector.prime_sources(COUNTS)
    assert selector.tracker.total == 0  # refused before priming
    named = build_selector(None, SelectorConfig(strategy="random", mixture={"a": 1, "c": 1}))
    named.prime_sources(COUNTS)  # every named source is in the data
    assert named.target_shares() == pytest.approx({"a": 0.375, "b": 0.25, "c": 0.375})  # b keeps 25%


@dataclass
class Sources:
    """A large batch as the model-free strategies read it: only the source of each row."""

    sources: list[str]

    def __len__(self) -> int:
        return len(self.sources)


def stream(steps: int, size: int, seed: int = 0) -> list[Sources]:
    """``steps`` large batches of ``size`` rows drawn independently from the STREAM mixture."""
    rng = random.Random(seed)
    names, probs = list(STREAM), list(STREAM.values())
    return [Sources(rng.choices(names, probs, k=size)) for _ in range(steps)]


STEPS, L, B = 4000, 64, 16


@pytest.mark.parametrize("strategy", ["random", "stratified", "full"])
@pytest.mark.parametrize("mixture", ["stream", "balanced", EXPLICIT])
def test_over_many_steps_each_source_carries_its_target_share_of_the_weight(strategy, mixture):
    cfg = SelectorConfig(strategy=strategy, batch_size=B, large_batch_size=L, small_source_share=0.1,
                         mixture=mixture)
    selector = build_selector(None, cfg)
    selector.prime_sources({s: 100 * c for s, c in COUNTS.items()})  # as a manifest's counts do
    target = selector.target_shares()
    per_step = []  # {source: weight selected} of each step
    for t, batch in enumerate(stream(STEPS, L)):
        sel = selector.select(batch, step=t)
        weights: dict[str, float] = dict.fromkeys(STREAM, 0.0)
        for i, w in zip(sel.indices.tolist(), sel.weights.tolist()):
            weights[batch.sources[i]] += w
        per_step.append(weights)
    totals = [sum(w.values()) for w in per_step]
    for s in STREAM:
        realised = sum(w[s] for w in per_step) / sum(totals)
        # Ratio of sums: its standard error is sd(W_s - target * W) / (sqrt(steps) * mean W).
        gaps = [w[s] - target[s] * total for w, total in zip(per_step, totals)]
        tol = 4 * statistics.pstdev(gaps) / (math.sqrt(STEPS) * statistics.fmean(totals))
        assert tol < 0.03, f"{s}: too few steps to tell the mixtures apart"
        assert abs(realised - target[s]) <= tol, (s, realised, target[s], tol)
        if mixture != "stream":  # the weights moved the mixture well away from the stream's
            assert abs(realised - STREAM[s]) > 3 * tol, (s, realised, STREAM[s])


@pytest.mark.parametrize("strategy", ["random", "stratified", "full"])
def test_a_mixture_rescales_each_sources_weights_and_leaves_the_selection_alone(strategy):
    batch = stream(1, L, seed=3)[0]
    cfg = dict(strategy=strategy, batch_size=B, large_batch_size=L, small_source_share=0.1)
    stream_sel = build_selector(None, SelectorConfig(**cfg)).select(batch, step=0)
    mixed_sel = build_selector(None, SelectorConfig(**cfg, mixture="balanced")).select(batch, step=0)
    assert torch.equal(stream_sel.indices, mixed_sel.indices)
    rows = stream_sel.stats["sources"]
    factor = {s: row["target_share"] / row["stream_share"] for s, row in mixed_sel.stats["sources"].items()}
    assert all(row["factor"] == 1.0 and row["target_share"] == row["stream_share"] for row in rows.values())
    assert {s: row["factor"] for s, row in mixed_sel.stats["sources"].items()} == pytest.approx(factor)
    assert mixed_sel.stats["sources"]["c"]["factor"] > 1 > mixed_sel.stats["sources"]["a"]["factor"]
    sources = [batch.sources[i] for i in stream_sel.indices.tolist()]
    expected = stream_sel.weights * torch.tensor([factor[s] for s in sources])
    assert torch.allclose(mixed_sel.weights, expected, rtol=1e-6)
    # With the stream mixture the weights are the strategy's own: 1, or stratum size / picked.
    for s, w in zip(sources, stream_sel.weights.tolist()):
        own = rows[s]["batch"] / rows[s]["selected"] if strategy == "stratified" else 1.0
        assert w == pytest.approx(own)
