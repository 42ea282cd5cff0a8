"""Tables and plots of `endtoend.py`: paired differences by seed at equal steps and at equal cost."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

BASELINES = ("stratified", "random", "full", "colm-paper", "stratified-uniform")
UNWEIGHTED = ("colm-paper", "stratified-uniform")  # trained unweighted: one run serves every mixture


def step_costs(costs: dict, name: str, ratio: int) -> tuple[float, float]:
    """(trainer seconds, total processor-seconds) of one step of run ``name`` at L/b = ``ratio``."""
    trainer = costs[f"train|full|{ratio}"] if name == "full" else costs["train|b"]
    return trainer, trainer + costs[f"select|{name}|{ratio}"]


def equal_cost_steps(costs: dict, name: str, ratio: int, steps: int, basis: str) -> int:
    """Steps of run ``name`` that cost what ``steps`` steps of colm cost: ``basis`` 'steps' (equal
    steps), 'trainer' (trainer-seconds) or 'total' (selector plus trainer processor-seconds)."""
    if basis == "steps":
        return steps
    which = 0 if basis == "trainer" else 1
    colm, mine = step_costs(costs, "colm", ratio)[which], step_costs(costs, name, ratio)[which]
    return max(1, round(steps * colm / mine))


def paired(diffs: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of paired differences."""
    if len(diffs) < 2:
        return (diffs[0] if diffs else math.nan), math.nan
    return statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))


def verdict(mean: float, se: float, other: str, mine: str = "colm") -> str:
    """Of a paired difference ``mine - other`` (lower is better)."""
    if math.isnan(se):
        return "one seed: unresolved"
    if abs(mean) <= 2 * se:
        return "within noise"
    return f"{mine} better beyond 2 SE" if mean < 0 else f"{other} better beyond 2 SE"


class Runs:
    """The runs of every seed by (name, mixture, ratio, steps); an unweighted run serves every mixture."""

    def __init__(self, results: list[dict], costs: dict, steps: int):
        self.by: dict[tuple[str, str, int, int], dict[int, dict]] = {}
        self.costs, self.steps = costs, steps
        for job in results:
            for run in job["runs"]:
                key = (run["name"], run["mixture"], run["ratio"], run["steps"])
                self.by.setdefault(key, {})[run["seed"]] = run
        self.ratios = sorted({k[2] for k in self.by})
        self.mixtures = [m for m in ("stream", "balanced") if any(k[1] == m for k in self.by)]
        self.seeds = sorted({s for runs in self.by.values() for s in runs})

    def get(self, name: str, mixture: str, ratio: int, steps: int | None = None) -> dict[int, dict]:
        """Per seed, the run of ``steps`` steps (default: the equal-steps length)."""
        if name in UNWEIGHTED:
            mixture = "stream"  # the same run under every mixture
        return self.by.get((name, mixture, ratio, self.steps if steps is None else steps), {})

    def lengths(self, name: str, mixture: str, ratio: int) -> list[int]:
        if name in UNWEIGHTED:
            mixture = "stream"
        return sorted(k[3] for k in self.by if k[:3] == (name, mixture, ratio))

    def at(self, name: str, mixture: str, ratio: int, basis: str, metric: str = "macro") -> dict[int, float]:
        """Per seed: final loss of run ``name`` trained for what colm's run costs in ``basis``."""
        if not self.get(name, mixture, ratio):
            return {}
        steps = equal_cost_steps(self.costs, name, ratio, self.steps, basis)
        return {seed: run["curve"][-1][metric] for seed, run in self.get(name, mixture, ratio, steps).items()}


def compare(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, int]:
    seeds = sorted(set(a) & set(b))
    mean, se = paired([a[s] - b[s] for s in seeds])
    return mean, se, len(seeds)


def fmt(mean: float, se: float) -> str:
    return f"{mean:+.4f} ± {se:.4f}" if not math.isnan(se) else f"{mean:+.4f}"


