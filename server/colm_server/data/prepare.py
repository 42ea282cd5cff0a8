"""``colm-data``: JSONL files, a saved Hugging Face dataset or the synthetic mixture to WebDataset shards.

Each record becomes a sample ``{__key__, json}`` with ``json`` = ``{id, source, prompt, response}``
(or ``{id, source, text}``), as ``colm_server.data.shards`` expects. Bad lines are logged with file
and line, counted per reason and skipped; ``manifest.json`` in the output folder lists what was written.

Records are shuffled (seeded) before they are sharded. Inputs often come one source after another,
and a reader's shuffle buffer only mixes neighbours, so unshuffled shards would feed training one
or two sources at a time. Inputs larger than memory go through on-disk buckets.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import logging
import math
import os
import random
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import webdataset as wds

from colm_server.data.shards import MANIFEST
from colm_server.data.synthetic import synthetic_stream

logger = logging.getLogger(__name__)

REASONS = ("bad_json", "bad_utf8", "not_object", "missing_id", "missing_source",
           "missing_response", "empty_response", "duplicate_id")


def _rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, parsed object or skip reason) for every non-blank line or dataset row of ``path``."""
    if path.is_dir():
        try:
            import datasets
        except ImportError:
            raise ImportError(f"{path} is a folder: reading a saved Hugging Face dataset needs the "
                              "`datasets` package (pip install datasets)") from None
        loaded = datasets.load_from_disk(str(path))
        splits = [(name, loaded[name]) for name in sorted(loaded)] if isinstance(
            loaded, datasets.DatasetDict) else [("", loaded)]
        for name, split in splits:
            for i, row in enumerate(split):
                yield f"{path}{'/' + name if name else ''}[row {i}]", row
        return
    with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield f"{path}:{n}", "bad_utf8"
            except ValueError:
                yield f"{path}:{n}", "bad_json"


def _canonical(obj: Any, fields: dict[str, str], default_source: str | None) -> dict[str, str] | str:
    """The record in canonical field names, or the reason it cannot be used."""
    if not isinstance(obj, dict):
        return "not_object"
    ident = obj.get(fields["id"])
    if isinstance(ident, int) and not isinstance(ident, bool):
        ident = str(ident)
    if not isinstance(ident, str) or not ident:
        return "missing_id"
    source = obj.get(fields["source"]) or default_source
    if not isinstance(source, str) or not source:
        return "missing_source"
    prompt, response, text = (obj.get(fields[k]) for k in ("prompt", "response", "text"))
    if isinstance(response, str) and response.strip():
        if prompt is not None and not isinstance(prompt, str):
            return "missing_response"  # a prompt that is not text: the record is unusable as a pair
        record = {"id": ident, "source": source, "prompt": prompt or "", "response": response}
    elif isinstance(text, str) and text.strip():
        record = {"id": ident, "source": source, "text": text}
    else:
        return "empty_response" if isinstance(response, str) or isinstance(text, str) else "missing_response"
    try:  # JSON escapes can carry lone surrogates, which the reader skips as bad_utf8
        "".join(record.values()).encode("utf-8")
    except UnicodeEncodeError:
        return "bad_utf8"
    return record


def _key(index: int, ident: str) -> str:
    """A tar key unique by its running index; no dots (webdataset splits there) or slashes."""
    return f"{index:09d}_{re.sub(r'[^A-Za-z0-9_-]+', '_', ident)[:80]}"


def brace_pattern(names: list[str]) -> str:
    """``shard-{000000..000003}.tar`` for consecutive names ``shard-000000.tar`` ... (one name as is)."""
    if len(names) <= 1:
        return names[0] if names else ""
    head, first, last = names[0][:-10], names[0][-10:-4], names[-1][-10:-4]
    return f"{head}{{{first}..{last}}}.tar"


BUCKET_BYTES = 512 << 20  # input bytes per shuffle bucket; one bucket is shuffled in memory at a time


