"""Exact sketch: per-sample gradients of the sketched linear maps from one chunked backward.

The gradient of a linear map's weight for sample n is ``sum_t dy[n,t] x[n,t]^T``: a forward
hook keeps each sketched map's input ``x`` and hooks its output, so that during one backward
from the per-sample losses each map's ``dy`` is turned into every sample's gradient by an
einsum and, when the gradients are large, count-sketched right away. Only one chunk of
samples and one map's per-sample gradient are ever held; the lm_head is backpropagated by
hand in chunks of positions.

An input several maps read (q, k and v share their layer's normed hidden states) is kept once,
in the model's dtype: peft hands each LoRA A matrix its own copy cast to the adapter's dtype
(fp32), so a LoRA A matrix is given its layer's input instead when that copy differs from it
in dtype only. The einsum casts to fp32 a slice of samples at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from colm_server.model.split import LayerSplit, PrefixCache
from colm_server.select.sketch import DenseSketch
from colm_server.select.targets import SketchTarget

Project = Callable[[int, torch.Tensor], torch.Tensor]  # (target index, [N, numel]) -> [N, d]
OnInput = Callable[[int, torch.Tensor, torch.Tensor], None]  # (target index, input, output)

CAST_CHUNK_BYTES = 1 << 28  # fp32 bytes of one slice of samples cast inside a backward hook


def count_sketch(grads: torch.Tensor, out_dim: int, seed: int, offset: int) -> torch.Tensor:
    """Project ``[N, d]`` columns into ``out_dim`` buckets with seeded signs (fixed per seed).

    Each target (``offset``) gets its own hash, so summing the targets' projections is one
    count sketch of their concatenation: inner products and distances are kept in expectation.
    """
    bucket, sign = _hash(grads.shape[1], out_dim, seed, offset, grads.device)
    out = grads.new_zeros(grads.shape[0], out_dim)
    return out.index_add_(1, bucket, grads * sign.to(grads.dtype))


@functools.lru_cache(maxsize=4096)
def _hash(dim: int, out_dim: int, seed: int, offset: int,
          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket and sign of each of ``dim`` coordinates, drawn once on the CPU and kept on ``device``:
    a backward hook then needs no host draw and no copy to the device."""
    gen = torch.Generator().manual_seed(seed * 7_919 + offset)
    bucket = torch.randint(out_dim, (dim,), generator=gen)
    sign = torch.randint(2, (dim,), generator=gen) * 2 - 1
    return bucket.to(device), sign.to(device, torch.float32)


