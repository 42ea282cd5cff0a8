"""Training records from sharded WebDataset streams: seeded epochs, bad input skipped, exact resume.

A shard is a .tar (local path, ``file:``, ``pipe:`` command or http URL) whose samples hold a
``json`` member ``{id, source, prompt, response}`` (or ``text`` instead of prompt/response).
Every epoch reads each sample at most once, in an order seeded by (seed, epoch); a resume is exact.

With ``colm-data`` manifests as ``urls`` (every pattern one that lists ``records_per_shard``),
each shard's record count is known, and the order of epoch ``e`` is a pure function of (seed, e,
the record counts): a seeded permutation of the shards, and within each shard a seeded
permutation of its record positions (the whole shard is the shuffle buffer). A position counts
raw samples of the shard, malformed ones included, so the cursor is (epoch, positions passed)
and a resume opens only the shard it stopped in and reads at most that shard. Ids are checked
for duplicates within a shard; colm-data writes them unique across its manifest. A shard that
ends before the count listed for it is counted once as ``truncated_tar`` (or ``read_error``);
samples past that count are not read.

With plain URL patterns the record counts are unknown: the shard order and a shuffle buffer that
mixes across shards are seeded by (seed, e), ids are checked for duplicates over the whole epoch,
and a resume replays the epoch's order and drops the records already yielded, so it costs a
re-read of that epoch's prefix.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import braceexpand
import webdataset as wds
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from colm_server.typed import check_types

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"  # written by colm-data beside its shards
REASONS = (
    "bad_json", "bad_utf8", "missing_field", "too_large", "missing_json",
    "duplicate_id", "truncated_tar", "read_error",
)


@dataclass(kw_only=True)
class ShardConfig:
    """Where the shards are, how an epoch is ordered, and what a valid record looks like."""

    urls: str | list[str] = field(metadata={
        "help": "shard URL patterns, brace-expanded (s-{000..009}.tar), or a manifest.json of colm-data"})
    seed: int = field(default=0, metadata={"help": "seeds each epoch's shard order and shuffle buffer"})
    shuffle_shards: bool = field(default=True, metadata={"help": "permute the shard order every epoch"})
    buffer: int = field(default=1000, metadata={
        "help": "sample shuffle buffer, in records; 0 = no shuffle; with a manifest, any other value "
                "shuffles each shard whole"})
    id_field: str = field(default="id", metadata={"help": "JSON key of the unique sample id"})
    source_field: str = field(default="source", metadata={"help": "JSON key of the sample's source dataset"})
    prompt_field: str = field(default="prompt", metadata={"help": "JSON key of the prompt (may be empty)"})
    response_field: str = field(default="response", metadata={"help": "JSON key of the response"})
    text_field: str = field(
        default="text", metadata={"help": "JSON key of plain text, used as the response when there is none"}
    )
    allow_pipe: bool = field(
        default=False, metadata={"help": "allow pipe: URLs, which run shell commands; off for safety"}
    )
    max_record_bytes: int = field(
        default=1 << 20, metadata={"help": "json members larger than this are skipped as too_large"}
    )

    def __post_init__(self) -> None:
        check_types(self)
        patterns = [self.urls] if isinstance(self.urls, str) else self.urls
        if not all(p.strip() for p in patterns):
            raise ValueError(f"urls: must be a non-empty string or a list of them, got {self.urls!r}")
        try:
            shards = expand_urls(self.urls)
        except braceexpand.UnbalancedBracesError as exc:  # name the key, as every other refusal does
            raise ValueError(f"urls: {exc}") from None
        if not shards:
            raise ValueError("urls: expands to no shard")
        if not self.allow_pipe and any(u.lstrip().startswith("pipe:") for u in shards):
            raise ValueError("urls: a pipe: URL runs a shell command; set allow_pipe=True to allow it")
        if self.buffer < 0:
            raise ValueError(f"buffer: must be >= 0, got {self.buffer}")
        if self.max_record_bytes < 1:
            raise ValueError(f"max_record_bytes: must be >= 1, got {self.max_record_bytes}")
        for name in ("id_field", "source_field", "prompt_field", "response_field", "text_field"):
            if not getattr(self, name):
                raise ValueError(f"{name}: must be a non-empty string, got ''")
        manifest_counts(self.urls)  # a manifest whose counts do not match its shards is refused here


MAX_SHARDS = 1_000_000  # a pattern that spells out more is almost surely a typo, and costs memory


def expand_urls(urls: str | list[str]) -> list[str]:
    """The shard list: every pattern brace-expanded, and every manifest.json its shards, in order.

    Raises ValueError past MAX_SHARDS shards, found lazily so ``{0..99999999}`` fails at once.
    """
    patterns = [urls] if isinstance(urls, str) else urls
    shards = itertools.chain.from_iterable(_manifest_shards(p) if p.endswith(MANIFEST)
                                           else braceexpand.braceexpand(p) for p in patterns)
    listed = list(itertools.islice(shards, MAX_SHARDS + 1))
    if len(listed) > MAX_SHARDS:
        raise ValueError(f"urls: expands to more than {MAX_SHARDS:,} shards")
    return listed


def manifest_sources(urls: str | list[str]) -> dict[str, int] | None:
    """Records per source over the manifests ``urls`` names; None unless every pattern is one."""
    patterns = [urls] if isinstance(urls, str) else urls
    if not patterns or not all(p.endswith(MANIFEST) for p in patterns):
        return None
    total: dict[str, int] = {}
    for path in patterns:
        sources = json.loads(Path(path).read_text()).get("sources")
        if not isinstance(sources, dict):
            return None
        for source, n in sources.items():
            total[str(source)] = total.get(str(source), 0) + int(n)
    return total


def unshuffled_manifests(urls: str | list[str]) -> list[str]:
    """The manifests among ``urls`` whose shards were written in input order (``--no-shuffle``, or
    by a colm-data that did not shuffle) and hold their records grouped by source, or may: those
    written before colm-data counted the order's runs of one source (``source_runs``)."""
    patterns = [urls] if isinstance(urls, str) else urls
    out = []
    for path in (p for p in patterns if p.endswith(MANIFEST)):
        try:
            manifest = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue  # unreadable manifests are refused where the shard list is read
        if isinstance(manifest, dict) and manifest.get("shuffle_seed") is None and _grouped(manifest):
            out.append(path)
    return out