def table(runs: Runs, mixture: str, ratio: int, basis: str) -> list[str]:
    """One comparison table: each run's mean loss at the point, and colm minus it, paired."""
    colm = runs.at("colm", mixture, ratio, basis)
    colm_micro = runs.at("colm", mixture, ratio, basis, "micro")
    lines = ["| run | steps | macro loss | micro loss | colm − run (macro) | verdict | colm − run (micro) |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for name in ("colm", *BASELINES):
        macro = runs.at(name, mixture, ratio, basis)
        micro = runs.at(name, mixture, ratio, basis, "micro")
        if not macro:
            continue
        steps = equal_cost_steps(runs.costs, name, ratio, runs.steps, basis)
        row = f"| {name}{' (unweighted)' if name == 'colm-paper' else ''} | {steps} | " \
              f"{statistics.fmean(macro.values()):.4f} | {statistics.fmean(micro.values()):.4f} |"
        if name == "colm":
            lines.append(row + " | | |")
            continue
        m, se, n = compare(colm, macro)
        mm, mse, _ = compare(colm_micro, micro)
        lines.append(row + f" {fmt(m, se)} (n={n}) | {verdict(m, se, name)} | {fmt(mm, mse)} |")
    return lines


def gap_closed(runs: Runs, mixture: str, ratio: int) -> tuple[float, float, float]:
    """Share of the random-b to full-L gap at equal steps that colm closes; the gap and its SE."""
    colm, rnd, full = (runs.at(n, mixture, ratio, "steps") for n in ("colm", "random", "full"))
    gap, gap_se, _ = compare(rnd, full)
    closed, _, _ = compare(rnd, colm)
    return closed / gap if gap else math.nan, gap, gap_se


def power(runs: Runs, mixture: str, ratio: int) -> str:
    """Seeds needed for an SE of a tenth of the random-b to full-L gap, from the measured sd."""
    if not (runs.get("random", mixture, ratio) and runs.get("full", mixture, ratio)):
        return "n/a (no random or full run)"
    colm, strat = runs.at("colm", mixture, ratio, "steps"), runs.at("stratified", mixture, ratio, "steps")
    seeds = sorted(set(colm) & set(strat))
    _, gap, _ = gap_closed(runs, mixture, ratio)
    if len(seeds) < 2 or not gap > 0:
        return "n/a"
    sd = statistics.stdev(colm[s] - strat[s] for s in seeds)
    need = math.ceil((sd / (gap / 10)) ** 2)
    return f"sd of colm − stratified {sd:.4f}, gap {gap:.4f}: {need} seeds for SE ≤ gap/10"


def per_source(runs: Runs, mixture: str, ratio: int) -> list[str]:
    names = [n for n in ("colm", *BASELINES) if runs.get(n, mixture, ratio)]
    first = next(iter(runs.get("colm", mixture, ratio).values()))
    sources = sorted(first["curve"][-1]["per_source"])
    lines = ["| source | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for s in sources:
        cells = []
        for n in names:
            vals = [_per_source_at(r, runs.steps, s) for r in runs.get(n, mixture, ratio).values()]
            cells.append(f"{statistics.fmean(vals):.3f}")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines


def _per_source_at(run: dict, step: int, source: str) -> float:
    assert run["steps"] == step, (run["steps"], step)
    return run["curve"][-1]["per_source"][source]


def mixture_realised(runs: Runs, mixture: str, ratio: int, shares: dict[str, float]) -> list[str]:
    """What each run trained on: per source, its share of the samples and of the loss weight."""
    names = [n for n in ("colm", *BASELINES) if runs.get(n, mixture, ratio)]
    lines = ["| source | stream share | " + " | ".join(f"{n} samples / weight" for n in names) + " |",
             "|---|---:|" + "---:|" * len(names)]
    for s in sorted(shares):
        cells = []
        for n in names:
            rs = runs.get(n, mixture, ratio).values()
            sample = statistics.fmean(r["sample_share"].get(s, 0.0) for r in rs)
            weight = statistics.fmean(r["weight_share"].get(s, 0.0) for r in rs)
            cells.append(f"{sample:.3f} / {weight:.3f}")
        lines.append(f"| {s} | {shares[s]:.3f} | " + " | ".join(cells) + " |")
    ess = [f"{n} {statistics.fmean(r['ess_ratio'] for r in runs.get(n, mixture, ratio).values()):.2f}"
           for n in names]
    lines.append("")
    lines.append("Effective sample size of a step's weights over its sample count, mean over steps: "
                 + ", ".join(ess) + ".")
    return lines


def cost_lines(costs: dict, ratios: list[int]) -> list[str]:
    lines = ["| run | " + " | ".join(f"L/b={r}: trainer / selector / total (ms), total ÷ colm"
                                     for r in ratios) + " |", "|---|" + "---:|" * len(ratios)]
    for name in ("colm", *BASELINES):
        if f"select|{name}|{ratios[0]}" not in costs:
            continue
        cells = []
        for r in ratios:
            trainer, total = step_costs(costs, name, r)
            colm = step_costs(costs, "colm", r)[1]
            cells.append(f"{trainer * 1e3:.1f} / {(total - trainer) * 1e3:.1f} / {total * 1e3:.1f}, "
                         f"{total / colm:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def targets(runs: Runs) -> list[str]:
    """The issue's targets, each met, missed or within noise."""
    out = []
    for ratio in runs.ratios:
        for mixture in runs.mixtures:
            colm = runs.at("colm", mixture, ratio, "steps")
            parts = []
            for other in ("stratified", "random"):
                if runs.get(other, mixture, ratio):
                    m, se, _ = compare(colm, runs.at(other, mixture, ratio, "steps"))
                    parts.append(f"below {other}: {fmt(m, se)}, {target(m, se)}")
            if runs.get("random", mixture, ratio) and runs.get("full", mixture, ratio):
                closed, gap, gap_se = gap_closed(runs, mixture, ratio)
                half = "gap within noise" if not gap > 2 * gap_se else "met" if closed >= 0.5 else "missed"
                parts.append(f"gap random→full {gap:.4f} ± {gap_se:.4f}, colm closes {closed:.0%} of it "
                             f"(≥ 50%: {half})")
            if runs.get("full", mixture, ratio):
                m, se, n = compare(colm, runs.at("full", mixture, ratio, "total"))
                parts.append(f"at equal total processor-seconds below full L: {fmt(m, se)} (n={n}), "
                             f"{target(m, se)}")
            out.append(f"- **L/b={ratio}, {mixture}:** " + "; ".join(parts) + ".")
        paper, free = (runs.at(n, "stream", ratio, "steps") for n in UNWEIGHTED)
        if paper and free:  # is colm-paper's gain its selection or its unweighted mixture?
            m, se, n = compare(paper, free)
            out.append(f"- **L/b={ratio}, unweighted:** colm-paper − stratified-uniform at equal steps "
                       f"{fmt(m, se)} (n={n}), {verdict(m, se, *reversed(UNWEIGHTED))}.")
    return out


def target(mean: float, se: float) -> str:
    """A 'colm below' target: met or missed beyond 2 SE, else within noise."""
    if math.isnan(se):
        return "one seed: unresolved"
    return "met" if mean < -2 * se else "missed" if mean > 2 * se else "within noise"


def render(results: list[dict], meta: dict, out: Path) -> str:
    """Write ``out`` (Markdown), its .json and .png; return the Markdown."""
    steps = meta["settings"]["steps"]
    runs = Runs(results, meta["costs"], steps)
    s = meta["settings"]
    lines = [
        "# End to end: does coreset training pay?", "",
        "Commands (runs, then this rendering):", "", *[f"    {c}" for c in meta["commands"]], "",
        f"Machine: {meta['machine']}.", "",
        f"Preset `{meta['preset']}`: model `{s['model']}`, data `{s['data']}`, b={s['b']}, "
        f"L/b in {s['ratios']}, {steps} steps at equal steps, lr {s['lr']} ({s['warmup']} warmup "
        f"steps, then cosine to each run's end), LoRA r={s['lora_r']} on {', '.join(s['lora_targets'])}, "
        f"max length {s['max_length']}, held-out {s['heldout_per_source']} records per source, "
        f"adapter pushed to the selector every {s['push_every']} steps, seeds {runs.seeds} "
        f"(n={len(runs.seeds)}, paired: same stream and initial adapter per seed).", "",
        *([f"**colm here scores with an early-exit proxy**: the model's first {s['scorer_layers']} decoder "
           f"layer{'s' if s['scorer_layers'] > 1 else ''}, then its final norm and lm_head "
           "(`selector.scorer_layers`; `colm-fast` is 2).", ""]
          if s.get("scorer_layers") else []),
        *(["**colm's scorer carries its own LoRA** (`selector.scorer_adapter: own`): the selector trains "
           "it with one weighted AdamW step (constant lr, the trainer's peak) on each coreset it selects, "
           "and takes no adapter from the trainer.", ""]
          if s.get("scorer_adapter") == "own" else []),
        "Loss is the held-out mean response-token loss: macro weighs sources equally, micro by "
        "their stream shares. A paired difference is colm minus the run, mean ± SE over seeds; "
        "negative favours colm; a verdict is given only beyond 2 SE.", "",
        "## Cost per step (median, measured side by side before the runs, one thread)", "",
        *cost_lines(meta["costs"], runs.ratios), "",
        "## Targets", "", *targets(runs), "",
    ]
    for ratio in runs.ratios:
        for mixture in runs.mixtures:
            lines += [f"## L/b = {ratio} (L={ratio * s['b']}), mixture `{mixture}`", "",
                      f"Power: {power(runs, mixture, ratio)}.", ""]
            for basis, title in (("steps", f"At equal steps ({steps})"),
                                 ("trainer", "At equal trainer-seconds (colm's selector free)"),
                                 ("total", "At equal total processor-seconds (selector + trainer)")):
                lines += [f"### {title}", "", *table(runs, mixture, ratio, basis), ""]
            lines += ["### Per source at equal steps (mean over seeds)", "",
                      *per_source(runs, mixture, ratio), "",
                      "### What the runs trained on", "",
                      *mixture_realised(runs, mixture, ratio, meta["stream_shares"]), ""]
    text = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}) + "\n")
    plot(runs, out.with_suffix(".png"))
    return text


