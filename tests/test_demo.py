"""The demo runs offline on the built-in mixture and reports every source and strategy."""

from colm_server.data.synthetic import TASKS, synthetic_stream
from colm_server.demo import STRATEGIES, run


def test_synthetic_mixture_is_strongly_imbalanced_and_reproducible():
    sizes = [size for _, size in TASKS.values()]
    assert len(TASKS) >= 8 and max(sizes) >= 30 * min(sizes)
    a = [r for _, r in zip(range(50), synthetic_stream(seed=3))]
    b = [r for _, r in zip(range(50), synthetic_stream(seed=3))]
    assert a == b and {r["source"] for r in a} <= set(TASKS)


def test_demo_report_covers_every_source_and_strategy():
    report = run(steps=2, large=32, small=8, seed=0)
    for strategy in STRATEGIES:
        assert f"| {strategy} | 0." in report or f"| {strategy} | 1." in report
    rows = [line for line in report.splitlines() if line.startswith("| ") and "%" in line]
    assert len(rows) >= 5  # sources seen in 64 draws of a mixture of 8
