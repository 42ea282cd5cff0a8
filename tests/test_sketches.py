"""Both sketches agree with autograd on the per-sample losses of the top layers."""

from __future__ import annotations

import pytest
import torch

from colm_server.model.split import LayerSplit
from colm_server.model.tiny import tiny_model
from colm_server.select import SelectorConfig
from colm_server.select.activations import activation_sketch, mean_inputs
from colm_server.select.exact import count_sketch, exact_sketch, per_sample_grads
from colm_server.select.scoring import Scorer
from colm_server.select.targets import sketch_targets
from colm_server.select.zo import probe_directions, zo_sketch
from conftest import lora_model


def autograd_per_sample(split, cache, targets) -> torch.Tensor:
    """Reference: one backward per sample, all targets' weight gradients concatenated."""
    weights = [t.module.weight for t in targets]
    saved = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    rows = []
    for n in range(cache.num_samples):
        losses = split.losses(cache)
        grads = torch.autograd.grad(losses[n], weights, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(w)).flatten()
                               for g, w in zip(grads, weights)]))
    for w, s in zip(weights, saved):
        w.requires_grad_(s)
    return torch.stack(rows)


def setup(model, batch, layers=1, params="probe"):
    split = LayerSplit(model, num_top_layers=layers)
    cache = split.prefix(batch.input_ids, batch.attention_mask, batch.labels)
    return split, cache, sketch_targets(split.top, params=params, probe_module="v_proj")


@pytest.mark.parametrize("lora,layers,params", [(True, 1, "probe"), (False, 1, "probe"),
                                                 (True, 2, "adapter")])
def test_zo_matches_autograd_directional_derivatives(lora, layers, params, batch):
    model = lora_model("llama") if lora else tiny_model("llama", num_layers=2)
    split, cache, targets = setup(model, batch, layers=layers, params=params)
    before = [t.module.weight.detach().clone() for t in targets]
    sketch = zo_sketch(split, cache, targets, probes=4, eps=1e-3, seed=3, step=7)
    # Bitwise restored: not merely close.
    for t, w in zip(targets, before):
        assert torch.equal(t.module.weight, w)
    want = autograd_per_sample(split, cache, targets) @ probe_directions(sketch.dim, 4, 3, 7).T
    rel = (sketch.coeffs - want).norm() / want.norm()
    assert rel < 2e-2


def test_probe_directions_are_reproducible():
    assert torch.equal(probe_directions(10, 3, seed=1, step=5), probe_directions(10, 3, 1, 5))
    assert not torch.equal(probe_directions(10, 3, 1, 5), probe_directions(10, 3, 1, 6))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi"])
@pytest.mark.parametrize("layers,params", [(1, "probe"), (1, "adapter"), (2, "adapter")])
def test_exact_sketch_equals_per_sample_autograd(arch, layers, params, batch):
    split, cache, targets = setup(lora_model(arch), batch, layers=layers, params=params)
    sketch = exact_sketch(split, [cache], targets, dim=1 << 30, seed=0)
    want = autograd_per_sample(split, cache, targets)
    assert sketch.grads.shape == want.shape
    assert (sketch.grads - want).norm() / want.norm() < 1e-4
    _, losses = per_sample_grads(split, cache, targets)
    with torch.no_grad():
        torch.testing.assert_close(losses, split.losses(cache))


def test_exact_sketch_without_lora_uses_the_probe_weight(batch):
    split, cache, targets = setup(tiny_model("llama", num_layers=2), batch)
    assert [t.name for t in targets] == ["top0.self_attn.v_proj"]
    sketch = exact_sketch(split, [cache], targets, dim=1 << 30, seed=0)
    want = autograd_per_sample(split, cache, targets)
    assert (sketch.grads - want).norm() / want.norm() < 1e-4


def test_adapter_targets_cover_every_lora_matrix_of_the_top_layers(batch):
    split, _, targets = setup(lora_model("llama"), batch, layers=2, params="adapter")
    names = {t.name.split(".")[-2] for t in targets}
    assert names == {"lora_A", "lora_B"}
    assert len(targets) == 2 * 4 * 2  # layers x (q, k, v, o) x (A, B)


