"""colm-data prepare: JSONL in, shards out that ShardStream reads back record for record."""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import pytest

from colm_server.data.prepare import brace_pattern, main, prepare
from colm_server.data.shards import ShardConfig, ShardStream, unshuffled_manifests

MATH_MIXTURE = Path("/work/shared/data/math-mixture/train.jsonl")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_back(manifest: dict) -> list[dict]:
    stream = ShardStream(ShardConfig(urls=manifest["urls"], shuffle_shards=False, buffer=0))
    records = stream.take(manifest["total"])
    assert stream.skipped == {}
    return records


def rows(n: int, sources: tuple[str, ...] = ("gsm8k", "svamp")) -> list[dict]:
    return [{"id": f"r.{i}/x", "source": sources[i % len(sources)], "prompt": f"{i} + 1 = ?",
             "response": f"{i + 1} ✓"} for i in range(n)]


def test_round_trip_keeps_ids_sources_and_text(tmp_path):
    data = rows(7)
    manifest = prepare([write_jsonl(tmp_path / "in.jsonl", data)], tmp_path / "out")
    assert manifest["total"] == 7 and manifest["shards"] == ["shard-000000.tar"]
    got = read_back(manifest)
    fields = [{k: r[k] for k in ("id", "source", "prompt", "response")} for r in got]
    assert sorted(fields, key=lambda r: r["id"]) == sorted(data, key=lambda r: r["id"])
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:  # keys: no dots, no slashes
        keys = [name.rsplit(".", 1)[0] for name in tar.getnames()]
    assert len(set(keys)) == 7 and not any("." in k or "/" in k for k in keys)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest


