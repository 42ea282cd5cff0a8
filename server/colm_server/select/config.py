"""`SelectorConfig`: every knob of the selection, typed, documented and validated once."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from colm_server.select.facility import SIMILARITIES

STRATEGIES = ("colm", "random", "stratified", "loss", "full")
SKETCHES = ("zo", "exact")
SKETCH_PARAMS = ("probe", "adapter")
WEIGHTINGS = ("cluster", "uniform")


def _help(text: str, **kw) -> dict:
    return {"metadata": {"help": text}, **kw}


@dataclass(kw_only=True, slots=True)
class SelectorConfig:
    """How one large batch of L samples becomes a weighted coreset of b."""

    strategy: str = field(default="colm", **_help(f"selection strategy, one of {STRATEGIES}"))
    batch_size: int = field(default=32, **_help("b: samples selected per large batch"))
    large_batch_size: int = field(default=64, **_help("L: samples in each large batch"))
    sketch: str = field(
        default="exact",
        **_help("per-sample gradient sketch: 'zo' (zeroth-order probes) or 'exact' (one backward)"),
    )
    sketch_params: str = field(
        default="adapter",
        **_help(
            "'probe': the probe module's LoRA B (its weight without LoRA); "
            "'adapter': every LoRA matrix of the sketched layers"
        ),
    )
    sketch_layers: int = field(default=1, **_help("number of top decoder layers the sketch covers"))
    probe_module: str = field(default="v_proj", **_help("module whose parameter is probed"))
    sketch_max_dim: int = field(
        default=1 << 20,
        **_help("above this many coordinates the sketch is count-sketch projected to this size"),
    )
    zo_probes: int = field(default=1, **_help("K: random probe directions per step (zo sketch)"))
    zo_eps: float = field(default=1e-3, **_help("finite-difference step of the zo probes"))
    zo_dim: int = field(default=2560, **_help("coordinates kept per source by sparsification"))
    normalize: bool = field(default=True, **_help("Adam-like normalisation of the sketches"))
    beta1: float = field(default=0.9, **_help("first-moment decay of the normalisation"))
    beta2: float = field(default=0.999, **_help("second-moment decay of the normalisation"))
    similarity: str = field(default="l1", **_help(f"facility-location similarity, one of {SIMILARITIES}"))
    weighting: str = field(
        default="cluster",
        **_help("'cluster': weights from the strategy (cluster or stratum sizes); 'uniform': all 1"),
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
        self.keep_sources = tuple(self.keep_sources)
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("sketch", self.sketch, SKETCHES)
        _choice("sketch_params", self.sketch_params, SKETCH_PARAMS)
        _choice("similarity", self.similarity, SIMILARITIES)
        _choice("weighting", self.weighting, WEIGHTINGS)
        for name in ("batch_size", "large_batch_size", "sketch_layers", "sketch_max_dim",
                     "zo_probes", "zo_dim", "chunk_tokens", "block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size > self.large_batch_size:
            raise ValueError(
                f"batch_size (b={self.batch_size}) must not exceed "
                f"large_batch_size (L={self.large_batch_size})"
            )
        if not self.zo_eps > 0:
            raise ValueError(f"zo_eps must be > 0, got {self.zo_eps}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.small_source_share < 1.0:
            raise ValueError(f"small_source_share must be in [0, 1), got {self.small_source_share}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text, for CLI flags and the README's table."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