def test_large_sketches_are_count_sketch_projected(batch):
    split, cache, targets = setup(lora_model("llama"), batch, layers=2, params="adapter")
    grads, _ = per_sample_grads(split, cache, targets)
    sketch = exact_sketch(split, [cache], targets, dim=64, seed=5)
    assert sketch.grads.shape == (len(batch), 64)
    # A count sketch preserves inner products in expectation; here check it is a fixed linear map.
    again = exact_sketch(split, [cache], targets, dim=64, seed=5)
    torch.testing.assert_close(sketch.grads, again.grads)
    total = sum(count_sketch(g, 64, 5, i) for i, g in enumerate(grads))
    torch.testing.assert_close(sketch.grads, total)


def test_count_sketch_hash_is_drawn_once_per_target_and_kept():
    from colm_server.select.exact import _hash
    grads = torch.randn(4, 300)
    before = _hash.cache_info()
    first = count_sketch(grads, 16, seed=123, offset=7)
    again = count_sketch(grads, 16, seed=123, offset=7)  # as every chunk's backward hook calls it
    after = _hash.cache_info()
    assert torch.equal(first, again)
    assert after.misses - before.misses == 1 and after.hits - before.hits == 1


def test_count_sketch_sends_each_coordinate_to_one_signed_bucket():
    proj = count_sketch(torch.eye(50), out_dim=8, seed=1, offset=0)
    assert proj.shape == (50, 8)
    assert torch.equal(proj.abs().sum(1), torch.ones(50))
    assert set(proj[proj != 0].tolist()) <= {-1.0, 1.0}


def test_chunked_whole_adapter_sketch_is_the_projection_of_every_layers_gradients(batch):
    """Chunks of 5 samples, every layer: the same rows as projecting the full per-sample
    gradients of the whole batch at once (autograd reference), to float rounding."""
    model = lora_model("llama")
    split, cache, targets = setup(model, batch, layers=2, params="adapter")
    chunks = [split.prefix(*(t[i:i + 5] for t in (batch.input_ids, batch.attention_mask, batch.labels)))
              for i in range(0, len(batch), 5)]
    sketch = exact_sketch(split, chunks, targets, dim=32, seed=2)
    full = autograd_per_sample(split, cache, targets)
    sizes = [t.numel for t in targets]
    want = sum(count_sketch(g, 32, 2, i) for i, g in enumerate(full.split(sizes, dim=1)))
    assert sketch.grads.shape == (len(batch), 32)
    assert (sketch.grads - want).norm() / want.norm() < 1e-4


def test_count_sketch_keeps_distances_in_expectation():
    """Pairwise distances of 2000-dim rows, sketched to 512 coordinates, stay within 25%."""
    x = torch.randn(6, 2000, generator=torch.Generator().manual_seed(0))
    proj = count_sketch(x, out_dim=512, seed=3, offset=0)
    ratio = torch.pdist(proj) / torch.pdist(x)
    assert ((ratio - 1).abs() < 0.25).all(), ratio


def test_chunk_size_does_not_change_the_sketch(batch):
    model = lora_model("llama")
    sketches = [Scorer(model, SelectorConfig(batch_size=4, large_batch_size=16, sketch_dim=40,
                                             sketch_chunk=c)).sketch(batch, step=0).grads
                for c in (3, 16)]
    torch.testing.assert_close(sketches[0], sketches[1], rtol=1e-4, atol=1e-6)


def test_activation_sketch_holds_each_samples_mean_input_of_the_lora_matrices(batch):
    """q, k and v share one input (the normed hidden states): it appears once, as the mean over
    the positions where the loss is taken; o_proj's and the four B matrices' inputs follow."""
    split, cache, targets = setup(lora_model("llama"), batch, layers=1, params="adapter")
    parts = mean_inputs(split, cache, targets)
    assert len(parts) == 6
    with torch.no_grad():
        normed = split.top[0].input_layernorm(cache.hidden)[cache.rows, cache.positions]
    want = torch.zeros(len(batch), normed.shape[1]).index_add_(0, cache.rows, normed)
    want /= cache.token_counts.clamp(min=1)[:, None]
    torch.testing.assert_close(parts[0], want)
    sketch = activation_sketch(split, [cache], targets, dim=24, seed=1)
    torch.testing.assert_close(sketch.grads, sum(count_sketch(x, 24, 1, i) for i, x in enumerate(parts)))
