"""Quote what a client sent in a refusal without repeating all of it."""

from __future__ import annotations

PREFIX = 64  # characters of a client's value a message repeats


def clip(text: str, limit: int = PREFIX) -> str:
    """``text``, or its first ``limit`` characters followed by ``…`` and its length."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


def quote(value: str, limit: int = PREFIX) -> str:
    """``repr(value)``, or of its first ``limit`` characters followed by ``…`` and its length.

    A refusal travels back in the call's trailing metadata: repeating a 1 MiB job id there would
    turn the refusal into ``RESOURCE_EXHAUSTED``.
    """
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value)} characters)"
