"""The early-exit proxy scorer (``scorer_layers``) and the ``colm-fast`` preset built on it."""

from __future__ import annotations

import copy

import pytest
import torch

from colm_server.config import from_dict
from colm_server.model.load import attach_lora, decoder_layers, truncate_layers
from colm_server.model.tiny import tiny_model
from colm_server.select import SelectorConfig, build_selector
from colm_server.select.scoring import Scorer
from colm_server.select.selector import Selector
from conftest import randomize_lora


def trained_lora(num_layers: int, seed: int = 0):
    """A tiny Llama of ``num_layers`` layers with a non-zero LoRA (so every LoRA matrix has a gradient)."""
    return randomize_lora(attach_lora(tiny_model("llama", seed=seed, num_layers=num_layers), r=4, alpha=8),
                          seed + 1)


def cut_after(model, k: int):
    """A copy of ``model`` that keeps only its first ``k`` decoder layers: what the proxy should see."""
    cut = copy.deepcopy(model)
    truncate_layers(cut.get_base_model(), k)
    return cut


def test_the_proxy_scores_like_the_model_cut_after_its_first_k_layers(batch):
    model = trained_lora(4)
    proxy = Scorer(model, SelectorConfig(scorer_layers=2, batch_size=8, large_batch_size=16))
    whole = Scorer(cut_after(model, 2), SelectorConfig(batch_size=8, large_batch_size=16))
    assert len(proxy.split.layers) == 2 and len(proxy.split.top) == 2
    torch.testing.assert_close(proxy.losses(batch), whole.losses(batch))
    torch.testing.assert_close(proxy.sketch(batch, step=0).features(), whole.sketch(batch, step=0).features(),
                               rtol=1e-4, atol=1e-6)


def test_the_proxy_reads_the_adapter_of_the_layers_it_keeps_and_ignores_the_rest(batch):
    model = trained_lora(4)
    scorer = Scorer(model, SelectorConfig(scorer_layers=2, batch_size=8, large_batch_size=16))
    before = scorer.sketch(batch, step=0).features().clone()
    layers = decoder_layers(model)
    with torch.no_grad():  # a pushed adapter that changes only layers above the exit
        for name, p in layers[3].named_parameters():
            if "lora_B" in name:
                p.add_(1.0)
    torch.testing.assert_close(scorer.sketch(batch, step=0).features(), before)
    with torch.no_grad():  # ... and one that changes a kept layer
        for name, p in layers[0].named_parameters():
            if "lora_B" in name:
                p.add_(1.0)
    assert not torch.allclose(scorer.sketch(batch, step=0).features(), before)


def test_colm_fast_is_the_exact_sketch_of_an_exit_after_two_layers(batch):
    model = trained_lora(6)
    fast = build_selector(model, SelectorConfig(strategy="colm-fast", batch_size=8, large_batch_size=16))
    assert isinstance(fast, Selector)
    assert fast.scoring_config.sketch == "exact" and fast.scoring_config.scorer_layers == 2
    assert len(fast.scorer.split.layers) == 2 and fast.scorer.split.top == fast.scorer.split.layers
    by_hand = build_selector(model, SelectorConfig(strategy="colm", scorer_layers=2, batch_size=8,
                                                   large_batch_size=16))
    a, b = fast.select(batch, step=0), by_hand.select(batch, step=0)
    assert a.indices.tolist() == b.indices.tolist()
    torch.testing.assert_close(a.weights, b.weights)


def test_colm_fast_on_a_model_of_at_most_two_layers_scores_the_whole_model(batch):
    model = trained_lora(1)
    fast = build_selector(model, SelectorConfig(strategy="colm-fast", batch_size=8, large_batch_size=16))
    colm = build_selector(model, SelectorConfig(strategy="colm", batch_size=8, large_batch_size=16))
    assert len(fast.scorer.split.layers) == 1
    assert fast.select(batch, step=0).indices.tolist() == colm.select(batch, step=0).indices.tolist()


def test_colm_fast_is_chosen_by_name_from_yaml_and_set():
    assert from_dict({"selector": {"strategy": "colm-fast"}}).selector.strategy == "colm-fast"
    config = from_dict({}, overrides=["selector.strategy=colm-fast", "selector.mixture=balanced"])
    assert config.selector.scoring().scorer_layers == 2 and config.selector.mixture == "balanced"


@pytest.mark.parametrize("kw, words", [
    (dict(scorer_layers=-1), ["scorer_layers", ">= 0"]),
    (dict(scorer_layers=2, sketch_layers=3), ["sketch_layers", "scorer_layers"]),
])
def test_bad_proxy_settings_name_their_keys(kw, words):
    with pytest.raises(ValueError) as err:
        SelectorConfig(**kw)
    assert all(w in str(err.value) for w in words)


def test_an_exit_below_the_model_refuses_a_depth_it_does_not_have():
    from colm_server.model.split import LayerSplit

    with pytest.raises(ValueError, match="exit_after"):
        LayerSplit(trained_lora(2), exit_after=3)
