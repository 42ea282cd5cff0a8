"""The GGUF conversion cache under concurrent loaders, some of them torch.distributed ranks.

Under torchrun, transformers' save_pretrained writes no weights on ranks other than 0; a cache
filled by such a rank once held only tokenizer files and crash-looped every later start.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from colm_server.model import gguf_cache
from colm_server.model.gguf_cache import COMPLETE, check_converted, entry_folder, is_complete
from colm_stream.cli import main as cli_main
from tiny_gguf import one_layer_gguf

# Loads the GGUF through load_model / load_tokenizer, optionally as a gloo rank; prints a digest.
WORKER = """
import json, logging, sys
import torch.distributed as dist
gguf, cache, init, rank, world = sys.argv[1:]
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
if int(world):
    dist.init_process_group("gloo", init_method=init, rank=int(rank), world_size=int(world))
from colm_server.model.load import load_model, load_tokenizer
model, tokenizer = load_model(gguf, cache_dir=cache), load_tokenizer(gguf, cache_dir=cache)
ids = tokenizer(TEXT)["input_ids"]
print(json.dumps({"sums": {k: float(t.double().sum()) for k, t in model.state_dict().items()},
                  "ids": ids, "text": tokenizer.decode(ids)}))
if int(world):
    dist.destroy_process_group()
""".replace("TEXT", repr("What is 2 + 2?"))

# GGUF tensors that transformers loads as they are (q and k are permuted), by their HF names.
UNPERMUTED = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
              "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight"}


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return one_layer_gguf(tmp_path_factory.mktemp("gguf") / "one-layer.gguf")


@pytest.fixture(scope="module")
def reference(gguf_file) -> dict[str, float]:
    """Sums of some weights dequantised straight from the GGUF, by HF name: what loaders must see."""
    gguf = pytest.importorskip("gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(gguf_file).tensors}
    return {hf: float(gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type)
                      .astype("float64").sum()) for name, hf in UNPERMUTED.items()}


def run_workers(gguf_file, cache, specs: list[tuple[str, int, int]]) -> list[tuple[dict, str]]:
    """Start one worker per ``(init_method, rank, world_size)`` at once; their digests and logs."""
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(gguf_file), str(cache), init, str(rank),
                               str(world)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for init, rank, world in specs]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append((json.loads(out.strip().splitlines()[-1]), err))
    return results


def assert_one_complete_entry(cache, gguf_file):
    folder = entry_folder(gguf_file, cache)
    assert is_complete(folder)
    check_converted(folder)  # config with a model_type, weights with tensors, a tokenizer
    dirs = [p.name for p in cache.iterdir() if p.is_dir()]
    assert dirs == [folder.name]  # no temporary folder left behind
    return folder


def test_concurrent_loaders_some_of_them_ranks_share_one_conversion(tmp_path, gguf_file, reference):
    cache = tmp_path / "cache"  # does not exist yet: the loaders create it
    pair = f"file://{tmp_path / 'rendezvous-pair'}"
    results = run_workers(gguf_file, cache, [
        (f"file://{tmp_path / 'rendezvous-single'}", 0, 1),  # a world of one
        (pair, 0, 2),  # both ranks of a world of two
        (pair, 1, 2),
    ])
    assert_one_complete_entry(cache, gguf_file)
    first = results[0][0]
    assert first["text"] == "What is 2 + 2?" and 1 < len(first["ids"]) < len("What is 2 + 2?")
    assert {k: first["sums"][k] for k in reference} == pytest.approx(reference, rel=1e-9)
    assert all(digest == first for digest, _ in results)
    logs = "".join(err for _, err in results)
    assert logs.count("into a Hugging Face folder (once") == 1  # one converted, the others waited


def test_warm_as_rank_1_replaces_an_incomplete_folder_and_keeps_a_whole_unmarked_one(
        tmp_path, gguf_file, reference, capsys, monkeypatch):
    cache = tmp_path / "cache"
    folder = entry_folder(gguf_file, cache)
    folder.mkdir(parents=True)  # what the bug left: a rank's tokenizer files and no weights
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    (tmp_path / "cache" / f".{folder.name}.abandoned").mkdir()  # a killed conversion's temporary
    with monkeypatch.context() as m:  # to transformers, this process is now rank 1 of a torchrun job
        m.setattr(torch.distributed, "is_initialized", lambda: True)
        m.setattr(torch.distributed, "get_rank", lambda group=None: 1)
        cli_main(["model", "warm", str(gguf_file), "--cache-dir", str(cache)])
    assert capsys.readouterr().out.strip() == str(folder)
    assert_one_complete_entry(cache, gguf_file)
    assert json.loads((folder / COMPLETE).read_text())["gguf"] == str(gguf_file.resolve())
    read = gguf_file.stat().st_mode & 0o444  # the conversion is as readable as its GGUF
    assert folder.stat().st_mode & 0o555 == read | (read >> 2)
    assert all(p.stat().st_mode & 0o444 == read for p in folder.iterdir())
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        sums = {k: float(weights.get_tensor(k).double().sum()) for k in reference}
    assert sums == pytest.approx(reference, rel=1e-9)

    # A whole folder without the marker (converted before markers existed) is kept, not redone.
    (folder / COMPLETE).unlink()
    (folder / "kept").write_text("")
    assert gguf_cache.converted(gguf_file, cache) == folder
    assert is_complete(folder) and (folder / "kept").is_file()

    # Complete entries are read without the lock, so a read-only cache made ahead of time works.
    def no_lock(*args):
        raise AssertionError("locked a complete entry")

    monkeypatch.setattr(gguf_cache, "_entry_lock", no_lock)
    assert gguf_cache.converted(gguf_file, cache) == folder


def test_a_failed_conversion_leaves_no_entry(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(RuntimeError, match="broken.gguf"):
        gguf_cache.converted(bad, tmp_path / "cache")
    assert [p for p in (tmp_path / "cache").iterdir() if p.is_dir()] == []
    with pytest.raises(SystemExit) as exc:
        cli_main(["model", "warm", "tiny:llama", "--cache-dir", str(tmp_path / "cache")])
    assert exc.value.code == 2


def test_cache_root_comes_from_the_argument_then_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path / "env"))
    assert gguf_cache.cache_root() == tmp_path / "env"
    assert gguf_cache.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(gguf_cache.CACHE_ENV)
    assert gguf_cache.cache_root() == gguf_cache.DEFAULT_CACHE.expanduser()


def test_check_converted_names_what_is_missing(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="no model weights"):
        check_converted(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="unreadable weights"):
        check_converted(tmp_path)
    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="tokenizer"):
        check_converted(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    check_converted(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="model_type"):
        check_converted(tmp_path)
