"""`colm-train` end to end: a real selector, the tiny model, checkpoints, resume and the ledger."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from colm_client.stream import CoresetStream
from colm_server.service.server import SelectorServer
from colm_stream.train import latest_checkpoint, parse_args, train
from test_service import B, make_config, take, target


@pytest.fixture()
def selector(tmp_path):
    srv = SelectorServer(make_config(tmp_path, **{"service.world_size": 1}))
    srv.start()
    yield srv
    srv.stop(grace=1)


def run(srv, out, steps: int, *extra: str) -> dict:
    return train(parse_args(["--model", "tiny:llama", "--lora-r", "4", "--selector", target(srv),
                             "--steps", str(steps), "--output-dir", str(out), "--log-every", "1",
                             *extra]))


def ledger(out) -> list[dict]:
    return [json.loads(line) for line in (out / "ledger-rank0.jsonl").read_text().splitlines()]


def test_trains_n_steps_checkpoints_and_pushes(selector, tmp_path):
    out = tmp_path / "run"
    result = run(selector, out, 4, "--save-every", "2", "--push-every", "2")
    assert result["step"] == 3 and math.isfinite(result["loss"])
    assert {d.name for d in out.glob("checkpoint-*")} == {"checkpoint-1", "checkpoint-3"}
    assert (out / "checkpoint-3" / "adapter" / "adapter_config.json").is_file()
    assert [e["step"] for e in ledger(out)] == [0, 1, 2, 3]
    assert all(math.isfinite(e["loss"]) and len(e["ids"]) == len(e["weights"]) for e in ledger(out))
    assert selector.job.param_version >= 1  # the adapter reached the selector
    summary = json.loads((out / "summary-rank0.json").read_text())
    assert summary == result and summary["steps"] == 4 and summary["first_step"] == 0
    assert summary["samples"] == 4 * B and summary["tokens"] > summary["samples"]
    assert summary["wall_seconds"] > 0 and summary["peak_rss_bytes"] > 50 << 20
    assert 50 << 20 < summary["start_rss_bytes"] <= summary["peak_rss_bytes"]  # model loaded, before the loop


def test_resume_rejoins_after_the_checkpoint_and_loses_nothing(selector, tmp_path):
    out = tmp_path / "run"
    run(selector, out, 5, "--save-every", "2")  # checkpoints 1, 3 and the final 4
    shutil.rmtree(out / "checkpoint-4")  # as if the run had died after step 4, before saving it
    assert latest_checkpoint(out).name == "checkpoint-3"
    (out / ".tmp-checkpoint-5").mkdir()  # a half-written checkpoint is ignored
    result = run(selector, out, 7, "--save-every", "2")
    assert result["step"] == 6
    entries = ledger(out)
    assert [e["step"] for e in entries] == [0, 1, 2, 3, 4, 4, 5, 6]  # step 4 came after the
    # last checkpoint: retrained, from the same adapter weights, so on the same loss.
    assert entries[4]["ids"] == entries[5]["ids"]
    assert entries[4]["loss"] == pytest.approx(entries[5]["loss"], rel=1e-5)
    last = {e["step"]: e["ids"] for e in ledger(out)}  # the last entry per step wins
    fresh = take(CoresetStream(target(selector), rank=0, world_size=1, payload=False), 7)
    assert [last[b.step] for b in fresh] == [b.ids for b in fresh]
    assert latest_checkpoint(out).name == "checkpoint-6"


def test_two_ranks_under_torchrun_train_disjoint_coresets(tmp_path):
    srv = SelectorServer(make_config(tmp_path))  # world_size 2
    srv.start()
    out = tmp_path / "ddp"
    try:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", "2", "-m", "colm_stream.train", "--model", "tiny:llama",
                        "--lora-r", "4", "--selector", target(srv), "--steps", "3",
                        "--output-dir", str(out), "--push-every", "2"],
                       check=True, timeout=90, env=os.environ | {"OMP_NUM_THREADS": "1"})
    finally:
        srv.stop(grace=1)
    ranks = [[json.loads(line) for line in (out / f"ledger-rank{r}.jsonl").read_text().splitlines()]
             for r in range(2)]
    assert [[e["step"] for e in r] for r in ranks] == [[0, 1, 2], [0, 1, 2]]
    for a, b in zip(*ranks):
        assert not set(a["ids"]) & set(b["ids"]) and math.isfinite(a["loss"] + b["loss"])
    assert latest_checkpoint(out).name == "checkpoint-2"


@pytest.mark.parametrize("extra", [["--rank", "1"], ["--world-size", "2"],
                                   ["--rank", "2", "--world-size", "2"]])
def test_rank_and_world_size_go_together_and_agree(extra):
    base = ["--model", "tiny:llama", "--selector", "127.0.0.1:1", "--steps", "1", "--output-dir", "x"]
    with pytest.raises(SystemExit):
        parse_args(base + extra)
    assert parse_args(base + ["--rank", "1", "--world-size", "2"]).rank == 1
