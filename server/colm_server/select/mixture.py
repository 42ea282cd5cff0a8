"""Target mixtures: the share of the loss weight each source should carry, and the factor that
moves a coreset's weights from the stream's mixture to it (DESIGN.md section 2, "Mixtures").

A strategy's weights make the coreset stand for its large batch, so over steps each source
carries its share of the stream. Multiplying a sample's weight by its source's
``target share / stream share`` makes each source carry its target share instead.

Mixtures:

- ``"stream"``: each source by its share of the stream (factors 1: weights unchanged);
- ``"balanced"``: every source seen the same share;
- ``"temperature"``: shares proportional to ``n_s ** (1 / T)`` (T = 1: the stream, T -> inf: balanced);
- ``{source: share}``: explicit, positive numbers normalised to sum 1 over the named sources. A
  source the map does not name keeps its stream share; the named sources share the rest of the
  mass (their own stream share together) in the given proportions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

MIXTURES = ("stream", "balanced", "temperature")
Mixture = str | Mapping[str, float]


def check_mixture(mixture: object, temperature: object) -> str | dict[str, float]:
    """``mixture`` as a name or a plain ``{source: float}`` dict; ValueError naming the field at fault."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not 0 < temperature < math.inf:
        raise ValueError(f"mixture_temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(mixture, str):
        if mixture not in MIXTURES:
            raise ValueError(f"mixture must be one of {MIXTURES} or a mapping {{source: share}}, "
                             f"got {mixture!r}")
        return mixture
    if not isinstance(mixture, Mapping):
        raise ValueError(f"mixture must be one of {MIXTURES} or a mapping {{source: share}}, "
                         f"got {type(mixture).__name__}")
    if not mixture:
        raise ValueError("mixture: an explicit mixture must name at least one source")
    shares: dict[str, float] = {}
    for source, share in mixture.items():
        if not isinstance(source, str) or not source:
            raise ValueError(f"mixture: source names must be non-empty text, got {source!r}"
                             " (in YAML, quote names such as 'no', 'on' or '1')")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < math.inf:
            raise ValueError(f"mixture: the share of {source!r} must be a finite number > 0, got {share!r}")
        shares[source] = float(share)
    if not math.isfinite(sum(shares.values())):
        raise ValueError("mixture: the shares must have a finite sum")
    return shares


def target_shares(counts: Mapping[str, int], mixture: Mixture,
                  temperature: float = 2.0) -> dict[str, float]:
    """Each source's target share of the loss weight, from the sources' counts; they sum to 1.

    Sources are those with a positive count, plus the named ones of an explicit mixture (an unseen
    named source keeps its share of the named mass). Empty before any count for a named mixture.
    """
    present = {s: c for s, c in sorted(counts.items()) if c > 0}
    total = sum(present.values())
    if isinstance(mixture, Mapping):
        return _explicit(present, total, mixture)
    if not present:
        return {}
    if mixture == "stream":
        return {s: c / total for s, c in present.items()}
    if mixture == "balanced":
        return {s: 1 / len(present) for s in present}
    if mixture == "temperature":  # in logs: n ** (1/T) overflows a float for small T
        logs = {s: math.log(c) / temperature for s, c in present.items()}
        top = max(logs.values())
        scaled = {s: math.exp(v - top) for s, v in logs.items()}
        norm = sum(scaled.values())
        return {s: v / norm for s, v in scaled.items()}
    raise ValueError(f"mixture must be one of {MIXTURES} or a mapping {{source: share}}, got {mixture!r}")


def _explicit(present: Mapping[str, int], total: int, mixture: Mapping[str, float]) -> dict[str, float]:
    """Unnamed sources keep their stream share; the named ones split the rest as the map says."""
    named = sum(mixture.values())
    if total == 0:  # nothing counted yet: the map alone
        return {s: v / named for s, v in sorted(mixture.items())}
    rest = sum(present.get(s, 0) for s in mixture) / total  # the named sources' stream share
    shares = {s: c / total for s, c in present.items() if s not in mixture}
    shares.update({s: rest * v / named for s, v in mixture.items()})
    return dict(sorted(shares.items()))


def weight_factors(counts: Mapping[str, int], mixture: Mixture,
                   temperature: float = 2.0) -> dict[str, float]:
    """``target share / stream share`` of each source with a positive count (1 for ``"stream"``)."""
    present = {s: c for s, c in sorted(counts.items()) if c > 0}
    if mixture == "stream":
        return dict.fromkeys(present, 1.0)
    total = sum(present.values())
    targets = target_shares(present, mixture, temperature)
    return {s: targets[s] * total / c for s, c in present.items()}


def realised_shares(weights: Mapping[str, float]) -> dict[str, float]:
    """Each source's share of the summed ``weights`` (e.g. the loss weight selected so far)."""
    total = sum(weights.values())
    return {s: w / total for s, w in sorted(weights.items())} if total > 0 else {}
