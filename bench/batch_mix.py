"""How much choice did a selection have? Source mix of the large batches of a finetune run.

Reads the selector journals ``bench/finetune.py`` leaves in its work folder. ``full-2b`` trains
on whole large batches, and every b-of-L run of one seed draws the same ones, so its journal
shows what each selection chose from: how many sources a large batch holds, how many of them
have two or more samples, and how many of a run's picks were a choice among a source's samples
(the only choice facility location makes; how many each source gets is the budget's).

    python bench/batch_mix.py bench-work/cpu-natural --seed 0
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from pathlib import Path

from colm_server.service.journal import Journal


def journal_steps(run_dir: Path) -> dict[int, list[str]]:
    """step -> sources of rank 0's batch, for every journaled step of one run."""
    journal = Journal(run_dir / "selector")  # the finished run's; nothing is written to it
    first, last = journal.first_step, journal.last_step
    if first is None:
        return {}
    return {s: list(journal.read(s, 0).sources) for s in range(first, last + 1)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("work", type=Path, help="a finetune work folder, e.g. bench-work/cpu-natural")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the Markdown here")
    args = p.parse_args(argv)
    large = journal_steps(args.work / f"full-2b-seed{args.seed}")
    if not large:
        raise SystemExit(f"no journal of full-2b (seed {args.seed}) under {args.work}")
    mixes = [Counter(sources) for sources in large.values()]
    size = statistics.mean(sum(m.values()) for m in mixes)
    lines = [
        f"# Source mix of the large batches: `{args.work}`, seed {args.seed}", "",
        f"Command: `python bench/batch_mix.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
        f"{len(mixes)} large batches of {size:.0f}: {statistics.mean(len(m) for m in mixes):.1f} sources "
        f"each on average, {statistics.mean(sum(n >= 2 for n in m.values()) for m in mixes):.1f} of them "
        "with two samples or more; the largest source holds "
        f"{statistics.mean(max(m.values()) for m in mixes):.1f} samples of a batch.", "",
        "Per b-of-L run and step: *chosen* counts the samples picked from a source that had more "
        "samples in the large batch than were picked from it (where the strategy's ranking decides "
        "anything; the rest follows from the per-source budget); *left out* counts the large "
        "batch's sources no sample was picked from; *pool*: samples of those sources per chosen "
        "sample (1 of 2 is a pool of 2).", "",
        "| run | samples per step | chosen | pool | sources left out |",
        "|---|---:|---:|---:|---:|",
    ]
    for run_dir in sorted(args.work.glob(f"*-seed{args.seed}")):
        picked = journal_steps(run_dir)
        steps = [s for s in picked if s in large]
        if not steps or run_dir.name.startswith("full-"):
            continue
        chosen, pool, left_out = [], [], []
        for s in steps:
            have, took = Counter(large[s]), Counter(picked[s])
            chosen.append(sum(k for src, k in took.items() if k < have[src]))
            pool.append(sum(have[src] for src, k in took.items() if k < have[src]))
            left_out.append(sum(src not in took for src in have))
        lines.append(f"| {run_dir.name.removesuffix(f'-seed{args.seed}')} "
                     f"| {statistics.mean(len(picked[s]) for s in steps):.1f} "
                     f"| {statistics.mean(chosen):.1f} | {sum(pool) / max(sum(chosen), 1):.1f} "
                     f"| {statistics.mean(left_out):.1f} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
