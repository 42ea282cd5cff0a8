"""Selection strategies behind one interface: ``strategy(ctx) -> (rows, weights)``.

Each strategy is a plain function of a `SelectionContext`; `STRATEGIES` maps names to
them. Adding one is a function, a registry line and its name in ``select.config.STRATEGIES``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from colm_server.select.config import STRATEGIES as NAMES
from colm_server.select.config import SelectorConfig
from colm_server.select.facility import facility_location, pairwise_similarity
from colm_server.select.normalize import AdamNormalizer
from colm_server.select.sketch import Sketch
from colm_server.select.sparsify import gather_features, top_coordinates

Picked = tuple[torch.Tensor, torch.Tensor]  # rows [k] (long), weights [k] (float)


@dataclass
class SelectionContext:
    """Everything a strategy may use for one large batch."""

    config: SelectorConfig  # as scored: colm-paper's settings already applied
    budget: int  # samples to select
    groups: dict[str, torch.Tensor]  # source -> its rows in the batch
    allocation: dict[str, int]  # source -> samples to select from it
    small: set[str]  # sources kept whole when they fit
    generator: torch.Generator
    sketch: Callable[[], Sketch]  # per-sample gradient sketch (runs the model)
    losses: Callable[[], torch.Tensor]  # per-sample losses (runs the model)
    normalizer: AdamNormalizer
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(len(r) for r in self.groups.values())


def _cat(parts: list[Picked]) -> Picked:
    if not parts:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _sample(rows: torch.Tensor, k: int, gen: torch.Generator) -> Picked:
    """k rows uniformly without replacement, each weighted by ``len(rows) / k``."""
    chosen = rows[torch.randperm(len(rows), generator=gen)[:k]]
    return chosen, torch.full((k,), len(rows) / k)


def full(ctx: SelectionContext) -> Picked:
    """Every sample, weight 1: plain large-batch training."""
    rows = torch.cat(list(ctx.groups.values())).sort().values
    return rows, torch.ones(len(rows))


def random(ctx: SelectionContext) -> Picked:
    """A uniform random subset, weight 1."""
    rows = torch.randperm(ctx.num_samples, generator=ctx.generator)[: ctx.budget]
    return rows, torch.ones(len(rows))


def stratified(ctx: SelectionContext) -> Picked:
    """Per-source random subsets sized by the budget allocation, weighted by stratum size."""
    return _cat([_sample(rows, ctx.allocation[s], ctx.generator)
                 for s, rows in ctx.groups.items() if ctx.allocation[s] > 0])


def loss(ctx: SelectionContext) -> Picked:
    """The samples with the highest loss, weight 1."""
    rows = torch.topk(ctx.losses().cpu(), ctx.budget).indices
    return rows, torch.ones(len(rows))


def colm(ctx: SelectionContext) -> Picked:
    """CoLM: small sources kept, facility location per large source on gradient sketches.

    The features are the sketch as it is (``sketch.features()``), unless the paper's chain is
    on: Adam-like per-sample normalisation and/or top-|mean| sparsification per source.
    """
    cfg = ctx.config
    picked: list[Picked] = []
    clustered: dict[str, torch.Tensor] = {}
    for s, rows in ctx.groups.items():
        k = ctx.allocation[s]
        if k == 0:
            continue
        if s in ctx.small or k == len(rows):
            picked.append(_sample(rows, k, ctx.generator))
        else:
            clustered[s] = rows
    if not clustered:
        return _cat(picked)
    t0 = _clock(None)
    sketch = ctx.sketch()
    t1 = _clock(sketch.device)
    normalizer = ctx.normalizer if cfg.normalize else None
    if normalizer is None and not cfg.sparsify:
        feats = sketch.features()
        per_source = [feats[rows.to(feats.device)] for rows in clustered.values()]
    else:
        per_source = _paper_features(sketch, normalizer, list(clustered.values()), cfg)
    t2 = _clock(sketch.device)
    for (s, rows), x in zip(clustered.items(), per_source):
        order, counts = facility_location(pairwise_similarity(x, cfg.similarity), ctx.allocation[s])
        picked.append((rows[order.cpu()], counts.cpu().float()))
    t3 = _clock(sketch.device)
    rows, weights = _cat(picked)
    if normalizer is not None:
        normalizer.update(sketch, rows.to(sketch.device), cfg.block)
    t4 = _clock(sketch.device)  # the update's kernels belong to this selection's time, not the next
    ctx.timings.update(sketch=t1 - t0, features=t2 - t1, facility=t3 - t2, update=t4 - t3)
    return rows, weights


def _clock(device: torch.device | None) -> float:
    """``time.perf_counter()`` once the work queued on ``device`` has run (CUDA is asynchronous:
    unsynchronised, one phase's kernels would be timed in the next). ``None``: the current CUDA
    device when CUDA is in use, as before the sketch its device is not known here."""
    if device is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    elif device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _paper_features(sketch: Sketch, normalizer: AdamNormalizer | None,
                    groups: list[torch.Tensor], cfg: SelectorConfig) -> list[torch.Tensor]:
    """Per group: (normalised) sketch coordinates, only the ``zo_dim`` top-|mean| ones if sparsifying."""
    if cfg.sparsify:
        coords = top_coordinates(sketch, normalizer, groups, cfg.zo_dim, cfg.block)
    else:
        coords = [torch.arange(sketch.dim, device=sketch.device)] * len(groups)
    return [gather_features(sketch, normalizer, rows.to(sketch.device), cols)
            for rows, cols in zip(groups, coords)]


STRATEGIES: dict[str, Callable[[SelectionContext], Picked]] = {
    "colm": colm,
    "colm-paper": colm,  # the same chain; SelectorConfig.scoring() fixes the paper's settings
    "colm-fast": colm,  # ... and the early-exit proxy's
    "random": random,
    "stratified": stratified,
    "loss": loss,
    "full": full,
}
if set(STRATEGIES) != set(NAMES):  # the names SelectorConfig accepts are the strategies there are
    raise RuntimeError(f"strategies {sorted(STRATEGIES)} differ from SelectorConfig's {sorted(NAMES)}")