def prepare(inputs: list[Path], out_dir: Path, *, shard_max_records: int = 10000,
            shard_max_bytes: int = 256 << 20, id_field: str = "id", source_field: str = "source",
            prompt_field: str = "prompt", response_field: str = "response", text_field: str = "text",
            default_source: str | None = None, prefix: str = "shard", shuffle_seed: int | None = 0,
            bucket_bytes: int = BUCKET_BYTES) -> dict[str, Any]:
    """Write ``inputs`` as shards in ``out_dir``, shuffled by ``shuffle_seed`` (None: in input
    order); returns the manifest. Of records sharing an id, the first in input order is kept."""
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise ValueError("inputs: give at least one JSONL file or dataset folder")
    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        raise FileNotFoundError(f"inputs: not found: {', '.join(missing)}")
    fields = {"id": id_field, "source": source_field, "prompt": prompt_field,
              "response": response_field, "text": text_field}
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes: must be >= 1, got {bucket_bytes}")
    skipped: Counter[str] = Counter()

    def usable() -> Iterator[dict[str, str]]:
        seen: set[str] = set()
        for path in inputs:
            for where, obj in _rows(path):
                record = obj if isinstance(obj, str) else _canonical(obj, fields, default_source)
                if isinstance(record, str) or record["id"] in seen:
                    reason = record if isinstance(record, str) else "duplicate_id"
                    skipped[reason] += 1
                    logger.warning("skipped (%s): %s", reason, where)
                    continue
                seen.add(record["id"])
                yield record

    records: Iterable[dict[str, str]] = usable()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".shuffle-", dir=out_dir) as scratch:
        if shuffle_seed is not None:
            buckets = max(1, math.ceil(sum(_size(p) for p in inputs) / bucket_bytes))
            records = shuffled(records, random.Random(shuffle_seed), buckets, Path(scratch))
        manifest = write_shards(records, out_dir, shard_max_records=shard_max_records,
                                shard_max_bytes=shard_max_bytes, prefix=prefix, skipped=skipped,
                                inputs=[str(p) for p in inputs], extra={"shuffle_seed": shuffle_seed})
    return manifest


