"""Journal: committed steps read back exactly, survive a reopen and a crash mid-commit, and age out."""

from __future__ import annotations

import os

import pytest
import torch

from colm_server.service.batches import RankBatch
from colm_server.service.journal import Journal, StepNotJournaled


def rank_batch(step: int, rank: int, n: int = 3) -> RankBatch:
    """A small batch whose contents depend on (step, rank), with ragged rows and one empty row."""
    tokens = [[step * 1000 + rank * 100 + i + j for j in range(i + 2)] for i in range(n - 1)] + [[]]
    return RankBatch(
        step=step,
        rank=rank,
        epoch=step // 10,
        param_version=step // 4,
        ids=[f"s{step}-r{rank}-{i}" for i in range(n)],
        sources=["big", "tiny", "big"][:n],
        weights=[1.0 / 3 + i for i in range(n)],  # not representable in float32: must survive exactly
        tokens=torch.tensor([t for row in tokens for t in row], dtype=torch.int32),
        lengths=[len(row) for row in tokens],
        prompt_lens=[1, 2, 0][:n],
        step_weight_sum=10 + step / 3,  # the step's, the same on every rank
    )


def service_state(step: int) -> dict:
    return {
        "cursor": {"epoch": step // 10, "position": step * 7, "shards": ["a.tar", "b.tar"]},
        "selector": {"mean": torch.full((4,), float(step)), "count": torch.tensor(step), "names": ("x",)},
        "param_version": step // 4,
        "note": None,
    }


def commit_steps(journal: Journal, steps: range, world: int = 2) -> None:
    for t in steps:
        journal.commit(t, [rank_batch(t, r) for r in range(world)], service_state(t))


def assert_state_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    assert got["cursor"] == want["cursor"] and got["param_version"] == want["param_version"]
    for k, v in want["selector"].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(got["selector"][k], v) and got["selector"][k].dtype == v.dtype
        else:
            assert got["selector"][k] == v


def test_round_trip_and_reopen(tmp_path):
    journal = Journal(tmp_path)
    assert (journal.first_step, journal.last_step, journal.state()) == (None, None, None)
    commit_steps(journal, range(5), world=3)
    assert (journal.first_step, journal.last_step) == (0, 4)
    for t in range(5):
        for r in range(3):
            assert journal.read(t, r) == rank_batch(t, r)  # dataclass equality: field by field
    assert_state_equal(journal.state(), service_state(4))
    assert journal.size_bytes() > 0

    reopened = Journal(tmp_path)
    assert (reopened.first_step, reopened.last_step) == (0, 4)
    assert all(reopened.read(t, r) == rank_batch(t, r) for t in range(5) for r in range(3))
    assert_state_equal(reopened.state(), service_state(4))
    commit_steps(reopened, range(5, 6), world=3)  # and it continues where it was
    assert reopened.read(5, 2) == rank_batch(5, 2)


def test_a_step_file_from_before_the_steps_total_weight_gets_it_from_every_ranks_weights(tmp_path):
    commit_steps(Journal(tmp_path), range(2), world=3)
    path = tmp_path / "journal" / f"step-{1:012d}.pt"
    data = torch.load(path, weights_only=True)
    for d in data["ranks"]:
        del d["step_weight_sum"]
    torch.save(data, path)
    reopened = Journal(tmp_path)
    total = sum(sum(rank_batch(1, r).weights) for r in range(3))
    assert [reopened.read(1, r).step_weight_sum for r in range(3)] == [pytest.approx(total, rel=1e-12)] * 3
    assert reopened.read(0, 2) == rank_batch(0, 2)  # a file that has it keeps its own


def test_out_of_order_and_bad_batches_refused(tmp_path):
    journal = Journal(tmp_path)
    with pytest.raises(ValueError, match="expected step 0"):
        journal.commit(1, [rank_batch(1, 0)], {})
    commit_steps(journal, range(2))
    for step in (1, 3):  # a repeat and a gap
        with pytest.raises(ValueError, match="expected step 2"):
            journal.commit(step, [rank_batch(step, 0)], {})
    with pytest.raises(ValueError, match="ranks"):
        journal.commit(2, [rank_batch(2, 0), rank_batch(2, 0)], {})
    with pytest.raises(ValueError, match="steps"):
        journal.commit(2, [rank_batch(3, 0)], {})
    with pytest.raises(TypeError, match=r"state\['bad'\]"):
        journal.commit(2, [rank_batch(2, 0)], {"bad": object()})  # torch.load could not read it back
    assert journal.last_step == 1
    with pytest.raises(ValueError, match="no rank 5"):
        journal.read(1, 5)


def test_retention_window(tmp_path):
    journal = Journal(tmp_path, retention=3)
    commit_steps(journal, range(10))
    assert (journal.first_step, journal.last_step) == (7, 9)
    assert sorted(p.name for p in (tmp_path / "journal").glob("step-*")) == [
        f"step-{t:012d}.pt" for t in (7, 8, 9)
    ]
    for step in (6, 10):  # aged out, and not selected yet
        with pytest.raises(StepNotJournaled, match=rf"step {step} .*available steps are 7\.\.9"):
            journal.read(step, 0)
    with pytest.raises(KeyError):  # callers may catch it as a KeyError
        journal.read(0, 0)
    assert journal.read(7, 1) == rank_batch(7, 1)

    smaller = Journal(tmp_path, retention=2)  # reopening with a smaller window prunes at once
    assert (smaller.first_step, smaller.last_step) == (8, 9)
    with pytest.raises(StepNotJournaled, match="the journal is empty"):
        Journal(tmp_path / "fresh").read(0, 0)


def test_crash_before_state_keeps_previous_step(tmp_path, monkeypatch):
    journal = Journal(tmp_path)
    commit_steps(journal, range(3))
    real_replace = os.replace

    def crash_on_state(src, dst):
        if str(dst).endswith("state.pt"):
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_state)
    with pytest.raises(OSError, match="simulated crash"):
        journal.commit(3, [rank_batch(3, r) for r in range(2)], service_state(3))
    assert journal.last_step == 2  # the failed commit is not visible in this process either
    monkeypatch.setattr(os, "replace", real_replace)
    root = tmp_path / "journal"
    assert (root / f"step-{3:012d}.pt").exists() and (root / "state.pt.tmp").exists()

    reopened = Journal(tmp_path)
    assert (reopened.first_step, reopened.last_step) == (0, 2)
    assert not (root / f"step-{3:012d}.pt").exists() and not list(root.glob("*.tmp"))
    assert_state_equal(reopened.state(), service_state(2))
    with pytest.raises(StepNotJournaled):
        reopened.read(3, 0)
    commit_steps(reopened, range(3, 4))  # the step is selected again and committed
    assert reopened.read(3, 1) == rank_batch(3, 1)


def test_leftover_temp_files_ignored(tmp_path):
    commit_steps(Journal(tmp_path), range(2))
    root = tmp_path / "journal"
    (root / "state.pt.tmp").write_bytes(b"half a file")
    (root / f"step-{2:012d}.pt.tmp").write_bytes(b"")
    journal = Journal(tmp_path)
    assert (journal.first_step, journal.last_step) == (0, 1)
    assert journal.read(1, 0) == rank_batch(1, 0)
    assert_state_equal(journal.state(), service_state(1))
    commit_steps(journal, range(2, 3))
    assert journal.read(2, 1) == rank_batch(2, 1)


def test_reads_beyond_the_cache_come_from_disk(tmp_path):
    journal = Journal(tmp_path)
    commit_steps(journal, range(70), world=1)  # more steps than the cache holds
    assert journal.read(0, 0) == rank_batch(0, 0)
    assert journal.read(69, 0) == rank_batch(69, 0)
