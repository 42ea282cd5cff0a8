"""What the sketches hold: one copy of a shared input, in the model's dtype, the same sketches as
a plain per-target hook; host reads done once per batch; the device peak taken per selection."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from colm_server import peak_memory
from colm_server.data.collate import Collator
from colm_server.model.load import attach_lora
from colm_server.model.split import LayerSplit
from colm_server.model.tiny import build_tokenizer, tiny_model
from colm_server.peak_memory import DevicePeakWindow, peak_device_bytes, reset_device_peak
from colm_server.select import SelectorConfig, build_selector, strategies
from colm_server.select.activations import mean_inputs
from colm_server.select.exact import count_sketch, per_sample_grads, per_sample_outer
from colm_server.select.normalize import AdamNormalizer
from colm_server.select.targets import sketch_targets
from colm_server.service.job import Job
from colm_server.service.journal import Journal
from conftest import randomize_lora


def lora(dtype: torch.dtype, arch: str = "llama", dropout: float = 0.0):
    """A two-layer tiny model with a trained-looking adapter (B != 0), in ``dtype``."""
    return randomize_lora(attach_lora(tiny_model(arch, num_layers=2, dtype=dtype), r=4, alpha=8,
                                      dropout=dropout), seed=1)


def setup(model, batch, params="adapter"):
    split = LayerSplit(model, num_top_layers=2)
    cache = split.prefix(batch.input_ids, batch.attention_mask, batch.labels)
    return split, cache, sketch_targets(split.top, params=params, probe_module="v_proj")


def reference_grads(split, cache, targets) -> list[torch.Tensor]:
    """The straightforward hook: each target keeps its own input (peft's fp32 copy for a LoRA A
    matrix) and forms its per-sample gradient in fp32 in the backward."""
    grads = [None] * len(targets)

    def hook(i):
        def keep(module, args, output):
            x = args[0].detach()
            output.register_hook(lambda dy: grads.__setitem__(
                i, torch.einsum("nto,nti->noi", dy.float(), x.float()).flatten(1)))
        return keep

    handles = [t.module.register_forward_hook(hook(i)) for i, t in enumerate(targets)]
    try:
        with torch.enable_grad():
            hidden = cache.hidden.detach().requires_grad_(True)
            h = split.top_hidden(cache, hidden)
            _, dh = split.losses_and_head_grad(h, cache)
            torch.autograd.backward(h, grad_tensors=dh, inputs=[hidden])
    finally:
        for handle in handles:
            handle.remove()
    return grads


def lora_a(targets) -> dict[str, list[int]]:
    """Per layer, the indices of its LoRA A targets."""
    out: dict[str, list[int]] = {}
    for i, t in enumerate(targets):
        if ".lora_A." in t.name:
            out.setdefault(t.name.split(".", 1)[0], []).append(i)
    return out


def distinct(tensors) -> dict[int, int]:
    """Storage address -> bytes, for the storages the tensors hold."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_exact_gradients_are_those_of_a_hook_keeping_each_targets_own_input(dtype, arch, batch):
    split, cache, targets = setup(lora(dtype, arch), batch)
    want = reference_grads(split, cache, targets)
    got, _ = per_sample_grads(split, cache, targets)
    for t, g, w in zip(targets, got, want):
        assert torch.equal(g, w), t.name
    projected, _ = per_sample_grads(split, cache, targets, lambda i, g: count_sketch(g, 32, 3, i))
    for i, (p, w) in enumerate(zip(projected, want)):
        assert torch.equal(p, count_sketch(w, 32, 3, i))


def test_q_k_and_v_keep_one_input_in_the_models_dtype(batch):
    """bf16 model, fp32 adapter: peft casts the layer input once per LoRA A matrix; the hook
    keeps the layer's bf16 input once for q, k and v, and o_proj's own input."""
    split, cache, targets = setup(lora(torch.bfloat16), batch)
    kept: dict[int, torch.Tensor] = {}
    per_sample_grads(split, cache, targets, kept=kept)
    assert sorted(kept) == list(range(len(targets)))
    n, t = cache.hidden.shape[:2]
    hidden = cache.hidden.shape[2]
    for layer, (q, k, v, o) in lora_a(targets).items():
        assert kept[q] is kept[k] is kept[v], layer
        assert kept[o] is not kept[q]
        for i in (q, o):
            assert kept[i].dtype == torch.bfloat16 and kept[i].shape == (n, t, hidden)
    # Per layer: the shared input, o_proj's input and the four B matrices' r-wide inputs.
    held = distinct(kept.values())
    r = targets[0].module.weight.shape[0]
    assert len(held) == 2 * 6
    assert sum(held.values()) == 2 * (2 * n * t * hidden * 2 + 4 * n * t * r * 4)
    # The plain hook held q's, k's and v's fp32 copies apart, twice the bytes each.
    own: list[torch.Tensor] = []
    handles = [x.module.register_forward_hook(lambda m, a, out: own.append(a[0])) for x in targets]
    try:
        per_sample_grads(split, cache, targets)
    finally:
        for handle in handles:
            handle.remove()
    before = distinct(own)
    assert len(before) == 2 * 8
    assert sum(before.values()) == 2 * (4 * n * t * hidden * 4 + 4 * n * t * r * 4)


