"""The checks of docker/e2e.sh, run on the host with the project's Python.

    docker save IMAGE | python docker/e2e_check.py layers --context PIP_CONTEXT_DIR
    python docker/e2e_check.py ledgers WORK_COPY --steps 40 --world-size 2
    python docker/e2e_check.py preflight

``layers``: no file of the pip context (same content), nothing under /run/pip and no pip.conf is in
any layer of the image, and the model cache's key still matches the GGUF as the layer stores it
(whole-second mtimes), so a pushed and pulled image finds its cache. ``ledgers``: a copy of the
``work`` volume (``selector/journal`` and ``trainer/ledger-rank*.jsonl``) shows every step of the
job trained once per rank in the lineage the final weights saw, on the batch the journal holds
for it, with no sample drawn twice in an epoch: the fault tests' check (tests/fault/test_kills.py),
applied to the deployment's volume. ``preflight``: this Python can run the other two and
docker/pip_context.py (it imports what they import), so that e2e.sh finds a missing or bare
interpreter before it builds anything, and says so in those terms.
``layers`` and ``ledgers`` print a JSON summary and exit 1 when a check fails; any of the three
exits 3 when it could not check at all (an error of its own, not a verdict on the image or the
volume), so that e2e.sh never reports one as the other.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import platform
import sys
import tarfile
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _sha256(stream) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def check_layers(image_tar, context: Path) -> dict:
    """Scan every layer of a ``docker save`` stream for the pip context's files and mount point."""
    secrets = {}
    for path in sorted(p for p in context.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            secrets[_sha256(f)] = str(path.relative_to(context))
    found, layers, files = [], 0, 0
    gguf_mtimes, cache_keys = {}, []  # the GGUF's mtime as stored in the layer, and as the cache saw it
    with tarfile.open(fileobj=image_tar, mode="r|") as image:
        for member in image:
            if not member.isfile() or not (member.name.endswith("layer.tar") or "blobs/" in member.name):
                continue
            try:
                layer = tarfile.open(fileobj=image.extractfile(member), mode="r|")
            except tarfile.ReadError:  # a config or manifest blob, not a layer
                continue
            layers += 1
            with layer:
                for entry in layer:
                    name = entry.name.lstrip("./")
                    if name.startswith("run/pip/") or name.rsplit("/", 1)[-1] == "pip.conf":
                        found.append(f"{member.name}: {name}")
                    if entry.isfile() and name.endswith(".gguf"):
                        gguf_mtimes["/" + name] = entry.mtime
                    if entry.isfile() and name.rsplit("/", 1)[-1] == "colm-complete.json":
                        cache_keys.append(json.loads(layer.extractfile(entry).read()))
                        continue
                    if entry.isfile():
                        files += 1
                        digest = _sha256(layer.extractfile(entry))
                        if digest in secrets:
                            found.append(f"{member.name}: {name} (= pip context's {secrets[digest]})")
    # The model cache is keyed by the GGUF's mtime in whole seconds; a layer keeps it as stored
    # here, so a pulled image finds its cache only if the two agree.
    stale = [k for k in cache_keys if "mtime" in k and k.get("gguf") in gguf_mtimes
             and k["mtime"] != int(gguf_mtimes[k["gguf"]])]
    return {"ok": not found and not stale and layers > 0, "layers": layers, "files": files,
            "context_files": len(secrets), "found": found, "model_caches": len(cache_keys),
            "caches_keyed_off_the_layer_mtime": stale}


def check_ledgers(work: Path, steps: int, world_size: int) -> dict:
    """The fault tests' ledger checks against the journal, on a copy of the work volume."""
    sys.path.insert(0, str(REPO / "tests"))
    from colm_server.service.journal import Journal
    from fault.test_kills import lineage  # the same definition of a lost or repeated step

    journal = Journal(work / "selector", retention=10**9)  # reads; prunes nothing it would keep
    seen_in_epoch: dict[int, set[str]] = {}
    summary = {"journal": [journal.first_step, journal.last_step], "ranks": {}}
    problems = []
    for rank in range(world_size):
        entries = [json.loads(line) for line in
                   (work / "trainer" / f"ledger-rank{rank}.jsonl").read_text().splitlines()]
        try:
            survived = lineage(entries)
        except AssertionError as exc:
            problems.append(f"rank {rank}: {exc}")
            continue
        lost = sorted(set(range(steps)) - set(survived))
        mismatched = []
        for step, entry in survived.items():
            batch = journal.read(step, rank)
            if entry["ids"] != batch.ids or entry["weights"] != batch.weights:
                mismatched.append(step)
            ids = seen_in_epoch.setdefault(batch.epoch, set())
            problems += [f"rank {rank} step {step}: {i} drawn twice in epoch {batch.epoch}"
                         for i in sorted(ids & set(batch.ids))]
            ids.update(batch.ids)
        starts = []
        for e in entries:
            if not starts or starts[-1][0] != e["run"]:
                starts.append((e["run"], e["start"]))
        summary["ranks"][rank] = {"entries": len(entries), "steps": len(survived),
                                  "retrained": len(entries) - len(survived),
                                  "processes": len(starts), "starts": [s for _, s in starts],
                                  "lost": lost, "not_on_journaled_batch": mismatched}
        problems += [f"rank {rank}: step {s} never trained" for s in lost]
        problems += [f"rank {rank}: step {s} trained on another batch than the journal's" for s in mismatched]
    summary["problems"] = problems
    summary["ok"] = not problems
    return summary


# What the checks import beyond the standard library: the ledger check's modules (the project and
# its test suite's fault tests, hence torch and pytest) and pip, which docker/pip_context.py runs.
NEEDS = ("colm_server.service.journal", "fault.test_kills", "pip")


def preflight() -> str:
    """One line on this Python; raises ImportError naming the first module it cannot import."""
    sys.path.insert(0, str(REPO / "tests"))
    for module in NEEDS:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any failure to import is what this reports
            raise ImportError(f"cannot import {module} ({type(exc).__name__}: {exc})") from exc
    return f"{sys.executable} (Python {platform.python_version()}) imports what the checks need"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="check", required=True)
    layers = sub.add_parser("layers", help="a `docker save` stream on stdin against a pip context folder")
    layers.add_argument("--context", type=Path, required=True)
    ledgers = sub.add_parser("ledgers", help="a copy of the work volume")
    ledgers.add_argument("work", type=Path)
    ledgers.add_argument("--steps", type=int, required=True)
    ledgers.add_argument("--world-size", type=int, default=2)
    sub.add_parser("preflight", help="whether this Python can run the checks")
    args = p.parse_args(argv)
    if args.check == "preflight":
        try:
            print(preflight())
        except ImportError as exc:
            print(exc, file=sys.stderr)
            raise SystemExit(3) from None
        return
    try:
        if args.check == "layers":
            result = check_layers(sys.stdin.buffer, args.context)
        else:
            result = check_ledgers(args.work, args.steps, args.world_size)
    except Exception as exc:  # noqa: BLE001 - reported as "could not check", never as a failed check
        traceback.print_exc()
        print(f"e2e_check {args.check}: could not check: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(3) from None
    print(json.dumps(result, indent=2))
    raise SystemExit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
