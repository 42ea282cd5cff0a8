"""bfloat16, the model dtype on a GPU: sketches, zo probes, facility location and adapters agree
with float32 on the same weights."""

from __future__ import annotations

import copy

import pytest
import torch

from colm_server.model.load import attach_lora, load_model
from colm_server.model.split import LayerSplit
from colm_server.model.tiny import tiny_model
from colm_server.select import SelectorConfig, build_selector
from colm_server.select.exact import exact_sketch
from colm_server.select.facility import SIMILARITIES, facility_location, pairwise_similarity
from colm_server.select.scoring import Scorer
from colm_server.select.sketch import LowRankSketch
from colm_server.select.targets import sketch_targets
from colm_server.select.zo import probe_directions, zo_sketch
from conftest import make_records, randomize_lora

DTYPES = [torch.float32, torch.bfloat16]
WIDER = {torch.bfloat16: torch.float32, torch.float32: torch.float64}


def model_in(dtype: torch.dtype, num_layers: int = 2, lora: bool = True):
    """A tiny llama whose base weights are bfloat16 numbers held in ``dtype``, with a random LoRA
    (in float32 on a bfloat16 model, as `attach_lora` leaves it): the same weights in any dtype."""
    model = tiny_model("llama", num_layers=num_layers, dtype=torch.bfloat16).to(dtype)
    if not lora:
        return model
    return randomize_lora(attach_lora(model, r=4, alpha=8), seed=1)


def setup(model, batch, layers: int, params: str):
    split = LayerSplit(model, num_top_layers=layers)
    cache = split.prefix(batch.input_ids, batch.attention_mask, batch.labels)
    return split, cache, sketch_targets(split.top, params=params, probe_module="v_proj")


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lora,layers,params", [(True, 1, "probe"), (False, 1, "probe"),
                                                 (True, 2, "adapter")])
def test_zo_directional_derivatives_are_the_exact_float32_ones(dtype, lora, layers, params, batch):
    """An eps = 1e-3 step changes bfloat16 activations by less than their rounding: the probes
    are only right because the perturbed layers and everything after them run in float32."""
    model = model_in(dtype, lora=lora)
    split, cache, targets = setup(model, batch, layers, params)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sketch = zo_sketch(split, cache, targets, probes=4, eps=1e-3, seed=3, step=7)
    for name, p in model.named_parameters():  # the model is given back as it was, dtypes too
        assert p.dtype == before[name].dtype and torch.equal(p, before[name]), name

    reference = setup(model_in(torch.float32, lora=lora), batch, layers, params)
    grads = exact_sketch(reference[0], [reference[1]], reference[2], dim=1 << 30, seed=0).grads
    want = grads @ probe_directions(sketch.dim, 4, seed=3, step=7).T
    assert correlation(sketch.coeffs, want) > 0.999
    assert (sketch.coeffs - want).norm() / want.norm() < 2e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layers", [1, 0])
@pytest.mark.parametrize("sketch", ["exact", "activations", "zo"])
def test_sketch_distances_are_those_of_the_next_wider_dtype(dtype, sketch, layers, batch):
    """Facility location sees only distances between samples' sketches: in bfloat16 they are the
    float32 ones, in float32 the float64 ones (``layers=1``: the layer below the sketched one runs
    in that dtype too; 0: every layer is sketched)."""
    config = SelectorConfig(sketch=sketch, sketch_layers=layers, sketch_dim=64, zo_probes=4,
                            batch_size=4, large_batch_size=16)
    got = Scorer(model_in(dtype), config).sketch(batch, step=0).features()
    want = Scorer(model_in(WIDER[dtype]), config).sketch(batch, step=0).features()
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert correlation(torch.pdist(got), torch.pdist(want)) >= 0.99


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", SIMILARITIES)
def test_facility_location_on_bf16_features_is_the_float32_one(dtype, metric):
    """Half-precision features and similarities are worked on in float32: the same numbers give
    the same picks, and three far-apart clusters get one pick each, weighted by its size."""
    gen = torch.Generator().manual_seed(2)
    centres = 6 * torch.eye(3)
    x = (centres.repeat_interleave(torch.tensor([6, 4, 2]), dim=0)
         + 0.3 * torch.randn(12, 3, generator=gen)).to(torch.bfloat16)
    sim = pairwise_similarity(x.to(dtype), metric)
    assert sim.dtype == torch.float32
    assert torch.equal(sim, pairwise_similarity(x.float(), metric))
    order, counts = facility_location(sim.to(dtype), 3)
    want_order, want_counts = facility_location(sim.to(dtype).float(), 3)
    assert order.tolist() == want_order.tolist() and counts.tolist() == want_counts.tolist()
    cluster = torch.tensor([0] * 6 + [1] * 4 + [2] * 2)
    assert sorted(zip(cluster[order].tolist(), counts.tolist())) == [(0, 6), (1, 4), (2, 2)]


