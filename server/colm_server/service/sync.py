"""Validate an adapter push whole before anything of it reaches the selector's model."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

from colm_server.service.quote import quote
from colm_wire.proto import selector_pb2 as pb
from colm_wire.tensors import from_bytes

FLOAT_DTYPES = ("float32", "bfloat16", "float16")


class AdapterError(ValueError):
    """A push that is refused whole: the selector keeps its weights."""


def receive_adapter(chunks: Iterable[pb.AdapterChunk], *, job_id: str,
                    expected: dict[str, torch.Size], max_bytes: int) -> tuple[int, dict]:
    """Assemble and check a push; returns (trainer_step, name -> tensor) or raises AdapterError.

    Checked: the job, every name known and present once, shapes, a float dtype, byte counts,
    the total size, the sha256 of all bytes in order, and finite values.
    """
    digest = hashlib.sha256()
    parts: dict[str, list[bytes]] = {}
    headers: dict[str, pb.TensorHeader] = {}
    current: str | None = None
    total, trainer_step, checksum, first = 0, 0, "", True
    for chunk in chunks:
        if first:
            if chunk.job_id != job_id:
                raise AdapterError(f"push for job {quote(chunk.job_id)}; this selector serves {job_id!r}")
            trainer_step, first = chunk.trainer_step, False
        if chunk.HasField("header"):
            h = chunk.header
            if h.name not in expected:
                raise AdapterError(f"unknown tensor {quote(h.name)}")
            if h.name in headers:
                raise AdapterError(f"tensor {quote(h.name)} sent twice")
            if tuple(h.shape) != tuple(expected[h.name]):
                shape = list(h.shape) if len(h.shape) <= 8 else f"of {len(h.shape)} dimensions"
                raise AdapterError(f"{h.name}: shape {shape}, expected {list(expected[h.name])}")
            if h.dtype not in FLOAT_DTYPES:
                raise AdapterError(f"{h.name}: dtype {quote(h.dtype)}, expected one of {FLOAT_DTYPES}")
            headers[h.name], parts[h.name], current = h, [], h.name
        elif current is None:
            raise AdapterError("data before the first tensor header")
        total += len(chunk.data)
        if total > max_bytes:
            raise AdapterError(f"push exceeds the limit of {max_bytes} bytes")
        parts[current].append(chunk.data)
        digest.update(chunk.data)
        if chunk.sha256:
            checksum = chunk.sha256
    if first:
        raise AdapterError("empty push")
    missing = sorted(set(expected) - set(headers))
    if missing:
        raise AdapterError(f"missing tensors: {missing[:3]}{'...' if len(missing) > 3 else ''}")
    if checksum != digest.hexdigest():
        raise AdapterError("checksum mismatch: the push was corrupted or truncated")
    tensors = {}
    for name, h in headers.items():
        data = b"".join(parts[name])
        if len(data) != h.nbytes:
            raise AdapterError(f"{name}: {len(data)} bytes received, header says {h.nbytes}")
        try:
            tensor = from_bytes(data, list(h.shape), h.dtype)
        except ValueError as exc:
            raise AdapterError(f"{name}: {exc}") from exc
        if not torch.isfinite(tensor.float()).all():
            raise AdapterError(f"{name}: NaN or Inf values")
        tensors[name] = tensor
    return trainer_step, tensors
