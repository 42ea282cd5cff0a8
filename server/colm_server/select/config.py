"""`SelectorConfig`: every knob of the selection, typed, documented and validated once."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

from colm_server.select.facility import SIMILARITIES
from colm_server.select.mixture import check_mixture
from colm_server.typed import check_types

# Every strategy's name; select.strategies maps each to its function and checks it has them all.
STRATEGIES = ("colm", "colm-paper", "colm-fast", "random", "stratified", "loss", "full")
MODEL_FREE = ("random", "stratified", "full")  # strategies that never run a model
SKETCHES = ("exact", "zo", "activations")
SKETCH_PARAMS = ("probe", "adapter")
WEIGHTINGS = ("cluster", "uniform")
SCORER_ADAPTERS = ("pushed", "own")

# CoLM as published: ZO with one probe on the last layer's v_proj LoRA B, Adam-like
# per-sample normalisation, top-|mean| sparsification, l1 facility location; and the paper's code
# trains on the coreset without its weights (small sources kept whole are thus over-sampled).
PAPER = dict(sketch="zo", zo_probes=1, sketch_layers=1, sketch_params="probe",
             probe_module="v_proj", normalize=True, sparsify=True, similarity="l1", weighting="uniform")
# The cheapest measured selector: the exact sketch of an early-exit proxy, the first 2 decoder layers
# followed by the final norm and lm_head, about 0.3x a plain forward on SmolLM2. It selects worse
# than stratified on a zero-initialised adapter (bench/results/gradmatch-proxy.md, README).
FAST = dict(sketch="exact", scorer_layers=2, sketch_layers=0, sketch_params="adapter")
PRESETS = {"colm-paper": PAPER, "colm-fast": FAST}


def _help(text: str, **kw) -> dict:
    return {"metadata": {"help": text}, **kw}


@dataclass(kw_only=True, slots=True)
class SelectorConfig:
    """How one large batch of L samples becomes a weighted coreset of b."""

    strategy: str = field(
        default="colm",
        **_help(f"selection strategy, one of {STRATEGIES}; 'colm-paper' is CoLM as published "
                "(zo K=1 on the last v_proj, normalize, sparsify, l1, uniform weights) and 'colm-fast' "
                "the cheapest measured selector (exact sketch of the first 2 layers with an early exit), "
                "whatever the sketch, scorer and weighting keys say"),
    )
    batch_size: int = field(default=32, **_help("b: samples selected per large batch"))
    large_batch_size: int = field(default=64, **_help("L: samples in each large batch"))
    sketch: str = field(
        default="exact",
        **_help("per-sample gradient sketch: 'exact' (one chunked backward, projected to "
                "sketch_dim), 'zo' (zeroth-order probes: 2*zo_probes forwards, no backward) or "
                "'activations' (mean inputs of the LoRA matrices: one forward, no backward)"),
    )
    sketch_params: str = field(
        default="adapter",
        **_help(
            "'probe': the probe module's LoRA B (its weight without LoRA); "
            "'adapter': every LoRA matrix of the sketched layers"
        ),
    )
    sketch_layers: int = field(
        default=0, **_help("number of top decoder layers (of the scorer) the sketch covers; 0: all of them")
    )
    scorer_layers: int = field(
        default=0,
        **_help("score with an early-exit proxy: only the first k decoder layers, then the final norm "
                "and lm_head (about k / layers of the cost); 0: the whole model"),
    )
    scorer_adapter: str = field(
        default="pushed",
        **_help("the scorer's LoRA: 'pushed' (the trainer's, as it pushes it) or 'own' (the scorer's "
                "own, trained by the selector with one weighted AdamW step on each coreset it selects, "
                "and journaled with it)"),
    )
    scorer_model: str = field(
        default="",
        **_help("score with another model that shares the trained model's tokenizer, as model.source "
                "names it (needs scorer_adapter 'own'; refused at start when the vocabularies differ); "
                "'': the trained model"),
    )
    scorer_lr: float = field(
        default=1e-4, **_help("learning rate of the scorer's own LoRA (scorer_adapter 'own')")
    )
    probe_module: str = field(default="v_proj", **_help("module whose parameter is probed"))
    sketch_dim: int = field(
        default=1024,
        **_help("exact sketch: per-sample gradients with more coordinates are count-sketched "
                "to this many (distances kept in expectation)"),
    )
    sketch_chunk: int = field(
        default=8, **_help("samples per forward/backward chunk of the exact sketch (bounds memory)")
    )
    zo_probes: int = field(default=1, **_help("K: random probe directions per step (zo sketch)"))
    zo_eps: float = field(default=1e-3, **_help("finite-difference step of the zo probes"))
    normalize: bool = field(
        default=False,
        **_help("Adam-like per-sample normalisation of the sketches (the paper's; distorts distances)"),
    )
    sparsify: bool = field(
        default=False,
        **_help("keep only the zo_dim coordinates of largest |mean| per source (the paper's)"),
    )
    zo_dim: int = field(default=2560, **_help("coordinates kept per source when sparsify is on"))
    beta1: float = field(default=0.9, **_help("first-moment decay of the normalisation"))
    beta2: float = field(default=0.999, **_help("second-moment decay of the normalisation"))
    similarity: str = field(
        default="euclidean", **_help(f"facility-location similarity, one of {SIMILARITIES}")
    )
    weighting: str = field(
        default="cluster",
        **_help("'cluster': weights from the strategy (cluster or stratum sizes); 'uniform': all 1 "
                "(before the mixture's factors)"),
    )
    mixture: str | dict[str, float] = field(
        default="stream",
        **_help("the mixture training aims at: 'stream' (each source by its share of the stream; "
                "weights unchanged), 'balanced' (every source alike), 'temperature' (shares proportional "
                "to n_s^(1/T)) or a mapping {source: share} (normalised; unnamed sources keep their "
                "stream share, the named ones split the rest). Each weight is multiplied by its "
                "source's target share / stream share; strategy colm-paper (unweighted) needs 'stream'"),
    )
    mixture_temperature: float = field(
        default=2.0,
        **_help("T of mixture 'temperature', > 0: 1 is the stream, 2 makes shares proportional "
                "to sqrt(n_s), a larger T nears balanced"),
    )
    small_source_share: float = field(
        default=0.03, **_help("a source whose running share of the stream is below this is small")
    )
    keep_sources: tuple[str, ...] = field(
        default=(), **_help("sources always treated as small (all their samples kept)")
    )
    keep_small: bool = field(default=True, **_help("keep every sample of small sources"))
    seed: int = field(default=0, **_help("seed of probes, projections and random choices"))
    chunk_tokens: int = field(default=1024, **_help("response positions per lm_head chunk"))
    block: int = field(default=65536, **_help("sketch coordinates processed per block"))

    def __post_init__(self) -> None:
        check_types(self, skip=("mixture",))  # check_mixture checks the mixture, below
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("sketch", self.sketch, SKETCHES)
        _choice("sketch_params", self.sketch_params, SKETCH_PARAMS)
        _choice("similarity", self.similarity, SIMILARITIES)
        _choice("weighting", self.weighting, WEIGHTINGS)
        _choice("scorer_adapter", self.scorer_adapter, SCORER_ADAPTERS)
        for name in ("batch_size", "large_batch_size", "sketch_dim", "sketch_chunk",
                     "zo_probes", "zo_dim", "chunk_tokens", "block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("sketch_layers", "scorer_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: all layers), got {getattr(self, name)}")
        if self.scorer_layers and self.sketch_layers > self.scorer_layers:
            raise ValueError(f"sketch_layers ({self.sketch_layers}) must not exceed scorer_layers "
                             f"({self.scorer_layers}): the sketch covers layers of the scorer")
        if self.batch_size > self.large_batch_size:
            raise ValueError(
                f"batch_size (b={self.batch_size}) must not exceed "
                f"large_batch_size (L={self.large_batch_size})"
            )
        if self.scorer_model and self.scorer_adapter != "own":
            raise ValueError(f"scorer_model ({self.scorer_model!r}) needs scorer_adapter 'own', got "
                             f"{self.scorer_adapter!r}: another model cannot take the trainer's adapter")
        if self.scorer_adapter == "own" and self.strategy in MODEL_FREE:
            raise ValueError(f"scorer_adapter 'own' trains the scorer of a strategy that scores; "
                             f"strategy {self.strategy!r} scores nothing")
        if not (self.scorer_lr > 0 and math.isfinite(self.scorer_lr)):
            raise ValueError(f"scorer_lr must be a finite number > 0, got {self.scorer_lr}")
        if not self.zo_eps > 0:
            raise ValueError(f"zo_eps must be > 0, got {self.zo_eps}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.small_source_share < 1.0:
            raise ValueError(f"small_source_share must be in [0, 1), got {self.small_source_share}")
        self.mixture = check_mixture(self.mixture, self.mixture_temperature)
        if self.strategy == "colm-paper" and self.mixture != "stream":
            raise ValueError(
                f"mixture {self.mixture!r} needs weights, and strategy 'colm-paper' trains without them "
                "(as the paper did): with strategy colm-paper, mixture must be 'stream'"
            )

    def scoring(self) -> SelectorConfig:
        """The settings the model is scored with: a preset strategy fixes its own, others are as given."""
        preset = PRESETS.get(self.strategy)
        return self if preset is None else replace(self, **preset)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text, for CLI flags and the README's table."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