def test_small_shards_split_in_order_across_inputs(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", rows(6))
    b = write_jsonl(tmp_path / "b.jsonl", [{**r, "id": "b" + r["id"]} for r in rows(5)])
    manifest = prepare([a, b], tmp_path / "out", shard_max_records=3, prefix="mix", shuffle_seed=None)
    assert manifest["records_per_shard"] == [3, 3, 3, 2]
    assert manifest["pattern"] == "mix-{000000..000003}.tar"
    assert manifest["inputs"] == [str(a), str(b)]
    assert [r["id"] for r in read_back(manifest)] == [r["id"] for r in rows(6)] + [
        "b" + r["id"] for r in rows(5)]


def test_malformed_lines_counted_by_reason(tmp_path, caplog):
    good = rows(3)
    bad = ['{"id": "x", broken', "[1, 2]", {"source": "s", "response": "r"},
           {"id": "n1", "response": "r"}, {"id": "n2", "source": "s", "prompt": "p"},
           {"id": "n3", "source": "s", "prompt": "p", "response": ""}, good[0]]
    path = write_jsonl(tmp_path / "in.jsonl", good + [""] + bad)
    manifest = prepare([path], tmp_path / "out")
    assert manifest["skipped"] == {"bad_json": 1, "not_object": 1, "missing_id": 1, "missing_source": 1,
                                   "missing_response": 1, "empty_response": 1, "duplicate_id": 1}
    assert manifest["total"] == 3
    assert sorted(r["id"] for r in read_back(manifest)) == sorted(r["id"] for r in good)
    assert f"{path}:5" in caplog.text  # line 4 is blank: not a record, not counted


def test_custom_field_names_and_default_source(tmp_path):
    data = [{"uid": 7, "question": "q?", "answer": "a."}, {"uid": 8, "question": "q2", "answer": "b"}]
    manifest = prepare([write_jsonl(tmp_path / "in.jsonl", data)], tmp_path / "out", id_field="uid",
                       prompt_field="question", response_field="answer", default_source="quiz",
                       shuffle_seed=None)
    got = read_back(manifest)
    assert [(r["id"], r["source"], r["prompt"], r["response"]) for r in got] == [
        ("7", "quiz", "q?", "a."), ("8", "quiz", "q2", "b")]


def test_text_only_records(tmp_path):
    data = [{"id": "t1", "source": "web", "body": "plain text one"},
            {"id": "t2", "source": "web", "body": "two"}]
    manifest = prepare([write_jsonl(tmp_path / "in.jsonl", data)], tmp_path / "out", text_field="body",
                       shuffle_seed=None)
    with tarfile.open(tmp_path / "out" / manifest["shards"][0]) as tar:
        first = json.loads(tar.extractfile(tar.getmembers()[0]).read())
    assert first == {"id": "t1", "source": "web", "text": "plain text one"}
    got = read_back(manifest)
    assert [(r["prompt"], r["response"]) for r in got] == [("", "plain text one"), ("", "two")]


def test_manifest_counts_per_source(tmp_path):
    manifest = prepare([write_jsonl(tmp_path / "in.jsonl", rows(10, ("a", "b", "b", "c")))], tmp_path / "out")
    assert manifest["sources"] == {"a": 3, "b": 5, "c": 2}


def by_source(n_per_source: int, sources: tuple[str, ...] = ("a", "b", "c", "d")) -> list[dict]:
    """Records one source after another, as mixtures are often distributed."""
    return [{"id": f"{s}-{i}", "source": s, "prompt": "p", "response": f"{s}{i}"}
            for s in sources for i in range(n_per_source)]


def test_shards_of_a_source_sorted_input_each_hold_a_mix_of_sources(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", by_source(50))
    manifest = prepare([path], tmp_path / "out", shard_max_records=25)
    assert manifest["shuffle_seed"] == 0 and len(manifest["shards"]) == 8
    for name in manifest["shards"]:
        with tarfile.open(tmp_path / "out" / name) as tar:
            sources = {json.loads(tar.extractfile(m).read())["source"] for m in tar.getmembers()}
        assert len(sources) >= 3, (name, sources)
    # Unshuffled, every shard would hold one source: the reader would train on one at a time.
    ordered = prepare([path], tmp_path / "ordered", shard_max_records=25, shuffle_seed=None)
    assert [r["source"] for r in read_back(ordered)] == [r["source"] for r in by_source(50)]
    assert ordered["shuffle_seed"] is None


def test_the_selector_can_tell_manifests_of_unshuffled_shards(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", by_source(5))
    prepare([path], tmp_path / "mixed")
    ordered = prepare([path], tmp_path / "ordered", shuffle_seed=None)
    assert ordered["source_runs"] == len({r["source"] for r in by_source(5)})
    old = tmp_path / "old"  # written before prepare recorded its shuffle
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"shards": [], "sources": {}}))
    urls = [str(tmp_path / d / "manifest.json") for d in ("mixed", "ordered", "old")]
    assert unshuffled_manifests(urls) == urls[1:]
    assert unshuffled_manifests(f"{tmp_path}/mixed/shard-{{000000..000001}}.tar") == []


def test_input_order_counts_only_when_it_groups_sources(tmp_path):
    """Unshuffled but already mixed, as the synthetic mixture and interleaved inputs are: no warning."""
    assert main(["synthetic", "--out", str(tmp_path / "synthetic"), "--records", "400"]) == 0
    interleaved = prepare([write_jsonl(tmp_path / "in.jsonl", rows(40, ("a", "b", "c")))],
                          tmp_path / "interleaved", shuffle_seed=None)
    assert interleaved["source_runs"] == 40
    grouped = prepare([write_jsonl(tmp_path / "sorted.jsonl", sorted(rows(40, ("a", "b", "c")),
                                                                      key=lambda r: r["source"]))],
                      tmp_path / "grouped", shuffle_seed=None)
    urls = [str(tmp_path / d / "manifest.json") for d in ("synthetic", "interleaved", "grouped")]
    synthetic = json.loads(Path(urls[0]).read_text())
    assert "shuffle_seed" not in synthetic and len(synthetic["sources"]) == 8
    assert unshuffled_manifests(urls) == urls[2:]
    assert grouped["source_runs"] == 3


