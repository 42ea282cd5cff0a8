"""A scorer with its own LoRA (``scorer_adapter: own``): the selector trains it on its coresets."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from colm_server.model.load import attach_lora, decoder_layers, truncate_layers
from colm_server.model.tiny import tiny_model
from colm_server.select import SelectorConfig, build_selector
from colm_server.select.own_adapter import OwnAdapter
from conftest import randomize_lora


def scorer_model(num_layers: int = 4, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A tiny Llama with a non-zero LoRA, frozen as the service holds its scorer."""
    model = randomize_lora(attach_lora(tiny_model("llama", seed=seed, num_layers=num_layers, dtype=dtype),
                                       r=4, alpha=8), seed + 1)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def weighted_loss_by_hand(model, batch, weights: torch.Tensor) -> torch.Tensor:
    """The loss OwnAdapter should train on, with plain autograd through the whole HF forward."""
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    labels = batch.labels[:, 1:]
    tokens = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none")
    per_sample = tokens.sum(1) / (labels != -100).sum(1).clamp(min=1)
    return (per_sample * weights / weights.sum()).sum()


def test_the_gradient_is_that_of_the_coresets_weighted_loss_whatever_the_chunks(batch):
    model, reference = scorer_model(), scorer_model()
    coreset = batch.subset([0, 3, 5, 6, 9, 12, 15])
    weights = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 1.5, 4.0])
    loss = OwnAdapter(model, lr=1e-2, chunk=3).backward(coreset, weights)
    expected = weighted_loss_by_hand(reference, coreset, weights)
    expected.backward()
    assert loss == pytest.approx(float(expected.detach()), rel=1e-5)
    grads = {n: p.grad for n, p in reference.named_parameters() if "lora_" in n}
    for name, p in model.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-7)


def test_one_step_is_a_clipped_adamw_step_and_leaves_the_scorer_frozen(batch):
    model, reference = scorer_model(), scorer_model()
    weights = torch.linspace(0.5, 2.0, len(batch))
    OwnAdapter(model, lr=1e-2, chunk=5).step(batch, weights)
    weighted_loss_by_hand(reference, batch, weights).backward()
    params = [p for n, p in reference.named_parameters() if "lora_" in n]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0).step()
    after, by_hand = lora(model), lora(reference)
    for name in by_hand:  # Adam's first step moves each coordinate by about lr: compare to 0.1% of it
        torch.testing.assert_close(after[name], by_hand[name], rtol=0, atol=1e-5)
    assert not any(p.requires_grad for p in model.parameters())  # frozen again for the sketches
    assert all(p.grad is None for p in model.parameters())


def test_an_early_exit_trains_the_layers_it_keeps_as_the_model_cut_there_would(batch):
    model = scorer_model(num_layers=4)
    cut = copy.deepcopy(model)
    truncate_layers(cut.get_base_model(), 2)
    before = lora(model)
    weights = torch.ones(len(batch))
    OwnAdapter(model, lr=1e-2, scorer_layers=2).step(batch, weights)
    OwnAdapter(cut, lr=1e-2).step(batch, weights)
    after, trained_cut = lora(model), lora(cut)
    layers = decoder_layers(model)
    above = {n for n, p in model.named_parameters() if any(p is q for q in layers[2:].parameters())}
    for name in before:
        if name in above:
            assert torch.equal(after[name], before[name]), name  # above the exit: never trained
        else:
            torch.testing.assert_close(after[name], trained_cut[name], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(after[n], before[n]) for n in before if n not in above)


def test_a_selector_with_its_own_adapter_trains_it_after_every_selection(batch):
    model = scorer_model()
    cfg = SelectorConfig(strategy="colm-fast", scorer_adapter="own", scorer_lr=1e-2,
                         batch_size=8, large_batch_size=16)
    selector = build_selector(model, cfg)
    pushed = build_selector(copy.deepcopy(model), SelectorConfig(strategy="colm-fast", batch_size=8,
                                                                  large_batch_size=16))
    before = lora(model)
    first = selector.select(batch, step=0)
    assert first.indices.tolist() == pushed.select(batch, step=0).indices.tolist()  # same weights yet
    assert first.stats["scorer_loss"] > 0 and first.stats["timings"]["scorer_train"] > 0
    assert any(not torch.equal(lora(model)[n], before[n]) for n in before)
    assert selector.own_adapter.steps == 1
    second, other = selector.select(batch, step=1), pushed.select(batch, step=1)
    assert not torch.allclose(selector.scorer.sketch(batch, 1).features(),
                              pushed.scorer.sketch(batch, 1).features())
    assert len(second.indices) == len(other.indices) == 8


def test_a_resumed_selector_continues_its_adapter_and_optimiser_exactly(batch):
    cfg = SelectorConfig(strategy="colm", scorer_adapter="own", scorer_lr=1e-2, batch_size=8,
                         large_batch_size=16)
    running = build_selector(scorer_model(), cfg)
    for step in range(2):
        running.select(batch, step)
    saved = copy.deepcopy(running.state_dict())
    resumed = build_selector(scorer_model(), cfg)  # a restarted process: the LoRA it loads is the initial one
    resumed.load_state_dict(saved)
    a, b = running.select(batch, 2), resumed.select(batch, 2)
    assert a.indices.tolist() == b.indices.tolist()
    torch.testing.assert_close(a.weights, b.weights)
    mine, theirs = lora(running.scorer.split.model), lora(resumed.scorer.split.model)
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name


def test_a_state_saved_without_an_own_adapter_is_refused_by_one_that_has_it(batch):
    plain = build_selector(scorer_model(), SelectorConfig(batch_size=8, large_batch_size=16))
    own = build_selector(scorer_model(), SelectorConfig(scorer_adapter="own", batch_size=8,
                                                        large_batch_size=16))
    with pytest.raises(ValueError, match="no scorer adapter"):
        own.load_state_dict(plain.state_dict())


def test_a_bfloat16_scorer_trains_its_float32_adapter(batch):
    model = scorer_model(dtype=torch.bfloat16)
    reference = scorer_model(dtype=torch.float32)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    weights = torch.linspace(0.5, 2.0, len(batch))
    loss = OwnAdapter(model, lr=1e-2, chunk=5).step(batch, weights)
    expected = OwnAdapter(reference, lr=1e-2, chunk=5).step(batch, weights)
    assert loss == pytest.approx(expected, rel=2e-2)
    low, full = lora(model), lora(reference)
    assert all(t.dtype == torch.float32 for t in low.values())
    # Adam's first steps move each coordinate by about lr in the sign of its gradient: compare the moves.
    start = lora(scorer_model())
    moved = torch.cat([(low[n] - start[n]).flatten() for n in low])
    moved_fp32 = torch.cat([(full[n] - start[n]).flatten() for n in full])
    assert torch.isfinite(moved).all()
    assert F.cosine_similarity(moved, moved_fp32, dim=0) > 0.9


@pytest.mark.parametrize("settings, message", [
    (dict(scorer_model="tiny:llama"), "needs scorer_adapter 'own'"),
    (dict(scorer_adapter="own", strategy="stratified"), "scores nothing"),
    (dict(scorer_adapter="own", scorer_lr=0.0), "scorer_lr"),
    (dict(scorer_adapter="mine"), "scorer_adapter must be one of"),
])
def test_scorer_settings_that_cannot_work_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        SelectorConfig(**settings)


def test_an_own_adapter_is_refused_with_selector_replicas():
    with pytest.raises(ValueError, match="replicas"):
        build_selector(scorer_model(), SelectorConfig(scorer_adapter="own"), replicas=True)
