"""ShardStream: seeded epochs, each record once per epoch, exact resume, bad input skipped and counted."""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from hypothesis import given, settings
from hypothesis import strategies as st

from colm_server.data import shards
from colm_server.data.prepare import write_shards
from colm_server.data.shards import ShardConfig, ShardStream, expand_urls, record_order, shard_order

GOOD_PER_SHARD, GOOD_SHARDS, MIXED_GOOD = 10, 4, 5
EPOCH_SIZE = GOOD_PER_SHARD * GOOD_SHARDS + MIXED_GOOD


def record(i: int, source: str = "s", **extra) -> dict:
    return {"id": f"r{i}", "source": source, "prompt": f"p{i}", "response": f"a{i}", **extra}


def write_shard(path, samples: list[dict]) -> str:
    """A shard from samples: a dict member is JSON-encoded by TarWriter, bytes are written as is."""
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def good_samples(ids, source: str = "s", size: int = 0) -> list[dict]:
    return [{"__key__": f"k{i}", "json": record(i, source, response="x" * size or f"a{i}")} for i in ids]


def first_epoch(stream: ShardStream) -> list[dict]:
    """Records of epoch 0; reads the first record of epoch 1 to know epoch 0 is over."""
    out = []
    while (rec := next(stream))["epoch"] == 0:
        out.append(rec)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """Four good shards plus one with good records, bad JSON and a duplicate id: EPOCH_SIZE valid records."""
    folder = tmp_path_factory.mktemp("corpus")
    for s in range(GOOD_SHARDS):
        ids = range(s * GOOD_PER_SHARD, (s + 1) * GOOD_PER_SHARD)
        write_shard(folder / f"shard-{s:03d}.tar", good_samples(ids, source=f"src{s % 2}"))
    mixed = good_samples(range(100, 100 + MIXED_GOOD), source="tiny")
    mixed[2:2] = [{"__key__": "bad", "json": b"{oops"}, {"__key__": "dup", "json": record(0)}]
    write_shard(folder / f"shard-{GOOD_SHARDS:03d}.tar", mixed)
    return str(folder / f"shard-{{000..{GOOD_SHARDS:03d}}}.tar")


def ids(records: list[dict]) -> list[str]:
    return [r["id"] for r in records]


def test_shard_order_is_a_seeded_permutation():
    assert sorted(shard_order(10, seed=3, epoch=2)) == list(range(10))
    assert shard_order(10, 3, 2) == shard_order(10, 3, 2) != shard_order(10, 3, 1)
    assert shard_order(10, 3, 2, shuffle=False) == list(range(10))


def test_same_seed_same_order_other_seed_other_order(corpus):
    a = ShardStream(ShardConfig(urls=corpus, seed=7, buffer=8)).take(2 * EPOCH_SIZE)
    b = ShardStream(ShardConfig(urls=corpus, seed=7, buffer=8)).take(2 * EPOCH_SIZE)
    c = ShardStream(ShardConfig(urls=corpus, seed=8, buffer=8)).take(2 * EPOCH_SIZE)
    assert a == b
    assert ids(a) != ids(c)


def test_each_record_once_per_epoch_in_a_new_order(corpus):
    stream = ShardStream(ShardConfig(urls=corpus, seed=1, buffer=16))
    epochs = [stream.take(EPOCH_SIZE) for _ in range(3)]
    expected = [f"r{i}" for i in [*range(GOOD_PER_SHARD * GOOD_SHARDS), *range(100, 100 + MIXED_GOOD)]]
    for e, recs in enumerate(epochs):
        assert sorted(ids(recs)) == sorted(expected)
        assert {r["epoch"] for r in recs} == {e}
    assert len({tuple(ids(recs)) for recs in epochs}) == 3
    assert stream.skipped == {"bad_json": 3, "duplicate_id": 3}
    assert (stream.epoch, stream.position) == (2, EPOCH_SIZE)
    assert set(epochs[0][0]) == {"id", "source", "prompt", "response", "epoch"}


