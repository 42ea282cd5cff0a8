"""The committed stubs are what protoc makes from the .proto today."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_generator():
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos/generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_the_proto(tmp_path):
    gen = load_generator()
    fresh = gen.generate(tmp_path)
    for name in gen.STUBS:
        committed = ROOT / "client/colm_wire/proto" / name
        assert committed.read_text() == (fresh / name).read_text(), (
            f"{name} is out of date: run `python protos/generate.py`"
        )


def test_stubs_import_and_round_trip_a_batch():
    from colm_wire.proto import selector_pb2, selector_pb2_grpc

    batch = selector_pb2.CoresetBatch(step=3, ids=["a", "b"], weights=[1.5, 2.0],
                                      sources=["x", "y"], param_version=7)
    again = selector_pb2.CoresetBatch.FromString(batch.SerializeToString())
    assert again == batch and list(again.weights) == [1.5, 2.0]
    assert hasattr(selector_pb2_grpc, "SelectorStub")
    assert "colm_wire.proto.selector_pb2" in sys.modules
