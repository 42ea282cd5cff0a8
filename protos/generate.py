"""Generate the Python stubs of protos/colm/v1/selector.proto into client/colm_wire/proto/.

    python protos/generate.py            # rewrite the committed stubs
    python protos/generate.py OUT_DIR    # write them under OUT_DIR/colm_wire/proto/ instead
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "protos/colm/v1"
STUBS = ("selector_pb2.py", "selector_pb2.pyi", "selector_pb2_grpc.py")


def generate(out_root: Path = ROOT / "client") -> Path:
    """Run protoc; the virtual path makes the stubs import each other as colm_wire.proto."""
    (out_root / "colm_wire/proto").mkdir(parents=True, exist_ok=True)
    code = protoc.main([
        "grpc_tools.protoc",
        f"--proto_path=colm_wire/proto={PROTO}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        "colm_wire/proto/selector.proto",
    ])
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    return out_root / "colm_wire/proto"


if __name__ == "__main__":
    print(generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "client"))