def test_the_shuffle_is_seeded(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", by_source(30))
    order = {name: [r["id"] for r in read_back(prepare([path], tmp_path / name, shuffle_seed=seed))]
             for name, seed in (("a", 1), ("b", 1), ("c", 2))}
    assert order["a"] == order["b"] != order["c"]
    assert sorted(order["a"]) == sorted(order["c"]) == sorted(r["id"] for r in by_source(30))


def test_inputs_larger_than_a_bucket_are_shuffled_through_disk_and_nothing_is_left_there(tmp_path):
    data = by_source(100)
    data[7]["response"] = "line\u2028separators\x85and\nnewlines\r\n survive"  # not record breaks
    path = write_jsonl(tmp_path / "in.jsonl", data)
    manifest = prepare([path], tmp_path / "out", shard_max_records=50, bucket_bytes=path.stat().st_size // 8)
    got = read_back(manifest)
    assert sorted((r["id"], r["response"]) for r in got) == sorted((r["id"], r["response"]) for r in data)
    assert [r["source"] for r in got[:50]].count("a") < 30  # the first shard is not mostly one source
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert left == sorted(manifest["shards"] + ["manifest.json"])


def test_of_records_sharing_an_id_the_first_in_input_order_is_kept(tmp_path):
    data = by_source(20) + [{"id": "a-0", "source": "a", "prompt": "p", "response": "later copy"}]
    for seed in (0, 1, 2):
        manifest = prepare([write_jsonl(tmp_path / "in.jsonl", data)], tmp_path / f"out{seed}",
                           shuffle_seed=seed)
        assert manifest["skipped"] == {"duplicate_id": 1}
        assert {r["id"]: r["response"] for r in read_back(manifest)}["a-0"] == "a0"


def test_cli_prints_summary_and_urls(tmp_path, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", rows(4))
    assert main(["prepare", str(path), "--out", str(tmp_path / "out"), "--shard-records", "2"]) == 0
    out = capsys.readouterr().out
    assert "records: 4 in 2 shard(s)" in out and "gsm8k=2" in out
    assert f"data.urls: {(tmp_path / 'out').resolve()}/shard-{{000000..000001}}.tar" in out
    assert main(["prepare", str(path), "--out", str(tmp_path / "kept"), "--no-shuffle"]) == 0
    assert [r["id"] for r in read_back(json.loads((tmp_path / "kept" / "manifest.json").read_text()))] == [
        r["id"] for r in rows(4)]


def test_folder_without_datasets_package_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: importing it fails
    with pytest.raises(ImportError, match="pip install datasets"):
        prepare([tmp_path], tmp_path / "out")


def test_brace_pattern():
    assert brace_pattern(["s-000000.tar"]) == "s-000000.tar"
    assert brace_pattern([f"s-{i:06d}.tar" for i in range(12)]) == "s-{000000..000011}.tar"


@pytest.mark.skipif(not MATH_MIXTURE.exists(), reason=f"{MATH_MIXTURE} not on this machine")
def test_math_mixture(tmp_path):
    manifest = prepare([MATH_MIXTURE], tmp_path / "out", shard_max_records=4000)
    assert 9602 - sum(manifest["skipped"].values()) == manifest["total"]
    assert len(manifest["sources"]) == 15 and sum(manifest["sources"].values()) == manifest["total"]
    assert manifest["records_per_shard"] == [4000, 4000, manifest["total"] - 8000]
    assert len(read_back(manifest)) == manifest["total"]


def test_synthetic_mixture_cli_writes_shards_a_manifest_url_reads_back(tmp_path, capsys):
    out = str(tmp_path / "syn")
    assert main(["synthetic", "--out", out, "--records", "500", "--shard-records", "200"]) == 0
    assert "records: 500 in 3 shard(s)" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "syn" / "manifest.json").read_text())
    assert manifest["sources"]["addition"] > 20 * manifest["sources"]["maximum"] > 0  # imbalanced
    # data.urls may name the manifest: it stands for its shards, in order.
    stream = ShardStream(ShardConfig(urls=str(tmp_path / "syn" / "manifest.json"), shuffle_shards=False,
                                     buffer=0))
    assert stream.shards == [str(tmp_path / "syn" / name) for name in manifest["shards"]]
    assert [r["id"] for r in stream.take(500)] == [r["id"] for r in read_back(manifest)]


def test_a_manifest_that_cannot_be_read_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="urls: cannot read the shard list"):
        ShardConfig(urls=str(tmp_path / "manifest.json"))
