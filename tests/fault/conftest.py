"""Hypothesis profiles of the fault tests: a short "ci" run by default, a "long" one on request.

``COLM_FAULT_LONG=1 pytest tests/fault`` selects "long" (at least 1000 examples per fuzz test);
otherwise "ci" keeps the folder's fuzzing well under a minute on two cores. "ci" is derandomized
and keeps no example database, so a CI failure reproduces as is; "long" explores new examples on
every run and remembers failing ones in ``.hypothesis/``.

The profile is applied through ``fuzz()`` on each test rather than made the global default, so
the rest of the suite keeps its own example counts.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

LONG_EXAMPLES = 1000

settings.register_profile(
    "ci", max_examples=20, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long", max_examples=LONG_EXAMPLES, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
PROFILE = "long" if os.environ.get("COLM_FAULT_LONG") == "1" else "ci"
settings.get_profile(PROFILE)  # fail at collection on a misspelt profile


def fuzz(ci_examples: int) -> settings:
    """Settings for one fuzz test: ``ci_examples`` examples under "ci", at least 1000 under "long"."""
    profile = settings.get_profile(PROFILE)
    examples = ci_examples if PROFILE == "ci" else max(ci_examples, profile.max_examples)
    return settings(profile, max_examples=examples)