@pytest.mark.parametrize("saved", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_an_adapter_applies_to_a_model_of_either_dtype(dtype, saved, tmp_path, tokenizer):
    """A trainer's adapter (float32 or bfloat16) loads into the selector's model (float32, or
    bfloat16 on a GPU) exactly, in float32, and changes its logits as it does in float32."""
    trainer = model_in(torch.float32).to(saved)
    trainer.save_pretrained(tmp_path)
    adapter = {n: p.detach().float() for n, p in trainer.named_parameters() if "lora_" in n}
    model = attach_lora(load_model("tiny:llama", dtype=dtype), adapter=str(tmp_path)).eval()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora.keys() == adapter.keys()
    for name, p in lora.items():
        assert p.dtype == torch.float32 and torch.equal(p, adapter[name]), name
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {dtype}

    enc = tokenizer(["12 + 30 = 42\n", "7 + 5 = 12!\n"], padding=True, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def effect(m) -> torch.Tensor:
        """What the adapter adds to the logits."""
        with torch.no_grad():
            with_adapter = m(**inputs).logits.float()
            with m.disable_adapter():
                return with_adapter - m(**inputs).logits.float()

    got = effect(model)
    assert got.abs().max() > 0
    assert correlation(got, effect(trainer.float())) >= 0.99


def test_colm_paper_picks_in_bf16_are_the_float32_ones(collator, monkeypatch):
    """The paper's configuration (zo, one probe on the last v_proj's LoRA B) selects the same
    samples whether the model is in bfloat16 or float32.

    One decoder layer: below the probed layer only the embedding lookup runs, the same numbers in
    either dtype, so what differs is the precision of the probes alone. One probe and the l1
    similarity tie easily (every sample's features lie on one curve, a one-dimensional problem),
    so the batch is one without near-ties: its float32 picks stay put when the probe coefficients
    move by three times their bfloat16 - float32 difference.
    """
    config = SelectorConfig(strategy="colm-paper", batch_size=5, large_batch_size=15, zo_dim=64)
    first, batch = (collator(make_records({"a": 15}, seed=s)) for s in (0, 3))
    reference = build_selector(model_in(torch.float32, num_layers=1), config)
    reference.select(first, step=0)  # normalizer state: before any, the features are only signs
    state = reference.state_dict()

    def selector(dtype: torch.dtype):
        sel = build_selector(model_in(dtype, num_layers=1), config)
        sel.load_state_dict(copy.deepcopy(state))
        return sel

    selectors = {dtype: selector(dtype) for dtype in DTYPES}
    sketches = {dtype: s.scorer.sketch(batch, step=1) for dtype, s in selectors.items()}
    picks = {dtype: s.select(batch, step=1).indices.tolist() for dtype, s in selectors.items()}
    assert picks[torch.bfloat16] == picks[torch.float32]

    def float32_picks_from(sketch: LowRankSketch) -> list[int]:
        sel = selector(torch.float32)
        monkeypatch.setattr(sel.scorer, "sketch", lambda b, step: sketch)
        return sel.select(batch, step=1).indices.tolist()

    exact = sketches[torch.float32]
    gap = float((sketches[torch.bfloat16].coeffs - exact.coeffs).abs().max())
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        noise = 3 * gap * (2 * torch.rand(exact.coeffs.shape, generator=gen) - 1)
        moved = LowRankSketch(exact.coeffs + noise, exact.directions)
        assert float32_picks_from(moved) == picks[torch.float32]
