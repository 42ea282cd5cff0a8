"""Malformed shards: every bad record is skipped and counted by reason, and the selector keeps serving.

A corpus of broken shards is written at test time, good records interleaved with bad ones. Reading
it must yield exactly the good records, count each bad one under its reason (``REASONS``), and
never raise; a real selector serving it must keep dealing batches and report the same counts.

Where the tar format itself hides what was lost, the test says so and asserts what happens:

- a shard cut on a member boundary, or inside a header after the first member, reads as a complete
  tar (tarfile accepts a tar stream without its end-of-archive blocks): the cut-off records vanish
  and nothing is counted, unless a manifest lists the shard's record count (then it is a
  ``truncated_tar``);
- bytes that are not a tar header after a valid member end the shard the same way;
- a member name repeated inside one sample makes webdataset refuse the rest of the shard: one
  ``read_error``; the sample holding the repeated name and every sample after it are not read;
- webdataset keys a sample by the member name up to its first dot, so ``m.extra.json`` joins
  sample ``m`` as an extra member (its record is not read) and ``k.v1.json`` is a sample ``k``
  without a ``json`` member.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter
from dataclasses import dataclass, field

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from colm_server.data.shards import REASONS, ShardConfig, ShardStream
from colm_server.service.server import SelectorServer
from colm_wire.proto import selector_pb2 as pb
from colm_wire.proto import selector_pb2_grpc as pb_grpc
from test_service import B, L, W, make_config, take_all, target

from .conftest import fuzz

MAX_RECORD_BYTES = 16384


def rec(ident: object, source: str = "alpha", **fields: object) -> dict:
    """A record; ``fields`` override or add keys, a value of ``...`` removes the key."""
    out = {"id": ident, "source": source, "prompt": f"question {ident}", "response": f"answer {ident}",
           **fields}
    return {k: v for k, v in out.items() if v is not ...}


def dumps(obj: object) -> bytes:
    return json.dumps(obj).encode()


@dataclass
class Member:
    """One tar member and what reading it must give: a record id, or a skip reason, or None."""

    name: str
    data: bytes | None  # None: a directory entry
    outcome: str | None  # a good record's id, a reason from REASONS, or None (not counted)


def good(ident: str, name: str | None = None, **fields: object) -> Member:
    return Member(name or f"{ident}.json", dumps(rec(ident, **fields)), ident)


def bad(reason: str, name: str, data: bytes | dict) -> Member:
    assert reason in REASONS
    return Member(name, dumps(data) if isinstance(data, dict) else data, reason)


def tar_bytes(members: list[Member]) -> bytes:
    """The members as an uncompressed tar, in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            if m.data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(m.data)
                tar.addfile(info, io.BytesIO(m.data))
    return buf.getvalue()


