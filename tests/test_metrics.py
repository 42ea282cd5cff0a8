"""Gradient-matching error: zero for the whole batch, and computed on all LoRA matrices."""

import torch

from colm_client.loss import per_sample_loss
from colm_server.select.metrics import adapter_grads, adapter_targets, matching_error
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
