"""Check an adapter push chunk by chunk, before anything of it reaches the selector's model.

Each chunk is checked against its tensor's header, and each header against the selector's own
tensor (name, shape, a float dtype, and ``nbytes`` equal to what that shape and dtype take), as it
arrives: a push is refused at its first byte too many, so a push holds at most the adapter's own
bytes however much its client sends. The sha256 and finite values are checked once all is in.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping

import torch

from colm_wire.proto import selector_pb2 as pb
from colm_wire.quote import quote
from colm_wire.tensors import from_bytes, itemsize

FLOAT_DTYPES = ("float32", "bfloat16", "float16")


class AdapterError(ValueError):
    """A push that is refused whole: the selector keeps its weights."""


class AdapterReceiver:
    """One push being received: ``feed`` each chunk in order, then ``finish``.

    Either raises AdapterError at the first thing wrong; a refused receiver is not used again.
    """

    def __init__(self, *, job_id: str, expected: Mapping[str, torch.Size], max_bytes: int):
        self.job_id, self.max_bytes = job_id, max_bytes
        self.expected = {name: tuple(shape) for name, shape in expected.items()}
        self.trainer_step = 0
        self._digest = hashlib.sha256()
        self._checksum = ""
        self._started = False
        self._declared = 0  # bytes the headers so far announce
        self._headers: dict[str, pb.TensorHeader] = {}
        self._buffers: dict[str, bytearray] = {}
        self._filled: dict[str, int] = {}
        self._current: str | None = None

    def feed(self, chunk: pb.AdapterChunk) -> None:
        """Check one chunk and keep its bytes."""
        if not self._started:
            if chunk.job_id != self.job_id:
                raise AdapterError(f"push for job {quote(chunk.job_id)}; "
                                   f"this selector serves {self.job_id!r}")
            self.trainer_step, self._started = chunk.trainer_step, True
        if chunk.HasField("header"):
            self._start_tensor(chunk.header)
        elif self._current is None:
            raise AdapterError("data before the first tensor header")
        name, data = self._current, chunk.data
        filled, size = self._filled[name], len(self._buffers[name])
        if len(data) > size - filled:
            raise AdapterError(f"{name}: more bytes than the {size} its header declares")
        self._buffers[name][filled:filled + len(data)] = data
        self._filled[name] = filled + len(data)
        self._digest.update(data)
        if chunk.sha256:
            self._checksum = chunk.sha256

    def _start_tensor(self, h: pb.TensorHeader) -> None:
        self._check_complete(self._current)
        if h.name not in self.expected:
            raise AdapterError(f"unknown tensor {quote(h.name)}")
        if h.name in self._headers:
            raise AdapterError(f"tensor {quote(h.name)} sent twice")
        shape = self.expected[h.name]
        if tuple(h.shape) != shape:
            sent = list(h.shape) if len(h.shape) <= 8 else f"of {len(h.shape)} dimensions"
            raise AdapterError(f"{h.name}: shape {sent}, expected {list(shape)}")
        if h.dtype not in FLOAT_DTYPES:
            raise AdapterError(f"{h.name}: dtype {quote(h.dtype)}, expected one of {FLOAT_DTYPES}")
        size = math.prod(shape) * itemsize(h.dtype)
        if h.nbytes != size:
            raise AdapterError(f"{h.name}: header says {h.nbytes} bytes, a {list(shape)} {h.dtype} "
                               f"tensor has {size}")
        self._declared += size
        if self._declared > self.max_bytes:
            raise AdapterError(f"push exceeds the limit of {self.max_bytes} bytes")
        self._headers[h.name], self._current = h, h.name
        self._buffers[h.name], self._filled[h.name] = bytearray(size), 0

    def _check_complete(self, name: str | None) -> None:
        if name is not None and self._filled[name] != len(self._buffers[name]):
            raise AdapterError(f"{name}: {self._filled[name]} bytes received, header says "
                               f"{len(self._buffers[name])}")

    def finish(self) -> tuple[int, dict[str, torch.Tensor]]:
        """``(trainer_step, name -> tensor)`` once every tensor is complete, checksummed and finite."""
        if not self._started:
            raise AdapterError("empty push")
        missing = sorted(set(self.expected) - set(self._headers))
        if missing:
            raise AdapterError(f"missing tensors: {missing[:3]}{'...' if len(missing) > 3 else ''}")
        self._check_complete(self._current)
        if self._checksum != self._digest.hexdigest():
            raise AdapterError("checksum mismatch: the push was corrupted or truncated")
        tensors = {}
        for name, h in self._headers.items():
            tensor = from_bytes(self._buffers.pop(name), list(h.shape), h.dtype)
            if not torch.isfinite(tensor.float()).all():
                raise AdapterError(f"{name}: NaN or Inf values")
            tensors[name] = tensor
        return self.trainer_step, tensors


def receive_adapter(chunks: Iterable[pb.AdapterChunk], *, job_id: str,
                    expected: Mapping[str, torch.Size], max_bytes: int) -> tuple[int, dict]:
    """Check a whole push given as an iterable; returns (trainer_step, name -> tensor)."""
    receiver = AdapterReceiver(job_id=job_id, expected=expected, max_bytes=max_bytes)
    for chunk in chunks:
        receiver.feed(chunk)
    return receiver.finish()
