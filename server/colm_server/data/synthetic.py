"""A built-in instruction mixture: procedurally generated tasks of very different sizes.

Needs no download, so demos and tests have a real imbalanced mixture of sources to work
on: the largest source is 48x the smallest, as in math instruction mixtures.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

Task = Callable[[random.Random], tuple[str, str]]


def _digits(rng: random.Random, lo: int = 3, hi: int = 8) -> str:
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(lo, hi)))


def _word(rng: random.Random, lo: int = 3, hi: int = 7) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(lo, hi)))


def addition(rng):
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return f"add {a} and {b}", str(a + b)


def subtraction(rng):
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return f"subtract {b} from {a}", str(a - b)


def copying(rng):
    w = _word(rng)
    return f"copy {w}", w


def reversal(rng):
    w = _word(rng)
    return f"reverse {w}", w[::-1]


def sorting(rng):
    d = _digits(rng)
    return f"sort {d}", "".join(sorted(d))


def counting(rng):
    d = _digits(rng, 4, 10)
    c = rng.choice("0123456789")
    return f"count {c} in {d}", str(d.count(c))


def parity(rng):
    n = rng.randint(0, 9999)
    return f"parity of {n}", "even" if n % 2 == 0 else "odd"


def maximum(rng):
    xs = [rng.randint(0, 99) for _ in range(rng.randint(2, 6))]
    return f"max of {' '.join(map(str, xs))}", str(max(xs))


# name -> (generator, relative size): strongly imbalanced on purpose.
TASKS: dict[str, tuple[Task, int]] = {
    "addition": (addition, 48),
    "copying": (copying, 24),
    "reversal": (reversal, 12),
    "sorting": (sorting, 8),
    "subtraction": (subtraction, 4),
    "counting": (counting, 2),
    "parity": (parity, 1),
    "maximum": (maximum, 1),
}


def synthetic_stream(seed: int = 0, balanced: bool = False) -> Iterator[dict]:
    """An endless stream of ``{id, source, prompt, response}`` records in mixture proportions.

    ``balanced`` draws every task equally often instead (for a base model or a held-out set).
    """
    rng = random.Random(seed)
    names = list(TASKS)
    sizes = [1 if balanced else TASKS[n][1] for n in names]
    i = 0
    while True:
        source = rng.choices(names, weights=sizes)[0]
        prompt, response = TASKS[source][0](rng)
        yield {"id": f"{source}-{i}", "source": source, "prompt": prompt, "response": response}
        i += 1