def _grouped(manifest: dict) -> bool:
    """Whether the records come in fewer than half the runs of one source that a random order of the
    same per-source counts has on average, ``1 + (n^2 - sum n_s^2) / n``; True when not recorded."""
    runs, sources = manifest.get("source_runs"), manifest.get("sources")
    if not isinstance(runs, int) or not isinstance(sources, dict):
        return True
    counts = [int(c) for c in sources.values()]
    n = sum(counts)
    return n > 0 and 2 * runs < 1 + (n * n - sum(c * c for c in counts)) / n


def manifest_counts(urls: str | list[str]) -> list[int] | None:
    """Records per shard, in the order of ``expand_urls``; None unless every pattern is a manifest
    that lists them (``records_per_shard``, written by colm-data)."""
    patterns = [urls] if isinstance(urls, str) else urls
    if not patterns or not all(p.endswith(MANIFEST) for p in patterns):
        return None
    counts: list[int] = []
    for path in patterns:
        try:
            manifest = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"urls: cannot read manifest {path!r}: {exc}") from exc
        if not isinstance(manifest, dict) or "records_per_shard" not in manifest:
            return None
        per_shard, names = manifest["records_per_shard"], manifest.get("shards")
        if not (isinstance(per_shard, list) and isinstance(names, list) and len(per_shard) == len(names)
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in per_shard)):
            raise ValueError(f"urls: manifest {path!r}: 'records_per_shard' must hold one count >= 0 "
                             "per shard")
        counts.extend(per_shard)
    return counts


def _manifest_shards(path: str) -> list[str]:
    """The shards a ``colm-data`` manifest lists, as paths beside it."""
    try:
        manifest = json.loads(Path(path).read_text())
        names = manifest["shards"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"urls: cannot read the shard list of manifest {path!r}: {exc}") from exc
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"urls: manifest {path!r}: 'shards' must be a list of file names")
    return [str(Path(path).parent / name) for name in names]


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """Shard indices in the order epoch ``epoch`` reads them: a permutation seeded by (seed, epoch)."""
    order = list(range(num_shards))
    if shuffle:  # a str seed is hashed with sha512: stable across processes and Python versions
        random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    return order


def record_order(num_records: int, seed: int, epoch: int, shard: int, shuffle: bool = True) -> list[int]:
    """Record positions of shard ``shard`` in the order epoch ``epoch`` reads them: a permutation
    seeded by (seed, epoch, shard), or file order."""
    order = list(range(num_records))
    if shuffle:
        random.Random(f"records:{seed}:{epoch}:{shard}").shuffle(order)
    return order


