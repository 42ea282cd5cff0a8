"""Gradient-matching error: zero for the whole batch, and computed on all LoRA matrices."""

import pytest
import torch

from colm_client.loss import per_sample_loss
from colm_server.select.metrics import GramMatching, adapter_grads, adapter_targets, matching_error
from conftest import lora_model


def test_whole_batch_matches_exactly_and_a_single_sample_does_not():
    g = torch.randn(10, 7)
    assert matching_error(g, torch.arange(10), torch.ones(10)) < 1e-6
    assert matching_error(g, torch.tensor([0]), torch.ones(1)) > 0.1

def test_adapter_grads_cover_every_lora_matrix_and_sum_to_the_batch_gradient(batch):
    model = lora_model("llama")
    g = adapter_grads(model, batch, micro_batch=5)
    targets = adapter_targets(model)
    assert g.shape == (len(batch), sum(t.numel for t in targets))
    # The sum of per-sample gradients is the gradient of the summed per-sample losses.

    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    weights = [t.module.weight for t in targets]
    total = torch.autograd.grad(per_sample_loss(logits, batch.labels).sum(), weights)
    want = torch.cat([x.flatten() for x in total])
    torch.testing.assert_close(g.sum(0), want, rtol=1e-4, atol=1e-6)


def test_gram_matching_gives_matching_error_for_any_weighted_subset():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(12, 300, generator=gen) + 0.5
    fast = GramMatching(g)
    for rows, w in [(torch.tensor([0, 3, 7]), torch.tensor([4.0, 5.0, 3.0])),
                    (torch.arange(12), torch.ones(12)),
                    (torch.tensor([5, 5]), torch.tensor([1.0, 2.0]))]:
        assert fast(rows, w) == pytest.approx(matching_error(g, rows, w), rel=1e-5, abs=1e-6)