def plot(runs: Runs, path: Path) -> None:
    """Mean macro loss along the equal-steps runs (top), and at the end of every run against
    the total processor-seconds it cost (bottom), per setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [(r, m) for r in runs.ratios for m in runs.mixtures]
    fig, axes = plt.subplots(2, len(settings), figsize=(4.2 * len(settings), 7), squeeze=False)
    for col, (ratio, mixture) in enumerate(settings):
        for name in ("colm", *BASELINES):
            curves = list(runs.get(name, mixture, ratio).values())
            if not curves:
                continue
            xs = [p["step"] for p in curves[0]["curve"]]
            ys = [statistics.fmean(c["curve"][i]["macro"] for c in curves) for i in range(len(xs))]
            line, = axes[0][col].plot(xs, ys, marker=".", label=name)
            total = step_costs(runs.costs, name, ratio)[1]
            ends = [(n * total, statistics.fmean(r["curve"][-1]["macro"]
                                                 for r in runs.get(name, mixture, ratio, n).values()))
                    for n in runs.lengths(name, mixture, ratio)]
            axes[1][col].plot(*zip(*ends), marker="o", color=line.get_color(), label=name)
        axes[0][col].set_title(f"L/b={ratio}, {mixture}")
        axes[0][col].set_xlabel("step (runs of the equal-steps length)")
        axes[1][col].set_xlabel("total processor-seconds of a run (selector + trainer)")
        colm_end = runs.steps * step_costs(runs.costs, "colm", ratio)[1]
        axes[1][col].axvline(colm_end, color="grey", lw=0.8, ls="--")
        for row in (0, 1):
            axes[row][col].set_ylabel("held-out macro loss" + (" at the run's end" if row else ""))
            axes[row][col].grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
