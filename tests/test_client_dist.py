"""The trainer side installs alone: ``client/`` builds a wheel of colm_client and colm_wire that needs
neither the selector (colm_server, webdataset, prometheus-client) nor the app layer."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVER_ONLY = ("colm_server", "colm_stream", "webdataset", "prometheus_client")


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory) -> Path:
    """The client distribution's wheel, built from a copy of ``client/`` (the tree stays clean)."""
    tmp = tmp_path_factory.mktemp("client")
    src = shutil.copytree(ROOT / "client", tmp / "src", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    str(src), "-w", str(tmp / "dist")], check=True, capture_output=True)
    (wheel,) = (tmp / "dist").glob("colm_stream_client-*.whl")
    return wheel


def test_the_client_wheel_holds_only_the_client_and_the_wire_format(client_wheel):
    names = zipfile.ZipFile(client_wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"colm_client", "colm_wire"}
    assert "colm_client/hf.py" in names and "colm_wire/proto/selector_pb2.py" in names


def test_the_client_requires_none_of_the_selectors_dependencies(client_wheel):
    with zipfile.ZipFile(client_wheel) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(meta_name).decode())
    required = [r.split(";")[0].strip() for r in meta.get_all("Requires-Dist") if "extra ==" not in r]
    names = {r.split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in required}
    assert names == {"torch", "grpcio", "grpcio-health-checking", "protobuf"}
    hf = [r for r in meta.get_all("Requires-Dist") if 'extra == "hf"' in r]
    assert any(r.startswith("transformers") for r in hf) and any(r.startswith("trl") for r in hf)


def test_the_unpacked_client_imports_with_the_selectors_packages_absent(client_wheel, tmp_path):
    """In a process where the selector's packages cannot be imported, every client module loads from
    the wheel alone, and none of them is pulled in."""
    unpacked = tmp_path / "site"
    zipfile.ZipFile(client_wheel).extractall(unpacked)
    code = f"""
import importlib.abc, sys
BLOCKED = {SERVER_ONLY!r}
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
# This checkout's editable install would serve colm_client from the tree: only the wheel may.
sys.meta_path = [Absent()] + [f for f in sys.meta_path if "editable" not in type(f).__module__]
sys.path.insert(0, {str(unpacked)!r})
import colm_client, colm_client.hf, colm_client.status, colm_wire.contract
assert colm_client.__file__.startswith({str(unpacked)!r}), colm_client.__file__
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, loaded
print("ok", colm_client.hf.ColmTrainer.__name__)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["ok", "ColmTrainer"]
