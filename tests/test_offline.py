"""Loading stays offline by construction, not through HF_HUB_OFFLINE set as an import side effect."""

from __future__ import annotations

import contextlib
import http.server
import os
import socket
import subprocess
import sys
import threading

import huggingface_hub
import pytest

from colm_server.model.load import attach_lora, load_model, load_tokenizer
from tiny_gguf import one_layer_gguf

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def test_importing_the_loader_leaves_the_environment_alone():
    script = (
        "import os, peft, torch, transformers\n"  # what the dependencies set is theirs
        "before = dict(os.environ)\n"
        "import colm_server.model.load, colm_server.cli\n"
        "changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))\n"
        "print(changed)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARIABLES}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


class Recorder(http.server.BaseHTTPRequestHandler):
    """A stand-in hub that answers nothing and remembers every request."""

    requests: list[str] = []

    def _record(self):
        Recorder.requests.append(f"{self.command} {self.path}")
        self.send_error(404)

    do_GET = do_HEAD = do_POST = _record

    def log_message(self, *args):
        pass


@pytest.fixture()
def no_network(monkeypatch):
    """Offline mode off, the hub endpoint a local recorder (child processes use it too), and every
    connection or name lookup of this process recorded and refused. Yields the attempts seen."""
    attempts: list[str] = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Recorder.requests = attempts
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    for name in OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)

    def refuse_connect(sock, address):
        attempts.append(f"connect {address}")
        raise OSError("network access in a test")

    def refuse_lookup(host, *args, **kwargs):
        attempts.append(f"getaddrinfo {host}")
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse_connect)
    monkeypatch.setattr(socket, "getaddrinfo", refuse_lookup)
    try:
        yield attempts
    finally:
        server.shutdown()
        server.server_close()


def test_the_guard_sees_hub_requests_of_this_process_and_of_children(no_network):
    with contextlib.suppress(Exception):
        huggingface_hub.file_exists("HuggingFaceTB/SmolLM2-135M", "config.json")
    assert [a for a in no_network if a.startswith(("connect", "getaddrinfo"))]
    no_network.clear()
    child = "import huggingface_hub; huggingface_hub.file_exists('HuggingFaceTB/SmolLM2-135M', 'config.json')"
    subprocess.run([sys.executable, "-c", child], capture_output=True, check=False)
    assert [a for a in no_network if "SmolLM2" in a]  # so the guards of the next test can fail


def test_loads_never_reach_the_network_even_with_offline_mode_off(tmp_path, no_network):
    folder = tmp_path / "hf"
    load_model("tiny:llama").save_pretrained(folder)
    load_tokenizer("tiny:llama").save_pretrained(folder)
    model = attach_lora(load_model(str(folder)), r=4, alpha=8)
    model.save_pretrained(tmp_path / "adapter")
    attach_lora(load_model(str(folder)), adapter=tmp_path / "adapter")
    load_tokenizer(str(folder))

    gguf = one_layer_gguf(tmp_path / "one-layer.gguf")  # converted in a child process
    load_model(str(gguf), cache_dir=tmp_path / "cache")
    load_tokenizer(str(gguf), cache_dir=tmp_path / "cache")

    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    (tmp_path / "half").mkdir()  # an adapter config without weights: peft would look on the hub
    (tmp_path / "half" / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="adapter"):
        attach_lora(load_model(str(folder)), adapter=tmp_path / "half")
    assert no_network == []