def offsets(data: bytes) -> list[tuple[int, int, int]]:
    """``(header offset, data offset, size)`` of every member of a complete tar."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.offset, m.offset_data, m.size) for m in tar.getmembers()]


@dataclass
class Shard:
    """One file of the corpus (None: not written) and what reading it must give."""

    data: bytes | None
    good: list[str]
    skipped: Counter = field(default_factory=Counter)


def members_shard(members: list[Member]) -> Shard:
    """A well-formed tar whose members each have their own outcome."""
    return Shard(tar_bytes(members), [m.outcome for m in members if m.outcome and m.outcome not in REASONS],
                 Counter(m.outcome for m in members if m.outcome in REASONS))


# Records by kind. Ids are unique across the corpus except where a duplicate is the point.
BAD_JSON = [
    bad("bad_json", "broken.json", b"{not json"),
    bad("bad_json", "empty.json", b""),
    bad("bad_json", "array.json", b"[1, 2]"),
    bad("bad_json", "string.json", b'"just text"'),
    bad("bad_json", "number.json", b"42"),
    bad("bad_json", "null.json", b"null"),
    bad("bad_json", "bom.json", b"\xef\xbb\xbf" + dumps(rec("bom"))),  # json.loads refuses a BOM
    bad("bad_json", "deep.json", b"[" * 3000 + b"]" * 3000),  # deeper than Python's recursion limit
    bad("bad_json", "hugeint.json", b'{"id": ' + b"9" * 5000 + b', "source": "a", "response": "r"}'),
]
BAD_UTF8 = [
    bad("bad_utf8", "latin1.json", b'{"id": "l1", "source": "alpha", "response": "caf\xe9"}'),
    bad("bad_utf8", "ff.json", b'{"id": "u1", "source": "alpha", "response": "\xff\xfe"}'),
    bad("bad_utf8", "overlong.json", b'{"id": "u2", "source": "alpha", "response": "\xc0\xaf"}'),
    bad("bad_utf8", "surrogate.json", b'{"id": "u3", "source": "alpha", "response": "\\ud800"}'),
]
TOO_LARGE = [bad("too_large", "big.json", rec("big", response="x" * (MAX_RECORD_BYTES + 1)))]
MISSING_JSON = [
    bad("missing_json", "as-text.txt", rec("as-text")),
    bad("missing_json", "as-lines.jsonl", rec("as-lines")),
    bad("missing_json", "as-gzip.json.gz", rec("as-gzip")),
    bad("missing_json", "noextension", rec("noextension")),
    bad("missing_json", "k.v1.json", rec("dotted")),  # sample "k" whose member is "v1.json"
]
MISSING_FIELD = [
    bad("missing_field", f"{name}.json", data) for name, data in {
        "no-id": rec(..., id=...), "no-source": rec("ns", source=...),
        "no-response": rec("nr", response=...), "empty-response": rec("er", response=""),
        "empty-id": rec(""), "empty-source": rec("es", source=""),
        "float-id": rec(1.5), "bool-id": rec(True), "list-id": rec(["l"]), "null-id": rec(None),
        "dict-id": rec({"a": 1}), "number-source": rec("n1", source=3), "null-source": rec("n2", source=None),
        "list-source": rec("n3", source=["a"]), "number-response": rec("n4", response=5),
        "list-response": rec("n5", response=["a"]), "null-response": rec("n6", response=None),
        "number-prompt": rec("n7", prompt=5), "zero-prompt": rec("n8", prompt=0),
        "empty-list-prompt": rec("n9", prompt=[]), "false-prompt": rec("n10", prompt=False),
        "dict-prompt": rec("n11", prompt={"a": 1}), "number-text": rec("n12", response=..., text=7),
    }.items()
]
GOOD = [
    good("g-plain"),
    good("g-extra", meta={"lang": "en", "tags": [1, 2]}, score=0.5, nested=None),  # unknown keys are fine
    good("g-null-prompt", prompt=None),  # null prompt: no prompt
    good("g-text-only", prompt=..., response=..., text="plain text, all of it trained on"),
    good("g-empty-response-text", response="", text="the text stands in for the response"),
    good("g-unicode", prompt="¿Qué es 2+2? 二加二", response="4 ✓ 😀"),
    good("g-special", prompt="<s></s><pad>", response="<pad> </s>"),  # special-token text is text
    good("g-space", response=" "),
    good("g-caps", name="CAPS.JSON"),  # webdataset lowercases extensions
    good("g-dir-dots", name="v1.2/record.json"),  # dots in a folder name are fine
    Member("7.json", dumps(rec(7)), "7"),  # an integer id is read as its decimal text
    Member("minus.json", dumps(rec(-3)), "-3"),
]


def interleave(goods: list[Member], bads: list[Member]) -> list[Member]:
    """Alternate good and bad members, the longer list's rest at the end."""
    out = [m for pair in zip(goods, bads) for m in pair]
    return out + goods[len(bads):] + bads[len(goods):]


