"""The demo's report: a Markdown table set and one PNG figure, written to the output folder."""

from __future__ import annotations

from pathlib import Path

from colm_stream.evaluate import SourceLosses
from colm_stream.jobs import RunResult

SMOOTH = 10  # steps averaged in the plotted training loss


def _smooth(values: list[float]) -> list[float]:
    """Trailing mean over up to SMOOTH steps: one step's loss on 8 samples is mostly noise."""
    return [sum(values[max(0, i - SMOOTH + 1):i + 1]) / (i - max(0, i - SMOOTH + 1) + 1)
            for i in range(len(values))]


def _sources(runs: list[RunResult], losses: dict[str, SourceLosses]) -> list[str]:
    """Every source drawn or evaluated, the most drawn first."""
    seen = runs[0].source_seen
    names = set(seen).union(*(v.per_source for v in losses.values()))
    return sorted(names, key=lambda s: (-seen.get(s, 0), s))


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def markdown(setup: list[str], runs: list[RunResult], losses: dict[str, SourceLosses],
             small_sources: list[str]) -> str:
    """The report: held-out loss per source and run, what each run trained on, and what it cost."""
    names = [r.name for r in runs]
    first = runs[0]
    total_seen = sum(first.source_seen.values())
    sources = _sources(runs, losses)
    lines = ["# colm-stream demo: LoRA training on coresets of a synthetic mixture", "", *setup, "",
             "## Held-out loss per source (lower is better)", "",
             "| source | share of the stream | " + " | ".join(losses) + " |",
             "|---|---:|" + "---:|" * len(losses)]
    for s in sources:
        cells = " | ".join(f"{v.per_source.get(s, float('nan')):.3f}" for v in losses.values())
        lines.append(f"| {s} | {first.source_seen.get(s, 0) / total_seen:.1%} | {cells} |")
    mixture = {name: sum(v.per_source.get(s, 0.0) * first.source_seen.get(s, 0) for s in sources) / total_seen
               for name, v in losses.items()}
    lines.append("| **macro** (every source equally) | | "
                 + " | ".join(f"**{v.macro:.3f}**" for v in losses.values()) + " |")
    lines.append("| mixture (sources by stream share) | | "
                 + " | ".join(f"{mixture[name]:.3f}" for name in losses) + " |")

    lines += ["", "## What each run trained on", "",
              "Large batches: each source's share of the samples the selector drew. Samples: its "
              "share of the samples a run trained on. Weight: its share of the summed sample "
              "weights, i.e. its pull on the training loss. Kept: the share of its drawn samples "
              "that reached the trainers.", "",
              "| source | large batches | " + " | ".join(f"{n}: samples / weight / kept" for n in names)
              + " |",
              "|---|---:|" + "---:|" * len(names)]
    for s in sources:
        cells = []
        for r in runs:
            share = r.source_selected.get(s, 0) / max(sum(r.source_selected.values()), 1)
            kept = r.source_selected.get(s, 0) / max(r.source_seen.get(s, 0), 1)
            cells.append(f"{share:.1%} / {r.weight_share.get(s, 0.0):.1%} / {kept:.0%}")
        mark = " (small)" if s in small_sources else ""
        lines.append(f"| {s}{mark} | {first.source_seen.get(s, 0) / total_seen:.1%} | {' | '.join(cells)} |")

    lines += ["", "## Cost", "",
              "| run | samples per rank and step | effective samples | wall time | trainer peak RSS "
              "| selector peak RSS | selection per step |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        per_step = f"{r.selection_seconds / r.selections * 1e3:.1f} ms" if r.selections else "-"
        lines.append(f"| {r.name} | {r.samples_per_rank_step:.0f} | {r.effective_batch:.1f} "
                     f"| {r.wall_seconds:.1f} s "
                     f"| {_mib(r.trainer_peak_rss)} | {_mib(r.selector_peak_rss)} | {per_step} |")
    lines += ["", "Effective samples: (sum w)^2 / sum w^2 of a rank's step, averaged; what its weighted "
              "loss is worth in equally weighted samples.",
              "Peak RSS is the resident memory of the whole process (the Python runtime and "
              "torch included, the largest of the ranks for the trainer); on a GPU the activation "
              "memory of b against L is what differs."]
    return "\n".join(lines) + "\n"


def plot(path: Path, runs: list[RunResult], losses: dict[str, SourceLosses]) -> Path:
    """Training loss per step, held-out loss per source, and source shares, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = runs[0]
    sources = _sources(runs, losses)
    fig, (ax_loss, ax_held, ax_share) = plt.subplots(1, 3, figsize=(17, 4.8))
    for r in runs:
        ax_loss.plot(range(len(r.train_loss)), _smooth(r.train_loss), label=r.name, linewidth=1.2)
    ax_loss.set(title=f"training loss (weighted, mean of ranks, {SMOOTH}-step mean)", xlabel="step",
                ylabel="loss")
    ax_loss.legend()

    width = 0.8 / len(losses)
    for i, (name, value) in enumerate(losses.items()):
        xs = [j + (i - (len(losses) - 1) / 2) * width for j in range(len(sources))]
        ax_held.bar(xs, [value.per_source.get(s, float("nan")) for s in sources], width, label=name)
    ax_held.set_xticks(range(len(sources)), sources, rotation=45, ha="right")
    ax_held.set(title="held-out loss per source", ylabel="loss")
    ax_held.legend(fontsize=8)

    columns = [("large batches", first.source_seen)] + [(r.name, r.source_selected) for r in runs]
    width = 0.8 / len(columns)
    for i, (name, counts) in enumerate(columns):
        total = max(sum(counts.values()), 1)
        xs = [j + (i - (len(columns) - 1) / 2) * width for j in range(len(sources))]
        ax_share.bar(xs, [counts.get(s, 0) / total for s in sources], width, label=name)
    ax_share.set_xticks(range(len(sources)), sources, rotation=45, ha="right")
    ax_share.set_yscale("log")
    ax_share.set(title="share of each source (log scale)", ylabel="share of samples")
    ax_share.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