def test_a_lora_a_matrix_behind_active_dropout_keeps_its_own_input(batch):
    """In training mode with dropout, A does not read its layer's input: nothing is shared."""
    split, cache, targets = setup(lora(torch.bfloat16, dropout=0.5).train(), batch)
    kept: dict[int, torch.Tensor] = {}
    per_sample_grads(split, cache, targets, kept=kept)
    for q, k, v, _ in lora_a(targets).values():
        assert len(distinct([kept[q], kept[k], kept[v]])) == 3
        assert kept[q].dtype == torch.float32


def test_probe_without_lora_keeps_the_base_input(batch):
    split, cache, targets = setup(tiny_model("llama", num_layers=2, dtype=torch.bfloat16), batch,
                                  params="probe")
    kept: dict[int, torch.Tensor] = {}
    got, _ = per_sample_grads(split, cache, targets, kept=kept)
    assert [kept[i].dtype for i in kept] == [torch.bfloat16] * len(targets)
    for g, w in zip(got, reference_grads(split, cache, targets)):
        assert torch.equal(g, w)


def test_the_fp32_cast_by_slices_of_samples_gives_the_same_sums():
    gen = torch.Generator().manual_seed(0)
    dy = torch.randn(5, 7, 3, generator=gen)
    x = torch.randn(5, 7, 11, generator=gen).bfloat16()
    whole = torch.einsum("nto,nti->noi", dy, x.float())
    slice_of_two = 2 * 4 * 7 * (3 + 11)
    for max_bytes in (1, slice_of_two, 1 << 20):
        torch.testing.assert_close(per_sample_outer(dy, x, max_bytes=max_bytes), whole, rtol=1e-6, atol=0)
    assert per_sample_outer(dy[:0], x[:0]).shape == (0, 3, 11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_means_keep_the_shared_input_once_with_the_values_of_every_targets_own(dtype, batch):
    split, cache, targets = setup(lora(dtype), batch)
    parts = mean_inputs(split, cache, targets)
    # Reference: every target's own input, duplicates dropped by value.
    own: list[torch.Tensor] = []
    handles = [t.module.register_forward_hook(lambda m, a, out: own.append(a[0].clone()))
               for t in targets]
    try:
        with torch.inference_mode():
            split.top_hidden(cache)
    finally:
        for handle in handles:
            handle.remove()
    want: list[torch.Tensor] = []
    for x in own:
        at = x[cache.rows, cache.positions].float()
        mean = at.new_zeros(cache.num_samples, at.shape[1]).index_add_(0, cache.rows, at)
        mean /= cache.token_counts.clamp(min=1)[:, None]
        if not any(m.shape == mean.shape and torch.equal(m, mean) for m in want):
            want.append(mean)
    assert len(parts) == len(want) == 2 * 6
    for p, w in zip(parts, want):
        assert torch.equal(p, w)


def test_prefix_counts_and_positions_are_those_of_nonzero_and_bincount(batch):
    split = LayerSplit(lora(torch.float32), num_top_layers=1)
    cache = split.prefix(batch.input_ids, batch.attention_mask, batch.labels)
    rows, positions = (batch.labels[:, 1:] != -100).nonzero(as_tuple=True)
    assert torch.equal(cache.rows, rows) and torch.equal(cache.positions, positions)
    assert torch.equal(cache.targets, batch.labels[rows, positions + 1])
    assert torch.equal(cache.token_counts, torch.bincount(rows, minlength=len(batch)).float())


def test_subset_widths_come_from_the_host_lengths_read_once(batch):
    lengths = batch.host_lengths()
    assert torch.equal(lengths, batch.attention_mask.sum(1))
    assert batch.host_lengths() is lengths  # cached: a device batch reads its mask back once
    sub = batch.subset([3, 0, 7])
    assert sub.input_ids.shape[1] == int(lengths[[3, 0, 7]].max())
    assert torch.equal(sub.host_lengths(), lengths[[3, 0, 7]])
    assert torch.equal(sub.attention_mask.sum(1), sub.host_lengths())
    assert torch.equal(batch.to("cpu").host_lengths(), lengths)


# --- Timings and the device peak, with CUDA stood in for on the CPU -----------------------------

class FakeCuda:
    """torch.cuda's allocator statistics for one device, moved by hand."""

    def __init__(self, monkeypatch, held: int):
        self.held = self.peak = held
        self.synced: list = []
        for name, fn in dict(is_available=lambda: True, is_initialized=lambda: True,
                             device_count=lambda: 1, max_memory_allocated=lambda d=None: self.peak,
                             reset_peak_memory_stats=self.reset,
                             synchronize=lambda d=None: self.synced.append(d)).items():
            monkeypatch.setattr(torch.cuda, name, fn)
        monkeypatch.setattr(peak_memory, "_closed_windows_peak", 0)

    def reset(self, device=None) -> None:
        self.peak = self.held

    def use(self, nbytes: int) -> None:
        """Allocate ``nbytes`` and free them again."""
        self.peak = max(self.peak, self.held + nbytes)


def test_a_peak_window_sees_its_own_peak_and_the_lifetime_peak_keeps_every_window(monkeypatch):
    cuda = FakeCuda(monkeypatch, held=100)
    cuda.use(1000)
    with DevicePeakWindow() as first:
        cuda.use(500)
    with DevicePeakWindow() as second:
        cuda.use(200)
    assert (first.device_bytes, second.device_bytes) == (600, 300)
    assert peak_device_bytes() == 1100
    reset_device_peak()
    assert peak_device_bytes() == 1100


class Records:
    """An endless stream of records with what a `Job` reads of a `ShardStream`."""

    epoch, skipped, taken = 0, {}, 0

    def take(self, n: int) -> list[dict]:
        self.taken += n
        return [{"id": f"r{i}", "source": "a", "prompt": f"{i} + 1 = ?", "response": str(i + 1)}
                for i in range(self.taken - n, self.taken)]

    def state_dict(self) -> dict:
        return {"taken": self.taken}


def test_the_service_reports_each_selections_own_device_peak(monkeypatch, tmp_path):
    """A large selection, then a small one: the job reports the small one's peak; Status's
    lifetime figure (`peak_device_bytes`) still the large one's."""
    cuda = FakeCuda(monkeypatch, held=100)
    uses = {0: 1000, 1: 200}

    def select(batch, step):
        cuda.use(uses[step])
        return SimpleNamespace(indices=torch.arange(2), weights=torch.ones(2), stats={})

    selector = SimpleNamespace(select=select, target_shares=dict, state_dict=dict)
    job = Job(selector=selector, collator=Collator(build_tokenizer(), max_length=32), stream=Records(),
              journal=Journal(tmp_path / "work"), world_size=1, records_per_step=4, prefetch=2,
              max_inflight=2)
    job._select_step(0)
    assert job.snapshot()["selection_peak_device_bytes"] == 1100
    job._select_step(1)
    assert job.snapshot()["selection_peak_device_bytes"] == 300
    assert peak_device_bytes() == 1100


def test_phase_timings_wait_for_a_cuda_device_only(monkeypatch):
    cuda = FakeCuda(monkeypatch, held=0)
    strategies._clock(torch.device("cpu"))
    assert cuda.synced == []
    strategies._clock(torch.device("cuda", 1))
    assert cuda.synced == [torch.device("cuda", 1)]


def test_the_normalisers_update_is_waited_for_within_its_own_selection(monkeypatch, batch):
    events: list[str] = []
    clock = strategies._clock
    update = AdamNormalizer.update
    monkeypatch.setattr(strategies, "_clock", lambda device: events.append("clock") or clock(device))
    monkeypatch.setattr(AdamNormalizer, "update",
                        lambda self, *a: events.append("update") or update(self, *a))
    model = attach_lora(tiny_model("llama", seed=0, num_layers=2), r=4, alpha=8)
    selector = build_selector(model, SelectorConfig(strategy="colm-paper", batch_size=8, large_batch_size=16,
                                                    zo_dim=32))
    timings = selector.select(batch, step=0).stats["timings"]
    assert events.index("update") < len(events) - 1 and events[-1] == "clock"  # clocked after it
    assert timings["update"] >= 0 and timings["total"] >= timings["sketch"] + timings["update"]