def three_records(prefix: str) -> tuple[bytes, list[tuple[int, int, int]]]:
    """A tar of three records ``prefix-0..2``, each spanning several blocks, and its member offsets."""
    whole = tar_bytes([good(f"{prefix}-{i}", response="r" * 1500) for i in range(3)])
    return whole, offsets(whole)


def corpus_shards() -> list[Shard]:
    """The corpus: shards of interleaved good and bad records, then shards broken as files."""
    garbage = random.Random(0).randbytes(4096)
    bads = [*BAD_JSON, *BAD_UTF8, *TOO_LARGE, *MISSING_JSON, *MISSING_FIELD]
    half, mid = len(bads) // 2, len(GOOD) // 2
    cut_data, cut_boundary, cut_header, tail_garbage = (three_records(p) for p in "abcd")
    return [
        members_shard(interleave(GOOD[:mid], bads[:half])),
        members_shard(interleave(GOOD[mid:], bads[half:]) + [
            Member("somedir/", None, None),  # a directory entry is no record
            good("g-both"), Member("g-both.txt", b"x", None),  # an extra member of the sample is ignored
        ]),
        members_shard([  # ids met before, in this shard or another: the later copy is skipped
            good("g-dup", source="beta"), bad("duplicate_id", "again.json", rec("g-dup", source="beta")),
            bad("duplicate_id", "string-7.json", rec("7")),  # the same id as the integer 7 of GOOD
            good("m-first", name="m.json"), Member("m.extra.json", dumps(rec("m-second")), None),
        ]),
        # Cut inside the third member's data: the two records before it are read.
        Shard(cut_data[0][:cut_data[1][2][1] + cut_data[1][2][2] // 2], ["a-0", "a-1"],
              Counter(truncated_tar=1)),
        # Cut on the third member's header: indistinguishable from a complete tar, nothing counted.
        Shard(cut_boundary[0][:cut_boundary[1][2][0]], ["b-0", "b-1"]),
        # Cut inside the third member's header: read as the end of the archive, nothing counted.
        Shard(cut_header[0][:cut_header[1][2][0] + 100], ["c-0", "c-1"]),
        # Garbage where the third header should be: read as the end of the archive, nothing counted.
        Shard(tail_garbage[0][:tail_garbage[1][2][0]] + garbage, ["d-0", "d-1"]),
        # Cut inside the first header: no tar at all.
        Shard(cut_data[0][:100], [], Counter(truncated_tar=1)),
        # A member name repeated inside one sample: webdataset refuses the rest of the shard.
        Shard(tar_bytes([good("g-before-dup"), good("g-dup-1", name="d.json"),
                         good("g-dup-2", name="d.json"), good("g-after-dup")]),
              ["g-before-dup"], Counter(read_error=1)),
        Shard(garbage, [], Counter(read_error=1)),  # binary garbage named .tar
        Shard(b"", [], Counter(read_error=1)),  # a zero-byte .tar
        Shard(None, [], Counter(read_error=1)),  # a shard the pattern names but nobody wrote
    ]


def write_corpus(folder) -> tuple[str, list[str], Counter]:
    """Write the corpus under ``folder``; its brace pattern, the good ids and the skips of one epoch."""
    shards = corpus_shards()
    for i, shard in enumerate(shards):
        if shard.data is not None:
            (folder / f"corpus-{i:02d}.tar").write_bytes(shard.data)
    ids = [i for s in shards for i in s.good]
    assert len(ids) == len(set(ids))
    skipped = sum((s.skipped for s in shards), Counter())
    return str(folder / f"corpus-{{00..{len(shards) - 1:02d}}}.tar"), ids, skipped


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("bad-shards"))


def read_epoch(stream: ShardStream, n: int) -> list[dict]:
    """The first ``n`` records; with a buffer larger than the corpus, the whole epoch has been read."""
    records = stream.take(n)
    assert {r["epoch"] for r in records} == {0}
    return records


