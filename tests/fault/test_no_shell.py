"""Shard URLs reach a shell only where ``data.allow_pipe`` says so.

A ``pipe:`` URL, written in the config or hidden in a manifest's shard list, is refused without
it; shell syntax in a plain shard path is part of a file name, never a command. Each case would
create a marker file if a shell ran it.
"""

from __future__ import annotations

import json

import pytest
import webdataset as wds

from colm_server.data.shards import ShardConfig, ShardStream

SHELL = ["x.tar; touch {mark}", "$(touch {mark}).tar", "`touch {mark}`.tar", "x.tar | touch {mark}",
         "x.tar && touch {mark}", "x.tar\ntouch {mark}"]


def write_shard(path, n: int) -> str:
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            sink.write({"__key__": f"k{i}", "json": {"id": f"r{i}", "source": "s", "prompt": "p",
                                                     "response": "a"}})
    return str(path)


def test_shell_syntax_in_a_shard_path_is_a_file_name_not_a_command(tmp_path):
    mark, good = tmp_path / "ran", write_shard(tmp_path / "good.tar", 3)
    urls = [good] + [str(tmp_path / s.format(mark=mark)) for s in SHELL]
    stream = ShardStream(ShardConfig(urls=urls, shuffle_shards=False, buffer=0))
    got = [next(stream) for _ in range(6)]  # epoch 0 reads every shard: 3 records, then the rest fail
    assert [r["id"] for r in got] == ["r0", "r1", "r2"] * 2
    assert stream.skipped == {"read_error": len(SHELL)}
    assert not mark.exists()
    # The marker does catch a shell: an allowed pipe: URL runs its command.
    piped = ShardStream(ShardConfig(urls=f"pipe:touch '{mark}' && cat '{good}'", allow_pipe=True, buffer=0))
    assert next(piped)["id"] == "r0" and mark.exists()


@pytest.mark.parametrize("where", ["config", "manifest"])
def test_a_pipe_url_is_refused_without_allow_pipe_wherever_it_is_written(tmp_path, monkeypatch, where):
    monkeypatch.chdir(tmp_path)  # a relative manifest: its shard names are taken as they are written
    command = "pipe:touch ran"
    if where == "manifest":
        (tmp_path / "manifest.json").write_text(json.dumps({"shards": [command], "records_per_shard": [1]}))
    urls = command if where == "config" else "manifest.json"
    with pytest.raises(ValueError, match="urls: a pipe: URL runs a shell command; set allow_pipe"):
        ShardConfig(urls=urls)
    assert not (tmp_path / "ran").exists()
