"""`Selector`: one large batch in, a weighted coreset out; state that survives restarts."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from colm_server.select.batch import TokenBatch
from colm_server.select.budget import SourceTracker, allocate_budget
from colm_server.select.config import MODEL_FREE, SelectorConfig
from colm_server.select.mixture import target_shares, weight_factors
from colm_server.select.normalize import AdamNormalizer
from colm_server.select.own_adapter import OwnAdapter
from colm_server.select.replicas import ReplicaScorer
from colm_server.select.scoring import Scorer
from colm_server.select.strategies import STRATEGIES, SelectionContext


@dataclass
class Selection:
    """The chosen rows of a batch, their weights (> 0) and what happened."""

    indices: torch.Tensor  # [b] long, positions in the batch
    weights: torch.Tensor  # [b] float
    stats: dict


def group_rows(sources: Sequence[str]) -> dict[str, torch.Tensor]:
    """Source name -> its row indices, sources in sorted order for determinism."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(sources):
        groups.setdefault(s, []).append(i)
    return {s: torch.tensor(groups[s], dtype=torch.long) for s in sorted(groups)}


class Selector:
    """Applies a strategy to large batches; `state_dict` holds what the next step depends on."""

    def __init__(self, model: nn.Module | None, config: SelectorConfig, *, replicas: bool = False):
        """``replicas``: split the scoring of every batch over torch.distributed's processes,
        which must all call `select` with the same batches (see `select.replicas`)."""
        if model is None and config.strategy not in MODEL_FREE:
            raise ValueError(f"strategy {config.strategy!r} needs a model")
        self.config = config
        self.scoring_config = config.scoring()  # colm-paper's fixed settings, resolved once
        self.scorer: Scorer | ReplicaScorer | None = None
        self.own_adapter: OwnAdapter | None = None  # scorer_adapter 'own': trained after each selection
        if model is not None:
            self.scorer = Scorer(model, self.scoring_config)
            if replicas:
                if config.scorer_adapter == "own":
                    raise ValueError("scorer_adapter 'own' is not supported with selector replicas: "
                                     "each replica would train its own copy of the scorer's adapter")
                self.scorer = ReplicaScorer(self.scorer)
            if config.scorer_adapter == "own":
                sc = self.scoring_config
                self.own_adapter = OwnAdapter(model, lr=sc.scorer_lr, scorer_layers=sc.scorer_layers,
                                              chunk=sc.sketch_chunk, chunk_tokens=sc.chunk_tokens)
        self.tracker = SourceTracker()
        self.normalizer = AdamNormalizer(beta1=config.beta1, beta2=config.beta2)

    def prime_sources(self, counts: Mapping[str, int]) -> None:
        """Start the running source shares from known dataset sizes, so small sources are
        recognised from the first step instead of after the stream has shown them.

        ``counts`` are the data's sources: an explicit mixture naming another is refused here."""
        self.check_mixture_sources(counts)
        self.tracker.observe_counts(counts)

    def check_mixture_sources(self, counts: Mapping[str, int]) -> None:
        """ValueError naming the sources an explicit ``mixture`` names that ``counts`` (the data's
        sources) lacks: their share could never be selected."""
        mixture = self.config.mixture
        if isinstance(mixture, str):
            return
        unknown = sorted(s for s in mixture if counts.get(s, 0) <= 0)
        if unknown:
            known = sorted(s for s, c in counts.items() if c > 0)
            raise ValueError(f"selector.mixture names source(s) {', '.join(map(repr, unknown))} that the "
                             f"data does not have; its sources: {', '.join(known) or 'none'}")

    def target_shares(self) -> dict[str, float]:
        """Each source's target share of the loss weight, from the stream's running counts."""
        return target_shares(self.tracker.counts, self.config.mixture, self.config.mixture_temperature)

    def select(self, batch: TokenBatch, step: int) -> Selection:
        """Choose ``min(b, len(batch))`` samples of `batch` (all of them for ``full``); their weights
        are the strategy's times each source's ``target share / stream share`` (``config.mixture``)."""
        cfg = self.config
        start = time.perf_counter()
        self.tracker.observe(batch.sources)
        groups = group_rows(batch.sources)
        counts = {s: len(rows) for s, rows in groups.items()}
        small = (self.tracker.small_sources(groups, cfg.keep_sources, cfg.small_source_share)
                 if cfg.keep_small else set())
        budget = min(cfg.batch_size, len(batch))
        ctx = SelectionContext(
            config=self.scoring_config,
            budget=budget,
            groups=groups,
            allocation=allocate_budget(counts, budget, small),
            small=small,
            generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + step),
            sketch=lambda: self._scorer().sketch(batch, step),
            losses=lambda: self._scorer().losses(batch),
            normalizer=self.normalizer,
        )
        indices, weights = STRATEGIES[cfg.strategy](ctx)
        if self.scoring_config.weighting == "uniform":  # colm-paper's too
            weights = torch.ones_like(weights)
        factors = weight_factors(self.tracker.counts, cfg.mixture, cfg.mixture_temperature)
        if cfg.mixture != "stream":  # to the target mixture: target share / stream share
            per_row = [factors[batch.sources[i]] for i in indices.tolist()]
            weights = weights.double() * torch.tensor(per_row, dtype=torch.float64)
        scorer_loss = None
        if self.own_adapter is not None:  # the scorer learns from what the trainer will train on
            t0 = time.perf_counter()
            scorer_loss = self.own_adapter.step(batch.subset(indices.tolist()), weights)
            ctx.timings["scorer_train"] = time.perf_counter() - t0
        ctx.timings["total"] = time.perf_counter() - start
        stats = self._stats(batch, ctx, indices)
        if scorer_loss is not None:
            stats["scorer_loss"] = scorer_loss  # the coreset's weighted loss on the scorer, before its step
        targets = self.target_shares()
        for s, row in stats["sources"].items():
            row.update(target_share=targets[s], stream_share=self.tracker.share(s), factor=factors[s])
        return Selection(indices, weights.float(), stats)

    def _scorer(self) -> Scorer | ReplicaScorer:
        if self.scorer is None:
            raise ValueError(f"strategy {self.config.strategy!r} needs a model")
        return self.scorer

    @staticmethod
    def _stats(batch: TokenBatch, ctx: SelectionContext, indices: torch.Tensor) -> dict:
        chosen = [batch.sources[i] for i in indices.tolist()]
        return {
            "sources": {
                s: {
                    "batch": len(rows),
                    "selected": chosen.count(s),
                    "small": s in ctx.small,
                    "kept_small": s in ctx.small and chosen.count(s) == len(rows),
                }
                for s, rows in ctx.groups.items()
            },
            "timings": dict(ctx.timings),
        }

    def state_dict(self) -> dict:
        state = {
            "config": self.config.to_dict(),
            "tracker": self.tracker.state_dict(),
            "normalizer": self.normalizer.state_dict(),
        }
        if self.own_adapter is not None:
            state["own_adapter"] = self.own_adapter.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self.normalizer.load_state_dict(state["normalizer"])
        if self.own_adapter is not None:
            if "own_adapter" not in state:
                raise ValueError("the saved selector state has no scorer adapter: it was saved with "
                                 "scorer_adapter 'pushed'; resume with the same selector settings")
            self.own_adapter.load_state_dict(state["own_adapter"])


def build_selector(model: nn.Module | None, config: SelectorConfig, *, replicas: bool = False) -> Selector:
    """A selector for `model` (None is enough for random, stratified and full); ``replicas``
    splits its scoring over the processes of torch.distributed."""
    return Selector(model, config, replicas=replicas)