def _size(path: Path) -> int:
    """Bytes on disk of an input file or dataset folder (compressed input counted 4x)."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size * (4 if path.suffix == ".gz" else 1)


def shuffled(records: Iterable[dict[str, str]], rng: random.Random, buckets: int,
             scratch: Path) -> Iterator[dict[str, str]]:
    """``records`` in a uniformly random order. With one bucket in memory; with more, each record
    first goes to a random bucket file under ``scratch``, then each bucket is shuffled in memory."""
    if buckets == 1:
        rows = list(records)
        rng.shuffle(rows)
        yield from rows
        return
    paths = [scratch / f"bucket-{i:05d}.jsonl" for i in range(buckets)]
    files = [open(p, "w", encoding="utf-8", newline="\n") for p in paths]
    try:
        for record in records:
            files[rng.randrange(buckets)].write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        for f in files:
            f.close()
    for path in paths:
        # split on "\n" alone: json escapes it, but not U+2028 and the others splitlines() splits on
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]
        os.remove(path)
        rng.shuffle(rows)
        yield from rows


def write_shards(records: Iterable[dict[str, str]], out_dir: Path, *, shard_max_records: int = 10000,
                 shard_max_bytes: int = 256 << 20, prefix: str = "shard",
                 skipped: Counter[str] | None = None, inputs: list[str] | None = None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write canonical records (``{id, source, prompt, response}`` or ``{id, source, text}``) in order.

    A repeated id is skipped and counted in ``skipped`` as ``duplicate_id``; ``manifest.json`` is
    written beside the shards and returned, with ``extra`` keys added.
    """
    out_dir = Path(out_dir)
    if shard_max_records < 1 or shard_max_bytes < 1:
        raise ValueError("shard_max_records and shard_max_bytes must be >= 1")
    if not prefix or not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise ValueError(f"prefix: letters, digits, '_' and '-' only, got {prefix!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    skipped = Counter() if skipped is None else skipped
    sources: Counter[str] = Counter()
    per_shard: list[int] = []
    seen: set[str] = set()
    source_runs, last_source = 0, None  # runs of consecutive records of one source, in write order
    writer = None
    try:
        for record in records:
            if record["id"] in seen:
                skipped["duplicate_id"] += 1
                logger.warning("skipped (duplicate_id): %s", record["id"])
                continue
            seen.add(record["id"])
            if writer is None:  # opened lazily: no input record, no empty shard
                writer = wds.ShardWriter(str(out_dir / f"{prefix}-%06d.tar"), maxcount=shard_max_records,
                                         maxsize=shard_max_bytes, verbose=0)
            shard_before = writer.shard
            writer.write({"__key__": _key(len(seen) - 1, record["id"]),
                          "json": json.dumps(record, ensure_ascii=False).encode("utf-8")})
            if writer.shard != shard_before or not per_shard:
                per_shard.append(0)
            per_shard[-1] += 1
            sources[record["source"]] += 1
            source_runs += record["source"] != last_source
            last_source = record["source"]
    finally:
        if writer is not None:
            writer.close()
    names = [f"{prefix}-{i:06d}.tar" for i in range(len(per_shard))]
    stale = sorted(p.name for p in out_dir.glob(f"{prefix}-[0-9]*.tar") if p.name not in names)
    if stale:
        logger.warning("%s also holds shards not written now (not in the manifest): %s", out_dir, stale)
    pattern = brace_pattern(names)
    manifest = {
        "total": sum(per_shard), "shards": names, "records_per_shard": per_shard,
        "sources": dict(sorted(sources.items())), "source_runs": source_runs,
        "skipped": dict(sorted(skipped.items())),
        "pattern": pattern, "urls": str(out_dir.resolve() / pattern) if names else "",
        "inputs": list(inputs or []), **(extra or {}),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None, prog: str = "colm-data") -> int:
    """``colm-data prepare INPUT... --out DIR`` or ``colm-data synthetic --out DIR``: shards and a summary."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="convert JSONL files / saved HF datasets to WebDataset shards")
    p.add_argument("inputs", nargs="+", type=Path, help="JSONL (.jsonl, .jsonl.gz) or dataset folders")
    syn = sub.add_parser("synthetic", help="write the built-in synthetic mixture (8 tasks, 48x imbalance)")
    syn.add_argument("--records", type=int, default=20000, help="records to generate")
    syn.add_argument("--seed", type=int, default=0, help="seed of the generator")
    for q in (p, syn):
        q.add_argument("--out", required=True, type=Path, help="folder for the shards and manifest.json")
        q.add_argument("--shard-records", type=int, default=10000, help="records per shard at most")
        q.add_argument("--shard-mb", type=float, default=256, help="MiB per shard at most")
        q.add_argument("--prefix", default="shard", help="shard file name prefix")
    for name in ("id", "source", "prompt", "response", "text"):
        p.add_argument(f"--{name}-field", default=name, help=f"input key holding the {name}")
    p.add_argument("--default-source", help="source for records that have none")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle before sharding")
    p.add_argument("--no-shuffle", action="store_true", help="write records in input order")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    limits = {"shard_max_records": args.shard_records, "prefix": args.prefix,
              "shard_max_bytes": max(1, int(args.shard_mb * (1 << 20)))}
    if args.command == "synthetic":
        if args.records < 1:
            parser.error(f"--records: must be >= 1, got {args.records}")
        records = itertools.islice(synthetic_stream(args.seed), args.records)
        manifest = write_shards(records, args.out, inputs=[f"synthetic(seed={args.seed})"], **limits)
    else:
        manifest = prepare(
            args.inputs, args.out, id_field=args.id_field, source_field=args.source_field,
            prompt_field=args.prompt_field, response_field=args.response_field, text_field=args.text_field,
            default_source=args.default_source, shuffle_seed=None if args.no_shuffle else args.seed,
            **limits)
    print(f"records: {manifest['total']} in {len(manifest['shards'])} shard(s) under {args.out}")
    print("sources: " + ", ".join(f"{s}={n}" for s, n in manifest["sources"].items()))
    print(f"skipped: {sum(manifest['skipped'].values())} {manifest['skipped'] or ''}".rstrip())
    if manifest["urls"]:
        print(f"data.urls: {manifest['urls']}  (or {Path(args.out).resolve() / MANIFEST})")
    return 0 if manifest["total"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
