"""`CoresetStream`: a trainer rank's iterable of weighted coreset batches from the selector."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import grpc
import torch

from colm_client.channel import TOKEN_FILE_ENV, open_channel, resolve_tls_ca, resolve_token
from colm_wire.proto import selector_pb2 as pb
from colm_wire.proto import selector_pb2_grpc as pb_grpc
from colm_wire.tensors import from_proto

logger = logging.getLogger(__name__)

# Only an unavailable selector is waited for; any other code, UNAUTHENTICATED included (a wrong or
# missing token does not fix itself), ends the stream with CoresetStreamError.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


@dataclass
class CoresetBatch:
    """One step's share for this rank; tensors are None when the rank asked for ids only.

    ``step_weight_sum`` is the sum of every rank's weights of this step, for
    ``weighted_loss(..., total_weight=batch.step_weight_sum)``; None from a selector that does
    not send it (the loss then normalises by this rank's weights).
    """

    step: int
    epoch: int
    ids: list[str]
    weights: torch.Tensor  # [b] float32
    sources: list[str]
    param_version: int
    input_ids: torch.Tensor | None
    labels: torch.Tensor | None
    attention_mask: torch.Tensor | None
    step_weight_sum: float | None = None

    @classmethod
    def from_message(cls, msg: pb.CoresetBatch) -> CoresetBatch:
        tensors = {  # int64, as models and losses expect
            name: from_proto(getattr(msg, name)).long() if msg.HasField(name) else None
            for name in ("input_ids", "labels", "attention_mask")
        }
        return cls(step=msg.step, epoch=msg.epoch, ids=list(msg.ids),
                   weights=torch.tensor(list(msg.weights), dtype=torch.float32),
                   sources=list(msg.sources), param_version=msg.param_version,
                   step_weight_sum=msg.step_weight_sum or None,  # 0: an older selector, unknown
                   **tensors)


class CoresetStreamError(RuntimeError):
    """The selector refused the stream (bad join, step no longer journaled, ...)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class CoresetStream:
    """Iterate this rank's batches from `start_step` on; acknowledges each consumed batch.

    When the selector is unavailable (restarting, shutting down) it reconnects with
    exponential backoff and resumes at the next step it has not yielded; other errors are
    raised as `CoresetStreamError`. Rank and world size default to torchrun's environment;
    `token` and `tls_ca` default to ``$COLM_AUTH_TOKEN_FILE`` and ``$COLM_TLS_CA`` (see `open_channel`).
    `expected`: the model settings of this trainer, ``{key: JSON value}`` as
    ``colm_wire.contract.settings`` makes them; the selector refuses the join
    (``FAILED_PRECONDITION``, naming the key and both values) when one differs from its own.
    """

    def __init__(self, target: str, job_id: str = "default", rank: int | None = None,
                 world_size: int | None = None, start_step: int = 0, payload: bool = True,
                 config_fingerprint: str = "", reconnect_timeout: float = 300.0,
                 max_message_mb: int = 64, *, token: str | None = None,
                 tls_ca: str | os.PathLike | bytes | None = None,
                 expected: Mapping[str, str] | None = None):
        self.target, self.job_id = target, job_id
        # Resolved once: every reconnect uses the same credentials, and a bad file fails here.
        self._token, self._tls_ca = resolve_token(token), resolve_tls_ca(tls_ca)
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        self.world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        self.next_step = start_step
        self.payload, self.fingerprint = payload, config_fingerprint
        self.expected = dict(expected or {})
        self.reconnect_timeout = reconnect_timeout
        self._options = [("grpc.max_receive_message_length", max_message_mb << 20)]
        self._requests: queue.Queue | None = None
        self._call = None
        self._channel: grpc.Channel | None = None

    def _request_iter(self, requests: queue.Queue) -> Iterator[pb.StreamRequest]:
        while (request := requests.get()) is not None:
            yield request

    def _open(self, deadline: float) -> Iterator[pb.CoresetBatch]:
        self._channel = open_channel(self.target, token=self._token, tls_ca=self._tls_ca,
                                     options=self._options)
        try:  # wait for the selector, but not past the reconnect deadline
            grpc.channel_ready_future(self._channel).result(timeout=max(deadline - time.monotonic(), 0))
        except grpc.FutureTimeoutError:
            raise CoresetStreamError(grpc.StatusCode.UNAVAILABLE,
                                     f"selector at {self.target} unreachable for "
                                     f"{self.reconnect_timeout:.0f}s") from None
        self._requests = queue.Queue()
        self._requests.put(pb.StreamRequest(join=pb.Join(
            job_id=self.job_id, rank=self.rank, world_size=self.world_size,
            start_step=self.next_step, ids_only=not self.payload,
            config_fingerprint=self.fingerprint, expected=self.expected)))
        stub = pb_grpc.SelectorStub(self._channel)
        self._call = stub.Stream(self._request_iter(self._requests), wait_for_ready=True)
        return self._call

    def _close_call(self) -> None:
        """Half-close so the selector ends this connection now, then drop the call."""
        call, requests = self._call, self._requests
        self._requests = self._call = None
        if requests is not None:
            requests.put(None)
        if call is not None:
            # Wait (briefly) for the server to end the stream: a reconnect right after this
            # must not find the old connection still live. Batches still in flight are
            # discarded; they are resent from the journal.
            timer = threading.Timer(5.0, call.cancel)
            timer.start()
            try:
                for _ in call:
                    pass
            except grpc.RpcError:
                pass
            finally:
                timer.cancel()
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def __iter__(self) -> Iterator[CoresetBatch]:
        delay, deadline = 0.2, None
        try:
            while True:
                try:
                    for msg in self._open(deadline or time.monotonic() + self.reconnect_timeout):
                        if msg.step != self.next_step:
                            raise CoresetStreamError(grpc.StatusCode.DATA_LOSS,
                                                     f"expected step {self.next_step}, got {msg.step}")
                        delay, deadline = 0.2, None
                        yield CoresetBatch.from_message(msg)
                        # The trainer asked for the next batch: this one is consumed.
                        self._requests.put(pb.StreamRequest(ack=pb.Ack(step=msg.step)))
                        self.next_step = msg.step + 1
                    return
                except grpc.RpcError as err:
                    code = err.code()
                    if code == grpc.StatusCode.UNAUTHENTICATED:
                        raise CoresetStreamError(code, f"{err.details()}: give the selector's token with "
                                                       f"token= or ${TOKEN_FILE_ENV}") from None
                    if code not in RETRYABLE:
                        raise CoresetStreamError(code, err.details()) from None
                    deadline = deadline or time.monotonic() + self.reconnect_timeout
                    if time.monotonic() > deadline:
                        raise CoresetStreamError(code, f"gave up reconnecting: {err.details()}") from None
                    logger.warning("selector unavailable (%s); reconnecting at step %d in %.1fs",
                                   err.details(), self.next_step, delay)
                    self._close_call()
                    time.sleep(delay)  # backoff before reconnecting, not synchronisation
                    delay = min(delay * 2, 10.0)
        finally:
            self._close_call()

    def close(self) -> None:
        self._close_call()
