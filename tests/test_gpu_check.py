"""bench/gpu_check: its CPU dry run passes every stage with every figure, a missing prerequisite stops
it at once, and a stage that fails or hangs is recorded while the next one still runs."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402

FIGURES = {
    "scorer": ["exact: correlation of pairwise distances, bf16 vs fp32",
               "zo (K=8, all layers): correlation of pairwise distances, bf16 vs fp32"],
    "cost": ["plain forward: seconds", "plain forward: peak MiB"] + [
        f"{name}: {what}" for name in gpu_check.SELECTIONS
        for what in ("seconds", "time / forward", "peak MiB", "memory / forward")],
    "job": ["selection: seconds per step", "trainer: seconds per step", "job wall: seconds",
            "loss: first step, last step", "trainer devices"],
    "ddp": ["selection: seconds per step", "trainer: seconds per step", "trainer devices"],
}


def check(tmp_path: Path, *args: str, env: dict | None = None, timeout: float = 200):
    out = tmp_path / "results" / "check.md"
    done = subprocess.run(["bash", str(REPO / "bench/gpu_check.sh"), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=timeout,
                          env=os.environ | {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env or {})})
    return done, out


def test_the_cpu_dry_run_passes_every_stage_with_its_figures(tmp_path):
    done, out = check(tmp_path, "--cpu", "--work", str(tmp_path / "work"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = out.read_text()
    stages = json.loads(out.with_suffix(".json").read_text())["stages"]
    assert list(stages) == list(gpu_check.STAGES)
    for name, stage in stages.items():
        assert stage["status"] == "passed", (name, stage)
        assert stage["checks"] and all(c["ok"] for c in stage["checks"].values()), name
        assert f"## {name}: passed" in text and f"| {name} | passed |" in text
        for figure in FIGURES.get(name, []):
            value = stage["figures"][figure]
            assert figure in text
            for v in value if isinstance(value, list) else [value]:
                assert not isinstance(v, float) or math.isfinite(v), (name, figure, value)
    assert "Mode: dry run on the CPU (--cpu)" in text and "Data: synthetic" in text
    assert stages["ddp"]["figures"]["trainer devices"] == ["cpu", "cpu"]


def test_a_missing_prerequisite_stops_the_run_at_once(tmp_path):
    done, out = check(tmp_path, "--cpu", "--data", str(tmp_path / "absent.jsonl"), timeout=60)
    assert done.returncode == 2
    assert f"missing: data: {tmp_path / 'absent.jsonl'} (from --data)" in done.stderr
    stages = json.loads(out.with_suffix(".json").read_text())["stages"]
    assert list(stages) == ["preflight"] and stages["preflight"]["status"] == "failed"
    assert "## preflight: failed" in out.read_text()


def make_run(tmp_path: Path, budget: float, **ctx) -> gpu_check.Run:
    args = argparse.Namespace(out=tmp_path / "r.md", budget=budget, cpu=False, command="x")
    (tmp_path / "ctx.json").write_text(json.dumps({"work": str(tmp_path), **ctx}))
    return gpu_check.Run(args, gpu_check.GPU, tmp_path)


def test_a_failing_and_a_hanging_stage_are_recorded_and_the_next_runs(tmp_path, monkeypatch):
    """The guard itself (the stages' work replaced by injected faults): a stage's exception and its
    timeout each end only that stage, keep what it measured, and the report names them."""
    monkeypatch.setattr(gpu_check, "LIMITS", {**gpu_check.LIMITS, "scorer": 3, "cost": 60})
    monkeypatch.setattr(gpu_check, "MIN_STAGE_SECONDS", 1)
    monkeypatch.setenv(gpu_check.FAULT_ENV, "scorer:hang,cost:error")
    run = make_run(tmp_path, 100.0)
    args = run.args
    run.stage("scorer")
    run.stage("cost")
    run.write()
    scorer, cost = run.results["scorer"], run.results["cost"]
    assert scorer["status"] == "timed out after 3 s" and scorer["figures"] == {"measured before hanging": 1.0}
    assert cost["status"] == "failed" and "fault injected into stage cost" in cost["log"]
    text = args.out.read_text()
    assert "## scorer: timed out after 3 s" in text and "| measured before hanging | 1 |" in text
    assert "## cost: failed" in text and "| job | not run | - |" in text


def test_the_ddp_stage_skips_itself_on_one_gpu(tmp_path, monkeypatch):
    monkeypatch.delenv(gpu_check.FAULT_ENV, raising=False)
    run = make_run(tmp_path, 100.0, device="cuda", gpus=1)
    run.stage("ddp")
    assert run.results["ddp"]["status"] == "skipped"
    assert run.results["ddp"]["skipped"] == "1 GPU: the 2-rank NCCL trainer needs 2 or more"


def test_a_stage_without_enough_budget_left_is_not_started(tmp_path):
    run = make_run(tmp_path, gpu_check.MIN_STAGE_SECONDS - 1.0, device="cuda", gpus=2)
    run.stage("ddp")
    assert run.results["ddp"]["status"] == "not run" and not (tmp_path / "ddp.log").exists()