class BadRecord(ValueError):
    """A record that cannot be used; ``reason`` is its skip counter."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _nonempty(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def parse_record(data: bytes, config: ShardConfig) -> dict[str, str]:
    """A json member as ``{id, source, prompt, response}``; raises BadRecord(reason) when unusable."""
    if len(data) > config.max_record_bytes:
        raise BadRecord("too_large")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRecord("bad_utf8") from None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):  # deep nesting overflows the parser: bad JSON, not a crash
        raise BadRecord("bad_json") from None
    if not isinstance(obj, dict):
        raise BadRecord("bad_json")
    ident = obj.get(config.id_field)
    if isinstance(ident, int) and not isinstance(ident, bool):
        ident = str(ident)
    prompt, response = obj.get(config.prompt_field), obj.get(config.response_field)
    prompt = "" if prompt is None else prompt  # only null is no prompt: 0, false or [] are not text
    if not _nonempty(response):  # plain-text record: all of it is trained on
        prompt, response = "", obj.get(config.text_field)
    record = {"id": ident, "source": obj.get(config.source_field), "prompt": prompt, "response": response}
    if not (_nonempty(ident) and _nonempty(record["source"]) and _nonempty(response)
            and isinstance(prompt, str)):
        raise BadRecord("missing_field")
    try:  # JSON escapes can smuggle in lone surrogates, which no tokenizer or protobuf accepts
        "".join(record.values()).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRecord("bad_utf8") from None
    return record


def _sample_key(name: str) -> tuple[str, str]:
    """webdataset's (key, extension) of a member; a name without extension is a sample of its own.

    webdataset drops such members without a trace; kept, they are counted as missing_json.
    """
    key, extension = base_plus_ext(name)
    return (name, "") if key is None else (key, extension)


def _until_failure(files: Iterator[dict], failures: list[Exception]) -> Iterator[dict]:
    """The members until reading fails; the failure goes to ``failures`` instead of propagating.

    Ending cleanly lets group_by_keys hand over the complete sample it holds before the failure.
    """
    try:
        yield from files
    except Exception as exn:  # re-raised by the caller once the samples before it are out
        failures.append(exn)


def _failure_reason(exn: Exception, samples_read: int) -> str:
    """truncated_tar when a tar stream ends early, read_error for anything else (not a tar, I/O)."""
    message = str(exn.args[0]) if exn.args else ""
    if isinstance(exn, EOFError) or (
        isinstance(exn, tarfile.ReadError)
        and (samples_read > 0 or "end of data" in message or "truncated" in message)
    ):
        return "truncated_tar"
    return "read_error"


@dataclass(frozen=True)
class _ShardFailure:
    """Why a shard could not be read to its end: handed over after its last readable sample."""

    reason: str
    detail: str


_Outcome = dict | tuple  # a record, or (skip reason, sample key, detail)


class ShardStream:
    """Endless iterator of records ``{id, source, prompt, response, epoch}`` over seeded epochs.

    Implements the Stateful contract. With manifests (record counts known), ``state_dict()`` is
    (epoch, cursor: positions of the epoch's order passed, records yielded, skip counters) and
    ``load_state_dict`` opens only the shard the cursor is in. With plain URL patterns it is
    (epoch, records yielded, skip counters), ``load_state_dict`` replays the epoch's prefix, and the
    ids seen in the current epoch are held in memory to drop duplicates. One reader: no split
    across workers.
    """

    def __init__(self, config: ShardConfig):
        self.config = config
        self.shards = expand_urls(config.urls)
        self.counts = manifest_counts(config.urls)  # records per shard, or None: not known
        self._epoch = 0
        self._position = 0
        self._cursor = 0
        self._skipped: Counter[str] = Counter()
        self._records: Iterator[dict | None] | None = None
        self._replaying = False
        self._replayed_epoch: int | None = None  # resumed from a state without cursor: its order

    @property
    def skipped(self) -> dict[str, int]:
        """Records (or shards, for read errors) skipped so far, per reason."""
        return dict(self._skipped)

    @property
    def epoch(self) -> int:
        """The current epoch (0-based); it advances when a record of the next epoch is asked for."""
        return self._epoch

    @property
    def position(self) -> int:
        """Records yielded so far in the current epoch."""
        return self._position

    @property
    def cursor(self) -> int:
        """Positions of the current epoch's order passed so far: records yielded and skipped
        (with record counts; without them, records yielded)."""
        return self._cursor

    def __iter__(self) -> ShardStream:
        return self

    def __next__(self) -> dict:
        if self._records is None:
            self._records = self._epoch_records(self._epoch, self._cursor)
        for record in self._records:
            self._cursor += 1
            if record is None:  # a position whose sample was skipped
                continue
            self._position += 1
            return {**record, "epoch": self._epoch}
        if self._position == 0:
            raise RuntimeError(
                f"no valid record in {len(self.shards)} shard(s) ({self.shards[0]} ...); "
                f"skipped: {self.skipped}"
            )
        self._epoch, self._position, self._cursor, self._records = self._epoch + 1, 0, 0, None
        return next(self)

    def take(self, n: int) -> list[dict]:
        """The next ``n`` records, crossing epoch boundaries as needed."""
        return [next(self) for _ in range(n)]

    def state_dict(self) -> dict[str, Any]:
        """The cursor: epoch, positions passed (with record counts), records yielded, skip counters,
        and a fingerprint of the order."""
        if self._indexed(self._epoch):
            return {"epoch": self._epoch, "cursor": self._cursor, "position": self._position,
                    "skipped": self.skipped, "fingerprint": self._fingerprint(indexed=True)}
        return {"epoch": self._epoch, "position": self._position, "skipped": self.skipped,
                "fingerprint": self._fingerprint(indexed=False)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a cursor from ``state_dict``.

        A state with a cursor (record counts known) opens the shard the cursor is in on the next
        read. A state without one (plain URL patterns, or saved before record counts were used)
        re-reads the epoch up to ``position`` records, in the order it was saved in; with record
        counts, the epochs after it are ordered by them.
        """
        if "cursor" in state:
            self._load_cursor(state)
            return
        if state.get("fingerprint") != self._fingerprint(indexed=False):
            raise ValueError("state_dict: saved by a stream with other shards or order settings")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or position < 0:
            raise ValueError(f"state_dict: epoch and position must be >= 0, got {epoch}, {position}")
        self._epoch, self._position, self._cursor = epoch, 0, 0
        self._replayed_epoch = epoch if self.counts is not None and position > 0 else None
        if self._replayed_epoch is not None:
            logger.info("resuming epoch %d from a state without cursor: re-reading %d records in its "
                        "order; later epochs follow the manifest's record counts", epoch, position)
        self._records = self._epoch_records(epoch, 0)
        self._replaying = True
        try:
            for _ in range(position):
                if next(self._records, None) is None:
                    raise ValueError(f"state_dict: epoch {epoch} now has {self._position} records, "
                                     f"fewer than the saved position {position}; did the shards change?")
                self._position += 1
                self._cursor += 1
        finally:
            self._replaying = False
        self._skipped = Counter(state.get("skipped", {}))

    def _load_cursor(self, state: dict[str, Any]) -> None:
        if self.counts is None:
            raise ValueError("state_dict: saved by a stream that read each shard's record count from "
                             "colm-data manifests; set data.urls to the same manifest.json file(s) to resume")
        if state.get("fingerprint") != self._fingerprint(indexed=True):
            raise ValueError("state_dict: saved by a stream with other shards, record counts or order "
                             "settings")
        epoch, cursor, position = int(state["epoch"]), int(state["cursor"]), int(state["position"])
        total = sum(self.counts)
        if epoch < 0 or not 0 <= position <= cursor <= total:
            raise ValueError(f"state_dict: need epoch >= 0 and 0 <= position <= cursor <= {total} "
                             f"(records per epoch), got {epoch}, {position}, {cursor}")
        self._epoch, self._cursor, self._position = epoch, cursor, position
        self._records, self._replayed_epoch = None, None  # opened lazily, by the next record asked for
        self._skipped = Counter(state.get("skipped", {}))

    def _indexed(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` is ordered by the record counts (else by the shuffle buffer)."""
        return self.counts is not None and epoch != self._replayed_epoch

    def _fingerprint(self, indexed: bool) -> str:
        """What the order depends on; the shard count, not the URLs, so moved shards still resume."""
        key: dict[str, Any] = {**asdict(self.config), "urls": len(self.shards)}
        if indexed:
            key.update(records_per_shard=self.counts, order="positions")
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def _skip(self, reason: str, url: str, key: str | None, detail: object = "") -> None:
        self._skipped[reason] += 1
        if not self._replaying:
            logger.warning("skipped (%s): shard %s key %s %s", reason, url, key or "-", detail)

    def _epoch_records(self, epoch: int, cursor: int) -> Iterator[dict | None]:
        """Epoch ``epoch`` from position ``cursor`` (with record counts; else from its start)."""
        if self._indexed(epoch):
            return self._positions(epoch, cursor)
        cfg = self.config
        order = shard_order(len(self.shards), cfg.seed, epoch, cfg.shuffle_shards)
        records = self._unique_records(self.shards[i] for i in order)
        if cfg.buffer > 0:
            rng = random.Random(f"buffer:{cfg.seed}:{epoch}")
            records = wds.filters.shuffle(bufsize=cfg.buffer, initial=cfg.buffer, rng=rng)(records)
        return iter(records)

    def _positions(self, epoch: int, cursor: int) -> Iterator[dict | None]:
        """One item per position of the epoch's order from ``cursor`` on: its record, or None."""
        assert self.counts is not None
        cfg, start = self.config, 0
        for shard in shard_order(len(self.shards), cfg.seed, epoch, cfg.shuffle_shards):
            n = self.counts[shard]
            if cursor < start + n:  # skipping whole shards costs no read
                order = record_order(n, cfg.seed, epoch, shard, cfg.buffer > 0)
                yield from self._shard_in_order(self.shards[shard], order, max(0, cursor - start))
            start += n

    def _shard_in_order(self, url: str, order: list[int], first: int) -> Iterator[dict | None]:
        """Positions ``order[first:]`` of one shard: each its record, or None once it is counted.

        The shard is read once, front to back; a record read before its turn waits in memory, one
        whose turn came before ``first`` (yielded before a resume) is dropped. A skip is counted
        when its position's turn comes, so the counts match the cursor wherever it is.
        """
        n = len(order)
        turn = [0] * n  # turn[position] = index in order
        for k, position in enumerate(order):
            turn[position] = k
        waiting: dict[int, _Outcome] = {}
        seen: set[str] = set()
        read, ended, failure, missing_counted = 0, False, None, False
        samples = self._shard_samples(url)
        try:
            for k in range(first, n):
                position = order[k]
                while read <= position and not ended:
                    sample = next(samples, None)
                    if sample is None or isinstance(sample, _ShardFailure):
                        ended, failure = True, sample
                        break
                    outcome = self._check(sample, seen)
                    if turn[read] >= first:
                        waiting[read] = outcome
                    read += 1
                if position < read:
                    outcome = waiting.pop(position)
                    if isinstance(outcome, dict):
                        yield outcome
                        continue
                    self._skip(outcome[0], url, outcome[1], outcome[2])
                elif not missing_counted:  # the first position past the shard's end, in turn order
                    missing_counted = True
                    if min(turn[read:]) >= first:  # not met before a resume at ``first``
                        reason = failure.reason if failure else "truncated_tar"
                        detail = failure.detail if failure else f"{read} of the manifest's {n} samples"
                        self._skip(reason, url, None, detail)
                yield None
            if read == n and not ended and isinstance(next(samples, None), dict):
                logger.warning("shard %s holds more than the %d samples its manifest lists; the rest "
                               "are not read", url, n)
        finally:
            samples.close()

    def _check(self, sample: dict, seen: set[str]) -> _Outcome:
        """The sample's record, or (reason, key, detail) why it is skipped; ``seen`` ids are duplicates."""
        key = sample.get("__key__")
        if "json" not in sample:
            return "missing_json", key, sorted(k for k in sample if not k.startswith("__"))
        try:
            record = parse_record(sample["json"], self.config)
        except BadRecord as bad:
            return bad.reason, key, ""
        if record["id"] in seen:
            return "duplicate_id", key, record["id"]
        seen.add(record["id"])
        return record

    def _unique_records(self, urls: Iterator[str]) -> Iterator[dict]:
        seen: set[str] = set()
        for url in urls:
            for sample in self._shard_samples(url):
                if isinstance(sample, _ShardFailure):
                    self._skip(sample.reason, url, None, sample.detail)
                    continue
                outcome = self._check(sample, seen)
                if isinstance(outcome, dict):
                    yield outcome
                else:
                    self._skip(outcome[0], url, outcome[1], outcome[2])

    def _shard_samples(self, url: str) -> Iterator[dict | _ShardFailure]:
        """Samples of one shard, then a _ShardFailure if reading it failed (the rest is not read)."""
        stream, count, failures, failure = None, 0, [], None
        try:
            stream = wds.gopen(url)
            files = tar_file_expander([{"url": url, "stream": stream}], eof_value=None)
            for sample in group_by_keys(_until_failure(files, failures), keys=_sample_key):
                count += 1
                yield sample
            if failures:  # the sample read last before a failure is yielded first, not lost
                raise failures[0]
            stream.close()  # a pipe: command reports a failed exit status here
        except Exception as exn:  # any failure of one shard must not end the stream
            reason = "read_error" if stream is None else _failure_reason(exn, count)
            message = exn.args[0] if exn.args and isinstance(exn.args[0], str) else str(exn)
            failure = _ShardFailure(reason, f"{type(exn).__name__}: {message}")
        finally:
            if stream is not None:
                try:
                    stream.close()
                except Exception:  # already abandoned (error or interrupted); nothing to add
                    pass
        if failure is not None:
            yield failure