@settings(max_examples=20, deadline=None)
@given(
    cut=st.integers(0, 2 * EPOCH_SIZE + 3),
    buffer=st.sampled_from([0, 7, 1000]),
    shuffle_shards=st.booleans(),
)
def test_resume_yields_the_same_continuation(corpus, cut, buffer, shuffle_shards):
    config = ShardConfig(urls=corpus, seed=5, buffer=buffer, shuffle_shards=shuffle_shards)
    original = ShardStream(config)
    original.take(cut)
    state = json.loads(json.dumps(original.state_dict()))  # the cursor is plain JSON
    resumed = ShardStream(config)
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.position, resumed.skipped) == (original.epoch, original.position,
                                                                  original.skipped)
    assert resumed.take(12) == original.take(12)
    assert resumed.skipped == original.skipped


def test_resume_refuses_another_order_or_a_shorter_epoch(corpus):
    state = ShardStream(ShardConfig(urls=corpus, seed=1)).state_dict()
    with pytest.raises(ValueError, match="state_dict"):
        ShardStream(ShardConfig(urls=corpus, seed=2)).load_state_dict(state)
    with pytest.raises(ValueError, match="fewer than the saved position"):
        ShardStream(ShardConfig(urls=corpus, seed=1)).load_state_dict({**state, "position": EPOCH_SIZE + 1})


def test_brace_patterns_and_lists_of_them(tmp_path):
    for name, first in (("a", 0), ("b", 10)):
        for s in range(2):
            write_shard(tmp_path / f"{name}-{s}.tar", good_samples(range(first + 5 * s, first + 5 * s + 5)))
    urls = [f"{tmp_path}/a-{{0..1}}.tar", f"file:{tmp_path}/b-{{0,1}}.tar"]
    assert len(expand_urls(urls)) == 4
    recs = ShardStream(ShardConfig(urls=urls, buffer=3)).take(20)
    assert sorted(ids(recs)) == sorted(f"r{i}" for i in range(20))


def test_a_runaway_brace_range_is_refused_without_spelling_it_out():
    """A typo like {0..99999999} would list 10^8 names; it is refused once it passes MAX_SHARDS."""
    with pytest.raises(ValueError, match=r"urls: expands to more than 1,000,000 shards"):
        ShardConfig(urls="/data/s-{0..99999999}.tar")
    assert len(expand_urls(["/data/s-{0..999}.tar", "/data/t-{0..999}.tar"])) == 2000


def test_text_records_and_custom_field_names(tmp_path):
    samples = [
        {"__key__": "t", "json": {"uid": 7, "ds": "web", "text": "plain text"}},
        {"__key__": "p", "json": {"uid": "q", "ds": "qa", "q": "question", "a": "answer"}},
    ]
    config = ShardConfig(urls=write_shard(tmp_path / "s.tar", samples), buffer=0, shuffle_shards=False,
                         id_field="uid", source_field="ds", prompt_field="q", response_field="a")
    text, qa = ShardStream(config).take(2)
    assert text == {"id": "7", "source": "web", "prompt": "", "response": "plain text", "epoch": 0}
    assert qa == {"id": "q", "source": "qa", "prompt": "question", "response": "answer", "epoch": 0}


