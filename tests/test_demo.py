"""The demo runs offline end to end: shards, a real selector process, torchrun ranks, a report."""

import json
import math

import pytest

from colm_server.data.synthetic import TASKS, synthetic_stream
from colm_stream.demo import DemoConfig, clear_previous, heldout_records, main, run_demo


def test_synthetic_mixture_is_strongly_imbalanced_and_reproducible():
    sizes = [size for _, size in TASKS.values()]
    assert len(TASKS) >= 8 and max(sizes) >= 30 * min(sizes)
    a = [r for _, r in zip(range(50), synthetic_stream(seed=3))]
    b = [r for _, r in zip(range(50), synthetic_stream(seed=3))]
    assert a == b and {r["source"] for r in a} <= set(TASKS)


def test_heldout_has_every_task_equally_and_no_training_id():
    records = heldout_records(per_source=5, seed=0)
    assert sorted(r["source"] for r in records) == sorted(list(TASKS) * 5)
    assert all(r["id"].startswith("heldout-") for r in records)


def test_bad_demo_settings_are_refused_naming_the_setting():
    with pytest.raises(ValueError, match="small"):
        DemoConfig(large=4, small=8)
    with pytest.raises(ValueError, match="strategies"):
        DemoConfig(strategies=["colm", "best"])
    with pytest.raises(SystemExit):
        main(["--steps", "0"])


def test_a_new_demo_clears_the_jobs_of_an_earlier_one_and_nothing_else(tmp_path):
    journal = tmp_path / "runs" / "colm" / "work" / "state.json"
    journal.parent.mkdir(parents=True)
    journal.write_text("{}")  # a selector would resume from this, a trainer from checkpoints
    (tmp_path / "shards").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    assert clear_previous(tmp_path) == [tmp_path / "shards", tmp_path / "runs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_shortened_demo_trains_every_strategy_and_reports_every_source(tmp_path):
    cfg = DemoConfig(out=tmp_path / "demo", steps=4, large=8, small=2, records=400, base_steps=3,
                     heldout_per_source=2, push_every=2)
    report = run_demo(cfg)

    text = report.read_text()
    assert (tmp_path / "demo" / "report.png").stat().st_size > 10_000
    data = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert list(data["heldout"]) == ["base", "colm", "random", "full"]
    for name, losses in data["heldout"].items():  # a finite held-out loss for every run and task
        assert set(losses["per_source"]) == set(TASKS), name
        assert all(math.isfinite(v) for v in losses["per_source"].values())
    for run in data["runs"]:
        assert len(run["train_loss"]) == cfg.steps and run["wall_seconds"] > 0
        assert run["trainer_peak_rss"] > 0 and run["selector_peak_rss"] > 0
        # Every selected step drew W*L and kept W*b (the selector may run a prefetch ahead).
        steps = run["selected_steps"]
        assert cfg.steps <= steps <= cfg.steps + 2
        assert sum(run["source_seen"].values()) == steps * cfg.world * cfg.large
        per_rank = cfg.large if run["name"] == "full" else cfg.small
        assert sum(run["source_selected"].values()) == steps * cfg.world * per_rank
        assert run["samples_per_rank_step"] == per_rank
        # Unweighted strategies train on every sample equally; colm's cluster weights are worth fewer.
        if run["name"] == "colm":
            assert 1.0 <= run["effective_batch"] <= per_rank
        else:
            assert run["effective_batch"] == pytest.approx(per_rank)
    for task in TASKS:  # every task has its row in the loss table
        assert sum(line.startswith(f"| {task}") for line in text.splitlines()) >= 1
    assert "| colm | 2 |" in text and "| full | 8 |" in text  # samples per rank and step