def test_the_corpus_yields_exactly_its_good_records_and_counts_every_bad_one(corpus):
    pattern, ids, skipped = corpus
    assert set(skipped) == set(REASONS)  # every reason is exercised
    stream = ShardStream(ShardConfig(urls=pattern, max_record_bytes=MAX_RECORD_BYTES, buffer=1000))
    records = read_epoch(stream, len(ids))
    assert sorted(r["id"] for r in records) == sorted(ids)
    assert stream.skipped == dict(skipped)
    for r in records:
        assert all(isinstance(r[k], str) for k in ("id", "source", "prompt", "response"))
        assert r["id"] and r["source"] and r["response"]
    # The next epoch reads the same corpus again: same records, each count doubled.
    again = stream.take(len(ids))
    assert {r["epoch"] for r in again} == {1}
    assert sorted(r["id"] for r in again) == sorted(ids)
    assert stream.skipped == {k: 2 * v for k, v in skipped.items()}


def test_resuming_inside_the_corpus_replays_the_same_records_and_counts(corpus):
    pattern, ids, _ = corpus
    config = ShardConfig(urls=pattern, max_record_bytes=MAX_RECORD_BYTES, seed=3, buffer=7)
    original = ShardStream(config)
    original.take(len(ids) // 2)
    resumed = ShardStream(config)
    resumed.load_state_dict(json.loads(json.dumps(original.state_dict())))
    assert resumed.take(len(ids)) == original.take(len(ids))
    assert resumed.skipped == original.skipped


def test_with_a_manifest_the_corpus_reads_the_same_and_resumes_anywhere(tmp_path):
    """A manifest's counts order the epoch by record positions; a shard that cannot be read to the
    count it lists (here two more than it holds where reading fails) is counted once, when the
    first position past its end comes up."""
    pattern, ids, skipped = write_corpus(tmp_path)
    failed = ("read_error", "truncated_tar")
    counts = [len(s.good) + sum(n for r, n in s.skipped.items() if r not in failed)
              + 2 * any(r in failed for r in s.skipped) for s in corpus_shards()]
    names = [f"corpus-{i:02d}.tar" for i in range(len(counts))]
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": names, "records_per_shard": counts}))
    config = ShardConfig(urls=str(tmp_path / "manifest.json"), max_record_bytes=MAX_RECORD_BYTES,
                         seed=3, buffer=7)
    whole = ShardStream(config)
    assert whole.counts == counts
    epoch = read_epoch(whole, len(ids) + 1)
    # Ids are checked within a shard (colm-data writes them unique across its manifest): the
    # string id "7", a duplicate of another shard's integer 7, comes through here.
    assert sorted(r["id"] for r in epoch) == sorted([*ids, "7"])
    assert whole.skipped == dict(skipped - Counter(duplicate_id=1))
    uninterrupted = ShardStream(config)
    whole = uninterrupted.take(len(ids) + 20)
    for cut in range(len(ids) + 1):
        original = ShardStream(config)
        original.take(cut)
        resumed = ShardStream(config)
        resumed.load_state_dict(json.loads(json.dumps(original.state_dict())))
        assert resumed.skipped == original.skipped
        assert resumed.take(len(ids) + 20 - cut) == whole[cut:]
        assert resumed.skipped == uninterrupted.skipped


def test_a_selector_serving_the_corpus_keeps_serving_and_reports_the_same_counts(tmp_path, corpus):
    pattern, ids, _ = corpus
    srv = SelectorServer(make_config(tmp_path, **{"data.urls": pattern,
                                                  "data.max_record_bytes": MAX_RECORD_BYTES}))
    srv.start()
    try:
        ranks = take_all(srv, 3)
        assert all(len(b.ids) == B and set(b.ids) <= set(ids) for r in ranks for b in r)
        srv.job.stop()  # no more drawing: the stream stands still while the counts are compared
        with grpc.insecure_channel(target(srv)) as channel:
            status = pb_grpc.SelectorStub(channel).Status(pb.StatusRequest(), timeout=30)
        # A fresh stream drawing as many records as the selector did counts exactly the same.
        replay = ShardStream(srv.config.data)
        replay.take(status.selected_steps * W * L)
        assert dict(status.skipped) == replay.skipped
        assert set(status.skipped) == set(REASONS)
    finally:
        srv.stop(grace=1)


def sized(ident: str, nbytes: int) -> bytes:
    """A valid record of exactly ``nbytes`` bytes."""
    base = dumps(rec(ident, response=""))
    return dumps(rec(ident, response="x" * (nbytes - len(base))))


@pytest.mark.parametrize("nbytes,reason", [(MAX_RECORD_BYTES, None), (MAX_RECORD_BYTES + 1, "too_large")])
def test_max_record_bytes_is_the_largest_record_read(tmp_path, nbytes, reason):
    path = tmp_path / "sized.tar"
    path.write_bytes(tar_bytes([good("first"), Member("sized.json", sized("sized", nbytes), None)]))
    stream = ShardStream(ShardConfig(urls=str(path), buffer=0, shuffle_shards=False,
                                     max_record_bytes=MAX_RECORD_BYTES))
    records = stream.take(2)  # a skipped record lets epoch 1's first record come second
    assert [(r["id"], r["epoch"]) for r in records] == [("first", 0), ("sized", 0) if reason is None
                                                        else ("first", 1)]
    assert stream.skipped == ({} if reason is None else {reason: 1})


# Random members: whatever the bytes, each member is read or counted once, and reading never raises.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
field_values = st.one_of(st.text(max_size=6), st.integers(), st.floats(), st.none(), st.booleans(),
                         st.lists(st.text(max_size=3), max_size=2), st.sampled_from(["", " ", "\ud800"]))
record_like = st.fixed_dictionaries({}, optional={k: field_values for k in
                                                  ("id", "source", "prompt", "response", "text", "extra")})
payloads = st.one_of(
    st.binary(max_size=64),
    st.tuples(json_values | record_like, st.booleans()).map(
        lambda v: json.dumps(v[0], ensure_ascii=v[1]).encode("utf-8", "surrogatepass")),
    st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),
    st.tuples(record_like.map(dumps), st.integers(0, 200), st.binary(min_size=1, max_size=3)).map(
        lambda v: v[0][:v[1]] + v[2] + v[0][v[1]:]),  # bytes spliced into a JSON record
    st.integers(MAX_RECORD_BYTES - 2, MAX_RECORD_BYTES + 2).map(lambda n: sized("sized", n)),
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("random-members")


@fuzz(40)
@given(st.lists(payloads, max_size=12))
def test_random_members_are_each_read_or_counted_once(scratch, datas):
    path = scratch / "random.tar"
    sentinel = good("sentinel")  # first: epoch 1 starts with it, before any skip of epoch 1
    path.write_bytes(tar_bytes([sentinel] + [Member(f"m{i}.json", d, None) for i, d in enumerate(datas)]))
    stream = ShardStream(ShardConfig(urls=str(path), buffer=0, shuffle_shards=False,
                                     max_record_bytes=MAX_RECORD_BYTES))
    records = []
    while (r := next(stream))["epoch"] == 0:
        records.append(r)
    assert records[0]["id"] == "sentinel"
    assert len(records) + sum(stream.skipped.values()) == 1 + len(datas)
    assert set(stream.skipped) <= set(REASONS) - {"truncated_tar", "read_error", "missing_json"}
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
        assert all(isinstance(r[k], str) for k in ("id", "source", "prompt", "response"))
        assert r["id"] and r["source"] and r["response"]
        "".join(r[k] for k in ("id", "source", "prompt", "response")).encode("utf-8")  # protobuf-safe