def _truncated(path) -> str:
    """A valid shard cut in the middle of its sixth member's data."""
    write_shard(path, good_samples(range(100, 120), size=2000))
    with tarfile.open(path) as tar:
        member = tar.getmembers()[5]
    data = path.read_bytes()
    path.write_bytes(data[: member.offset_data + member.size // 2])
    return str(path)


def _not_a_tar(path) -> str:
    path.write_bytes(b"this is not a tar file\n" * 300)
    return str(path)


def _shard_with(*bad: dict):
    """A shard with good records r100, r101 around the bad samples."""
    def write(path) -> str:
        good = good_samples([100, 101])
        return write_shard(path, [good[0], *bad, good[1]])
    return write


BAD_INPUT = {
    "bad_json": (_shard_with({"__key__": "x", "json": b"{not json"}, {"__key__": "y", "json": b"[1, 2]"}), 2),
    "bad_utf8": (_shard_with(
        {"__key__": "x", "json": b'{"id": "x", "source": "s", "response": "caf\xe9"}'},
        {"__key__": "y", "json": b'{"id": "y", "source": "s", "response": "\\ud800"}'},  # lone surrogate
    ), 2),
    "missing_field": (_shard_with(
        {"__key__": "x", "json": {"source": "s", "response": "no id"}},
        {"__key__": "y", "json": {"id": "y", "source": "", "response": "empty source"}},
        {"__key__": "z", "json": {"id": "z", "source": "s", "prompt": "no response, no text"}},
        {"__key__": "w", "json": {"id": ["w"], "source": "s", "response": "id not a string"}},
    ), 4),
    "too_large": (_shard_with({"__key__": "x", "json": record(9, response="x" * 5000)}), 1),
    "missing_json": (_shard_with({"__key__": "x", "txt": "a sample with a wrong member name"}), 1),
    "duplicate_id": (_shard_with({"__key__": "again", "json": record(100)}), 1),
    "truncated_tar": (_truncated, 1),
    "read_error": (_not_a_tar, 1),
}


@pytest.mark.parametrize("reason", sorted(BAD_INPUT))
def test_bad_input_is_skipped_counted_and_logged(tmp_path, caplog, reason):
    write_bad, count = BAD_INPUT[reason]
    write_shard(tmp_path / "a-good.tar", good_samples(range(10)))
    write_bad(tmp_path / "b-bad.tar")
    config = ShardConfig(urls=f"{tmp_path}/{{a-good,b-bad}}.tar", shuffle_shards=False, buffer=0,
                         max_record_bytes=4096)
    stream = ShardStream(config)
    with caplog.at_level(logging.WARNING, logger="colm_server.data.shards"):
        got = ids(first_epoch(stream))
    assert stream.skipped == {reason: count}
    assert got[:10] == [f"r{i}" for i in range(10)]  # the good shard, in order
    if reason == "truncated_tar":  # the records before the cut that were complete come through
        assert 1 <= len(got) - 10 < 6 and got[10:] == [f"r{100 + i}" for i in range(len(got) - 10)]
    elif reason != "read_error":
        assert got[10:] == ["r100", "r101"]
    assert f"({reason})" in caplog.text and "b-bad.tar" in caplog.text


def test_missing_shard_and_failing_command_are_read_errors(tmp_path):
    good = write_shard(tmp_path / "good.tar", good_samples(range(3)))
    urls = [good, str(tmp_path / "missing.tar"), "pipe:exit 3"]
    stream = ShardStream(ShardConfig(urls=urls, shuffle_shards=False, buffer=0, allow_pipe=True))
    assert ids(first_epoch(stream)) == ["r0", "r1", "r2"]
    assert stream.skipped == {"read_error": 2}


def test_pipe_urls_need_allow_pipe(tmp_path):
    path = write_shard(tmp_path / "s.tar", good_samples(range(5)))
    with pytest.raises(ValueError, match="urls: .*allow_pipe"):
        ShardConfig(urls=f"pipe:cat {path}")
    piped = ShardStream(ShardConfig(urls=f"pipe:cat {path}", allow_pipe=True, seed=3, buffer=4))
    plain = ShardStream(ShardConfig(urls=path, seed=3, buffer=4))
    assert piped.take(12) == plain.take(12)


@pytest.mark.parametrize("content", [b"garbage" * 100, None])
def test_no_valid_record_is_a_clear_error(tmp_path, content):
    path = tmp_path / "bad.tar"
    if content is None:
        write_shard(path, [{"__key__": f"k{i}", "json": b"{"} for i in range(3)])
    else:
        path.write_bytes(content)
    stream = ShardStream(ShardConfig(urls=str(path)))
    with pytest.raises(RuntimeError, match="no valid record"):
        next(stream)


@pytest.mark.parametrize("bad", [
    {"urls": []}, {"urls": ""}, {"urls": ["a.tar", 3]}, {"seed": 1.5}, {"buffer": -1},
    {"max_record_bytes": 0}, {"id_field": ""}, {"text_field": None}, {"allow_pipe": "yes"}, {"buffer": True},
])
def test_config_refuses_impossible_values_naming_the_field(bad):
    kwargs = {"urls": "shard-{0..3}.tar", **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        ShardConfig(**kwargs)


# --- With a manifest: the epoch's order is a function of (seed, epoch, records per shard) ---------

MANY_SHARDS, PER_SHARD = 20, 25


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict:
    """20 shards of 25 records, written by colm-data: the manifest lists each shard's count."""
    folder = tmp_path_factory.mktemp("prepared")
    return write_shards((record(i, source=f"src{i % 3}") for i in range(MANY_SHARDS * PER_SHARD)), folder,
                        shard_max_records=PER_SHARD)


def manifest_path(manifest: dict) -> str:
    return str(Path(manifest["urls"]).parent / "manifest.json")


def write_manifest(folder, shard_samples: list[list[dict] | None], counts: list[int] | None = None) -> str:
    """Shards of the given samples (None: named but never written) and a manifest listing them."""
    names = [f"m-{i:03d}.tar" for i in range(len(shard_samples))]
    for name, samples in zip(names, shard_samples):
        if samples is not None:
            write_shard(folder / name, samples)
    counts = counts or [len(samples or []) for samples in shard_samples]
    (folder / "manifest.json").write_text(json.dumps({"shards": names, "records_per_shard": counts}))
    return str(folder / "manifest.json")


@pytest.fixture(scope="module")
def rough(tmp_path_factory) -> tuple[str, list[str]]:
    """A manifest over shards holding malformed records, a duplicate id, a truncated and a missing
    shard; its path and the ids an epoch yields."""
    folder = tmp_path_factory.mktemp("rough")
    samples = [good_samples(range(s * 8, s * 8 + 8)) for s in range(5)]
    samples[1][3:3] = [{"__key__": "bad", "json": b"{oops"}, {"__key__": "nojson", "txt": "x"}]
    samples[2][5:5] = [{"__key__": "dup", "json": record(17)}]  # 17 is in this shard, earlier
    samples[4][0:0] = [{"__key__": "big", "json": record(999, response="x" * 5000)}]
    # Then a shard of 20 records cut inside its sixth member, and one never written.
    path = write_manifest(folder, [*samples, None, None], counts=[len(s) for s in samples] + [20, 3])
    _truncated(folder / "m-005.tar")
    return path, [f"r{i}" for i in range(40)] + [f"r{100 + i}" for i in range(5)]


def test_record_order_is_a_seeded_permutation_of_a_shards_positions():
    assert sorted(record_order(50, seed=3, epoch=2, shard=4)) == list(range(50))
    assert record_order(50, 3, 2, 4) == record_order(50, 3, 2, 4) != record_order(50, 3, 2, 5)
    assert record_order(50, 3, 2, 4) != record_order(50, 3, 1, 4)
    assert record_order(5, 3, 2, 4, shuffle=False) == list(range(5))


@pytest.mark.parametrize("buffer", [0, 1000])
def test_a_manifest_epoch_is_a_seeded_permutation_of_all_its_records(prepared, buffer):
    total = prepared["total"]
    config = ShardConfig(urls=manifest_path(prepared), seed=4, buffer=buffer)
    stream = ShardStream(config)
    assert stream.counts == [PER_SHARD] * MANY_SHARDS
    epochs = [stream.take(total) for _ in range(3)]
    for e, recs in enumerate(epochs):
        assert sorted(ids(recs)) == sorted(f"r{i}" for i in range(total))
        assert {r["epoch"] for r in recs} == {e}
    assert len({tuple(ids(recs)) for recs in epochs}) == 3
    assert ShardStream(config).take(3 * total) == [r for recs in epochs for r in recs]
    assert ids(ShardStream(ShardConfig(urls=manifest_path(prepared), seed=5, buffer=buffer)).take(total)) \
        != ids(epochs[0])
    if buffer:  # the records of one shard come in another order than they were written
        first_shard = [r["id"] for r in epochs[0][:PER_SHARD]]
        assert first_shard != sorted(first_shard, key=lambda i: int(i[1:]))
    assert stream.skipped == {}


def test_without_shuffles_a_manifest_is_read_in_its_order(prepared):
    stream = ShardStream(ShardConfig(urls=manifest_path(prepared), shuffle_shards=False, buffer=0))
    assert ids(stream.take(prepared["total"])) == [f"r{i}" for i in range(prepared["total"])]


def test_a_malformed_record_does_not_move_the_others(tmp_path):
    """Positions count raw samples: a record that turns bad leaves every other one where it was."""
    samples = [good_samples(range(s * 10, s * 10 + 10)) for s in range(4)]
    clean = ShardStream(ShardConfig(urls=write_manifest(tmp_path, samples), seed=2, buffer=50))
    order = ids(clean.take(40))
    samples[2][4] = {"__key__": samples[2][4]["__key__"], "json": b"{broken"}
    (tmp_path / "bad").mkdir()
    damaged = ShardStream(ShardConfig(urls=write_manifest(tmp_path / "bad", samples), seed=2, buffer=50))
    assert ids(first_epoch(damaged)) == [i for i in order if i != "r24"]
    assert damaged.skipped == {"bad_json": 1}


def test_a_manifest_over_rough_shards_yields_each_good_record_once_and_counts_the_rest(rough):
    path, expected = rough
    stream = ShardStream(ShardConfig(urls=path, seed=1, buffer=10, max_record_bytes=4096))
    got = ids(first_epoch(stream))
    assert sorted(got) == sorted(expected)
    # The cut shard ends before the 20 records its manifest lists: counted once, as the missing one.
    assert stream.skipped == {"bad_json": 1, "missing_json": 1, "duplicate_id": 1, "too_large": 1,
                              "truncated_tar": 1, "read_error": 1}


@settings(max_examples=30, deadline=None)
@given(cut=st.integers(0, 2 * 45 + 3), buffer=st.sampled_from([0, 7]), shuffle_shards=st.booleans())
def test_a_manifest_resumes_anywhere_with_the_uninterrupted_continuation(rough, cut, buffer, shuffle_shards):
    path, _ = rough
    config = ShardConfig(urls=path, seed=5, buffer=buffer, shuffle_shards=shuffle_shards,
                         max_record_bytes=4096)
    original = ShardStream(config)
    original.take(cut)
    state = json.loads(json.dumps(original.state_dict()))
    assert "cursor" in state
    resumed = ShardStream(config)
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.cursor, resumed.position, resumed.skipped) == (
        original.epoch, original.cursor, original.position, original.skipped)
    assert resumed.take(50) == original.take(50)
    assert resumed.skipped == original.skipped


def test_samples_past_the_count_a_manifest_lists_are_not_read(tmp_path, caplog):
    path = write_manifest(tmp_path, [good_samples(range(5)), good_samples(range(5, 8))], counts=[3, 3])
    config = ShardConfig(urls=path, seed=1, buffer=10)
    whole = ShardStream(config)
    with caplog.at_level(logging.WARNING, logger="colm_server.data.shards"):
        epoch = whole.take(6 + 6)
        assert sorted(ids(epoch[:6])) == ["r0", "r1", "r2", "r5", "r6", "r7"] and whole.skipped == {}
        assert "m-000.tar holds more than the 3 samples its manifest lists" in caplog.text
        for cut in range(12):  # a resume that needs only the front of a shard reads no further
            before = ShardStream(config)
            before.take(cut)
            resumed = ShardStream(config)
            resumed.load_state_dict(before.state_dict())
            assert resumed.take(12 - cut) == epoch[cut:]
    assert "m-001.tar holds more" not in caplog.text


def test_resuming_at_every_position_of_an_epoch_of_many_shards_gives_the_same_sequence(prepared):
    config = ShardConfig(urls=manifest_path(prepared), seed=9, buffer=100)
    total = prepared["total"]
    whole = ShardStream(config).take(total + 5)
    for cut in range(0, total + 1, 7):
        before = ShardStream(config)
        before.take(cut)
        resumed = ShardStream(config)
        resumed.load_state_dict(before.state_dict())
        assert resumed.take(total + 5 - cut) == whole[cut:], cut


@pytest.mark.parametrize("cut", [MANY_SHARDS * PER_SHARD - 30, 2 * MANY_SHARDS * PER_SHARD - 3])
def test_resuming_late_in_an_epoch_reads_one_shard_before_the_first_record(prepared, monkeypatch, cut):
    """Every json member read goes through parse_record and every shard opened through gopen."""
    def resume_cost(urls: str) -> tuple[dict, int, list[str]]:
        config = ShardConfig(urls=urls, seed=3, buffer=100)
        original = ShardStream(config)
        original.take(cut)
        resumed = ShardStream(config)
        parsed, opened = [], []
        with monkeypatch.context() as patch:
            patch.setattr(shards, "parse_record", lambda data, cfg: parsed.append(1) or decode(data, cfg))
            patch.setattr(shards.wds, "gopen", lambda url, *a, **k: opened.append(url) or gopen(url, *a, **k))
            resumed.load_state_dict(original.state_dict())
            first = next(resumed)
        assert first == next(original)
        return first, len(parsed), opened

    decode, gopen = shards.parse_record, shards.wds.gopen
    _, parsed, opened = resume_cost(manifest_path(prepared))
    assert len(opened) == 1 and parsed <= PER_SHARD
    # The same shards named by their pattern: no counts, the epoch is re-read up to the cut.
    _, parsed, opened = resume_cost(prepared["urls"])
    assert parsed >= cut % prepared["total"] > PER_SHARD and len(opened) > 1


def test_a_state_without_cursor_finishes_its_epoch_in_its_order_then_follows_the_manifest(prepared):
    """A state saved while the shards were read in the shuffle buffer's order (plain pattern)."""
    total, cut = prepared["total"], 123
    pattern = ShardStream(ShardConfig(urls=prepared["urls"], seed=6))
    pattern.take(cut)
    state = pattern.state_dict()
    assert "cursor" not in state
    stream = ShardStream(ShardConfig(urls=manifest_path(prepared), seed=6))
    stream.load_state_dict(state)
    assert stream.take(total - cut) == pattern.take(total - cut)
    assert "cursor" not in stream.state_dict()
    fresh = ShardStream(ShardConfig(urls=manifest_path(prepared), seed=6))
    fresh.take(total)
    assert stream.take(total) == fresh.take(total)  # epoch 1: the manifest's order
    assert "cursor" in stream.state_dict()


def test_a_cursor_state_is_refused_where_it_cannot_resume(prepared, tmp_path):
    state = ShardStream(ShardConfig(urls=manifest_path(prepared), seed=1)).state_dict()
    with pytest.raises(ValueError, match="same manifest.json"):
        ShardStream(ShardConfig(urls=prepared["urls"], seed=1)).load_state_dict(state)
    with pytest.raises(ValueError, match="state_dict: saved by a stream with other"):
        ShardStream(ShardConfig(urls=manifest_path(prepared), seed=2)).load_state_dict(state)
    with pytest.raises(ValueError, match="cursor <= 500"):
        ShardStream(ShardConfig(urls=manifest_path(prepared), seed=1)).load_state_dict(
            {**state, "cursor": 501})
    other = write_manifest(tmp_path, [good_samples(range(5)), good_samples(range(5, 9))])
    with pytest.raises(ValueError, match="other shards, record counts"):
        ShardStream(ShardConfig(urls=other, seed=1)).load_state_dict(state)


def test_a_manifest_whose_counts_do_not_match_its_shards_is_refused(tmp_path):
    path = write_manifest(tmp_path, [good_samples(range(3))], counts=[3, 1])
    with pytest.raises(ValueError, match="urls: .*records_per_shard"):
        ShardConfig(urls=path)
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": ["m-000.tar"]}))  # no counts: as a pattern
    stream = ShardStream(ShardConfig(urls=path))
    assert stream.counts is None and sorted(ids(stream.take(3))) == ["r0", "r1", "r2"]
