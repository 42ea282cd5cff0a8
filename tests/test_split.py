"""The re-run of the top layers reproduces the full forward's per-sample losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from colm_server.model.split import LayerSplit
from colm_server.model.tiny import TINY_ARCHS, tiny_model
from conftest import lora_model


def full_forward_losses(model, batch) -> torch.Tensor:
    """Reference: per-sample mean response-token loss from the model's own forward."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    targets = batch.labels[:, 1:]
    token = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, reduction="none",
                            ignore_index=-100)
    mask = (targets != -100).float()
    return (token * mask).sum(1) / mask.sum(1)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("top", [1, 2])
def test_top_layer_rerun_matches_full_forward(arch, lora, top, batch):
    model = lora_model(arch) if lora else tiny_model(arch, num_layers=2)
    split = LayerSplit(model, num_top_layers=top, chunk_tokens=7)  # chunks that don't divide M
    cache = split.prefix(batch.input_ids, batch.attention_mask, batch.labels)
    with torch.no_grad():
        got = split.losses(cache)
    want = full_forward_losses(model, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_head_grad_matches_autograd(batch):
    split = LayerSplit(lora_model("llama"), chunk_tokens=5)
    cache = split.prefix(batch.input_ids, batch.attention_mask, batch.labels)
    with torch.no_grad():
        h = split.top_hidden(cache)
    h = h.clone().requires_grad_(True)
    want_losses = split.sample_means(split.token_losses(h, cache), cache)
    (want_grad,) = torch.autograd.grad(want_losses.sum(), h)
    losses, grad = split.losses_and_head_grad(h, cache)
    torch.testing.assert_close(losses, want_losses.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-7)


def test_refuses_more_top_layers_than_the_model_has():
    with pytest.raises(ValueError, match="num_top_layers"):
        LayerSplit(tiny_model("llama", num_layers=2), num_top_layers=3)
