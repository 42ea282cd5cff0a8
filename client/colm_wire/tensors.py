"""torch tensors to and from the wire format (`colm.v1.Tensor`): raw little-endian bytes."""

from __future__ import annotations

import torch

from colm_wire.proto import selector_pb2 as pb

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The tensor's contents, contiguous, row-major (bfloat16 via its 16-bit pattern)."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def itemsize(dtype: str) -> int:
    """Bytes per element of a wire dtype name."""
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def from_bytes(data: bytes, shape: list[int], dtype: str) -> torch.Tensor:
    """Inverse of `tensor_bytes`; ValueError when the sizes disagree or the dtype is unknown."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    wire = torch.int16 if dtype == "bfloat16" else DTYPES[dtype]
    numel = 1
    for d in shape:
        if d < 0:
            raise ValueError(f"negative dimension in shape {shape}")
        numel *= d
    expected = numel * itemsize(dtype)
    if len(data) != expected:
        raise ValueError(f"{len(data)} bytes for shape {shape} {dtype} (expected {expected})")
    flat = torch.frombuffer(bytearray(data), dtype=wire) if data else torch.empty(0, dtype=wire)
    return flat.view(DTYPES[dtype]).reshape(shape)


def to_proto(t: torch.Tensor) -> pb.Tensor:
    return pb.Tensor(shape=list(t.shape), dtype=NAMES[t.dtype], data=tensor_bytes(t))


def from_proto(msg: pb.Tensor) -> torch.Tensor:
    return from_bytes(msg.data, list(msg.shape), msg.dtype)
