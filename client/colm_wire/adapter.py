"""A LoRA adapter on the wire: which parameters it is, and the chunk stream that carries it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch import nn

from colm_wire.proto import selector_pb2 as pb
from colm_wire.tensors import NAMES, tensor_bytes

CHUNK_BYTES = 1 << 20


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's LoRA parameters by name, the adapter name dropped (as peft saves them)."""
    adapter = getattr(model, "active_adapter", "default")
    return {
        ".".join(part for part in name.split(".") if part != adapter): param
        for name, param in model.named_parameters()
        if "lora_" in name
    }


def adapter_chunks(state: dict[str, torch.Tensor], job_id: str, trainer_step: int,
                   chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.AdapterChunk]:
    """The push as a stream of chunks: a header per tensor, the sha256 on the last chunk."""
    digest = hashlib.sha256()
    messages: list[pb.AdapterChunk] = []
    for name, tensor in state.items():
        data = tensor_bytes(tensor)
        digest.update(data)
        header = pb.TensorHeader(name=name, shape=list(tensor.shape), dtype=NAMES[tensor.dtype],
                                 nbytes=len(data))
        pieces = [data[i:i + chunk_bytes] for i in range(0, len(data), chunk_bytes)] or [b""]
        for i, piece in enumerate(pieces):
            messages.append(pb.AdapterChunk(header=header if i == 0 else None, data=piece))
    if not messages:
        raise ValueError("the model has no LoRA parameters to push")
    messages[0].job_id = job_id
    messages[0].trainer_step = trainer_step
    messages[-1].sha256 = digest.hexdigest()
    yield from messages
