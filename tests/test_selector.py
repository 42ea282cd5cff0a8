"""The public selection API, used as the service and the benchmarks use it."""

from __future__ import annotations

import pytest
import torch

from colm_server.select import SelectorConfig, build_selector
from conftest import lora_model, make_records

STRATEGY_NAMES = ["colm", "random", "stratified", "loss", "full"]


def config(**kw) -> SelectorConfig:
    base = dict(batch_size=6, large_batch_size=16, zo_dim=64, small_source_share=0.1)
    return SelectorConfig(**{**base, **kw})


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_every_strategy_returns_a_weighted_subset(strategy, batch):
    selector = build_selector(lora_model(), config(strategy=strategy))
    sel = selector.select(batch, step=0)
    want = len(batch) if strategy == "full" else 6
    assert sel.indices.shape == (want,) and sel.weights.shape == (want,)
    assert len(set(sel.indices.tolist())) == want
    assert 0 <= sel.indices.min() and sel.indices.max() < len(batch)
    assert (sel.weights > 0).all()
    stats = sel.stats["sources"]
    assert sum(s["batch"] for s in stats.values()) == len(batch)
    assert sum(s["selected"] for s in stats.values()) == want


@pytest.mark.parametrize("sketch", ["zo", "exact"])
def test_colm_keeps_small_sources_and_weights_sum_to_the_batch(sketch, batch):
    selector = build_selector(lora_model(), config(sketch=sketch, zo_probes=2))
    sel = selector.select(batch, step=0)
    stats = sel.stats["sources"]
    assert stats["tiny"]["small"] and stats["tiny"]["kept_small"]
    assert stats["tiny"]["selected"] == stats["tiny"]["batch"]
    # Cluster sizes of each source add up to the source's count: the weights cover the batch.
    assert sel.weights.sum().item() == pytest.approx(len(batch))
    assert {"sketch", "features", "facility", "total"} <= set(sel.stats["timings"])


def test_same_seed_and_state_give_the_same_selection(collator):
    batches = [collator(make_records({"a": 12, "b": 4}, seed=s)) for s in range(3)]
    runs = []
    for _ in range(2):
        selector = build_selector(lora_model(), config(sketch="zo", zo_probes=2))
        runs.append([selector.select(b, step=t) for t, b in enumerate(batches)])
    for x, y in zip(*runs):
        assert torch.equal(x.indices, y.indices) and torch.equal(x.weights, y.weights)


@pytest.mark.parametrize("strategy,normalised", [("colm", 0), ("colm-paper", 3)])
def test_state_dict_round_trip_resumes_identically(strategy, normalised, collator):
    batches = [collator(make_records({"a": 10, "b": 4, "c": 2}, seed=s)) for s in range(3)]
    first = build_selector(lora_model(), config(strategy=strategy))
    for t in range(2):
        first.select(batches[t], step=t)
    second = build_selector(lora_model(), config(strategy=strategy))
    second.load_state_dict(first.state_dict())
    a, b = first.select(batches[2], step=2), second.select(batches[2], step=2)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
    # Only the paper's chain carries Adam-like moments from step to step.
    assert first.state_dict()["normalizer"]["count"] == normalised


def test_colm_paper_scores_with_one_probe_on_the_last_v_proj_whatever_the_sketch_keys(batch):
    cfg = config(strategy="colm-paper", sketch="exact", sketch_layers=2, zo_probes=8,
                 similarity="cosine", normalize=False)
    scoring = cfg.scoring()
    assert (scoring.sketch, scoring.zo_probes, scoring.sketch_layers) == ("zo", 1, 1)
    assert (scoring.normalize, scoring.sparsify, scoring.similarity) == (True, True, "l1")
    selector = build_selector(lora_model(), cfg)
    assert [t.name for t in selector.scorer.targets] == ["top0.self_attn.v_proj.lora_B.default"]
    sketch = selector.scorer.sketch(batch, step=0)
    assert sketch.features().shape == (len(batch), 1)  # K = 1: every sketch on one line
    assert len(selector.select(batch, step=0).indices) == 6


def test_default_colm_sketches_every_layer_to_sketch_dim(batch):
    selector = build_selector(lora_model(), config(sketch_dim=48, sketch_chunk=5))
    layers = {t.name.split(".")[0] for t in selector.scorer.targets}
    assert layers == {"top0", "top1"}  # both layers of the tiny model
    assert selector.scorer.sketch(batch, step=0).features().shape == (len(batch), 48)


def test_budget_at_least_the_batch_selects_everything(batch):
    selector = build_selector(lora_model(), config(batch_size=16))
    sel = selector.select(batch, step=0)
    assert sorted(sel.indices.tolist()) == list(range(16))


def test_uniform_weighting_gives_unit_weights(batch):
    sel = build_selector(lora_model(), config(weighting="uniform")).select(batch, step=0)
    assert torch.equal(sel.weights, torch.ones(6))


def test_model_free_strategies_need_no_model(batch):
    sel = build_selector(None, config(strategy="stratified")).select(batch, step=0)
    assert len(sel.indices) == 6
    with pytest.raises(ValueError, match="needs a model"):
        build_selector(None, config(strategy="colm"))


@pytest.mark.parametrize("bad,field", [
    (dict(batch_size=20), "batch_size"),
    (dict(zo_probes=0), "zo_probes"),
    (dict(strategy="best"), "strategy"),
    (dict(similarity="dot"), "similarity"),
    (dict(sketch="fd"), "sketch"),
    (dict(sketch_layers=-1), "sketch_layers"),
    (dict(sketch_chunk=0), "sketch_chunk"),
    (dict(beta2=1.0), "beta2"),
    (dict(small_source_share=-0.1), "small_source_share"),
    (dict(batch_size="8"), "^batch_size: expected int"),  # types are checked too, not only YAML's
    (dict(keep_sources="gsm8k"), "^keep_sources: expected tuple"),
])
def test_bad_config_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        config(**bad)


def test_colm_paper_trains_on_unit_weights_as_the_paper_did(batch):
    colm = build_selector(lora_model(), config(strategy="colm", sketch="zo")).select(batch, step=0)
    paper_cfg = config(strategy="colm-paper", weighting="cluster")
    paper = build_selector(lora_model(), paper_cfg).select(batch, step=0)
    assert not torch.equal(colm.weights, torch.ones(6))  # cluster sizes: the batch's 16 over 6 samples
    assert torch.equal(paper.weights, torch.ones(6))  # whatever the weighting key says
    assert paper.stats["sources"]["tiny"]["kept_small"]  # the small source whole, at weight 1


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_every_strategy_aims_at_the_mixture_by_the_same_factors(strategy, batch):
    plain = build_selector(lora_model(), config(strategy=strategy)).select(batch, step=0)
    mixed = build_selector(lora_model(), config(strategy=strategy, mixture="balanced")).select(batch, step=0)
    assert torch.equal(plain.indices, mixed.indices)  # the mixture moves weights, not the selection
    stats = mixed.stats["sources"]
    assert all(s["target_share"] == pytest.approx(1 / 3) for s in stats.values())
    assert stats["tiny"]["factor"] == pytest.approx((1 / 3) / stats["tiny"]["stream_share"])
    assert stats["tiny"]["factor"] > 1 > stats["big"]["factor"]
    factors = torch.tensor([stats[batch.sources[i]]["factor"] for i in plain.indices.tolist()])
    assert torch.allclose(mixed.weights, plain.weights * factors, rtol=1e-6)