def per_sample_outer(dy: torch.Tensor, x: torch.Tensor, max_bytes: int = CAST_CHUNK_BYTES) -> torch.Tensor:
    """``[N, out, in]``: per sample, ``sum_t dy[n,t] x[n,t]^T`` in fp32.

    Inputs in another dtype are cast to fp32 a slice of samples at a time, so that the fp32
    copies stay under about ``max_bytes``; each sample's sum is the same whatever the slicing.
    """
    if dy.dtype == x.dtype == torch.float32:
        return torch.einsum("nto,nti->noi", dy, x)
    per_sample = 4 * (dy[0].numel() + x[0].numel()) if len(x) else 1
    step = max(1, max_bytes // per_sample)
    if step >= len(x):
        return torch.einsum("nto,nti->noi", dy.float(), x.float())
    return torch.cat([torch.einsum("nto,nti->noi", dy[i:i + step].float(), x[i:i + step].float())
                      for i in range(0, len(x), step)])


def lora_owners(layers: Iterable[nn.Module]) -> dict[nn.Module, tuple[nn.Module, str]]:
    """Each LoRA A matrix inside ``layers`` -> (the peft LoRA layer holding it, its adapter name)."""
    owners = {}
    for layer in layers:
        for module in layer.modules():
            lora_a = getattr(module, "lora_A", None)
            if isinstance(lora_a, nn.ModuleDict):
                owners.update({a: (module, name) for name, a in lora_a.items()})
    return owners


def _passes_input(owner: nn.Module, adapter: str) -> bool:
    """Whether peft feeds ``adapter``'s A matrix the layer's input as it is, but for its dtype:
    no dropout in effect and no LoRA variant (DoRA, ...) in between."""
    dropout = owner.lora_dropout[adapter]
    inactive = isinstance(dropout, nn.Identity) or (
        isinstance(dropout, nn.Dropout) and (not dropout.training or dropout.p == 0))
    return inactive and adapter not in getattr(owner, "lora_variant", {})


@contextmanager
def tap_inputs(layers: Iterable[nn.Module], targets: list[SketchTarget], on_input: OnInput) -> Iterator[None]:
    """While open, every forward of a target calls ``on_input(index, x, output)``.

    ``x`` is the target's input; for a LoRA A matrix whose input is its layer's input cast to
    the adapter's dtype, ``x`` is the layer's input itself, in the model's dtype: targets fed
    one activation (q, k, v) get the same tensor object, told apart by identity, no host sync.
    """
    index = {t.module: i for i, t in enumerate(targets)}
    owners = {a: o for a, o in lora_owners(layers).items() if a in index}
    entered: dict[nn.Module, torch.Tensor] = {}  # LoRA layer -> its input, during its forward

    def enter(layer: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("x")
        if isinstance(x, torch.Tensor):
            entered[layer] = x

    def leave(layer: nn.Module, args: tuple, output: torch.Tensor) -> None:
        entered.pop(layer, None)

    def tap(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0]
        if module in owners:
            owner, adapter = owners[module]
            shared = entered.get(owner)
            if (shared is not None and x is not shared and shared.shape == x.shape
                    and shared.dtype != x.dtype == module.weight.dtype and _passes_input(owner, adapter)):
                x = shared
        on_input(index[module], x, output)

    handles = []
    try:
        for owner in {o for o, _ in owners.values()}:
            handles.append(owner.register_forward_pre_hook(enter, with_kwargs=True))
            handles.append(owner.register_forward_hook(leave))
        handles += [t.module.register_forward_hook(tap) for t in targets]
        yield
    finally:
        for handle in handles:
            handle.remove()
        entered.clear()


def per_sample_grads(
    split: LayerSplit, cache: PrefixCache, targets: list[SketchTarget], project: Project | None = None,
    *, kept: dict[int, torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-sample gradients ``[N, numel]`` of each target's weight (or ``project(i, grad)``),
    and the per-sample losses.

    ``kept``, when given, receives the input held for each target until the backward (target
    index -> tensor; one tensor for the targets sharing an input): what the hooks cost in memory.
    """
    grads: list[torch.Tensor | None] = [None] * len(targets)
    held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(input) -> (input, detached)

    def keep(i: int, x: torch.Tensor, output: torch.Tensor) -> None:
        # The input itself is held too, so that its id is not reused while it is a key.
        x = held.setdefault(id(x), (x, x.detach()))[1]
        if kept is not None:
            kept[i] = x

        def on_grad(dy: torch.Tensor) -> None:
            g = per_sample_outer(dy, x).flatten(1)
            grads[i] = g if project is None else project(i, g)

        output.register_hook(on_grad)

    try:
        with tap_inputs(split.top, targets, keep), torch.enable_grad():
            # A leaf that requires grad makes the graph exist even when every weight is frozen.
            hidden = cache.hidden.detach().requires_grad_(True)
            h = split.top_hidden(cache, hidden)
            losses, dh = split.losses_and_head_grad(h, cache)
            torch.autograd.backward(h, grad_tensors=dh, inputs=[hidden])
    finally:
        held.clear()
    missing = [targets[i].name for i, g in enumerate(grads) if g is None]
    if missing:
        raise RuntimeError(f"no gradient reached {missing[:3]}: are they on the loss's path?")
    return grads, losses.detach()


def exact_sketch(
    split: LayerSplit, caches: Iterable[PrefixCache], targets: list[SketchTarget], *, dim: int, seed: int
) -> DenseSketch:
    """All targets' per-sample gradients side by side, one chunk of samples per cache.

    When they have more than ``dim`` coordinates in all, each target's gradient is
    count-sketched as soon as it is formed and the projections are summed: ``[N, dim]``.
    """
    total = sum(t.numel for t in targets)
    project = None if total <= dim else (lambda i, g: count_sketch(g, dim, seed, i))
    rows = []
    for cache in caches:
        grads, _ = per_sample_grads(split, cache, targets, project)
        rows.append(torch.cat(grads, dim=1) if project is None else torch.stack(grads).sum(0))
    return DenseSketch(torch.cat(rows))
