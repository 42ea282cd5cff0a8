"""Push a trainer's LoRA adapter to the selector so its selections follow training."""

from __future__ import annotations

import logging
import os

import grpc
from torch import nn

from colm_client.channel import open_channel
from colm_wire.adapter import adapter_chunks, adapter_state
from colm_wire.proto import selector_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


class AdapterSync:
    """Every `every` steps, rank `push_rank` pushes its adapter; the others do nothing.

    `token` and `tls_ca` default to ``$COLM_AUTH_TOKEN_FILE`` and ``$COLM_TLS_CA`` (see `open_channel`).
    """

    def __init__(self, target: str, model: nn.Module, every: int, job_id: str = "default",
                 rank: int | None = None, push_rank: int = 0, timeout: float = 120.0, *,
                 token: str | None = None, tls_ca: str | os.PathLike | bytes | None = None):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.model, self.every, self.job_id, self.timeout = model, every, job_id, timeout
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        self.push_rank = push_rank
        self._channel = open_channel(target, token=token, tls_ca=tls_ca, options=[
            ("grpc.max_send_message_length", 64 << 20)])
        self._stub = pb_grpc.SelectorStub(self._channel)
        self.version: int | None = None

    def maybe_push(self, step: int) -> int | None:
        """Push after step `step` when it is a multiple of `every`; the new param version.

        A selector that is down or restarting does not stop training: the push is skipped
        with a warning (None) and the next one carries newer weights. A refused push raises.
        """
        if self.rank != self.push_rank or (step + 1) % self.every:
            return None
        try:
            return self.push(step)
        except grpc.RpcError as err:
            if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            logger.warning("adapter push of step %d skipped: selector %s (%s)", step,
                           err.code().name.lower(), err.details())
            return None

    def push(self, step: int) -> int:
        state = {k: v.detach() for k, v in adapter_state(self.model).items()}
        reply = self._stub.PushAdapter(adapter_chunks(state, self.job_id, step),
                                       timeout=self.timeout)
        self.version = reply.param_version
        logger.info("adapter of step %d pushed: selector param version %d", step, self.version)
        return self.version

    def close(self) -> None:
        self._channel.close()
