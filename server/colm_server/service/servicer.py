"""The gRPC servicer: translates messages to and from `Job` calls; no selection logic here."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

import grpc

from colm_server.contract import mismatches
from colm_server.peak_memory import peak_device_bytes, peak_rss_bytes
from colm_server.service.batches import RankBatch
from colm_server.service.job import Job, JobStopped
from colm_server.service.journal import StepNotJournaled
from colm_server.service.quote import quote
from colm_server.service.sync import AdapterError, receive_adapter
from colm_wire.proto import selector_pb2 as pb
from colm_wire.proto import selector_pb2_grpc as pb_grpc
from colm_wire.tensors import to_proto

logger = logging.getLogger(__name__)


def to_message(rb: RankBatch, pad_id: int, ids_only: bool) -> pb.CoresetBatch:
    msg = pb.CoresetBatch(step=rb.step, rank=rb.rank, epoch=rb.epoch, ids=rb.ids,
                          weights=rb.weights, sources=rb.sources, param_version=rb.param_version,
                          step_weight_sum=rb.step_weight_sum)
    if not ids_only:  # int32 on the wire: a third of the bytes of int64; the client widens
        input_ids, labels, mask = rb.padded(pad_id)
        msg.input_ids.CopyFrom(to_proto(input_ids))
        msg.labels.CopyFrom(to_proto(labels))
        msg.attention_mask.CopyFrom(to_proto(mask))
    return msg


class SelectorServicer(pb_grpc.SelectorServicer):
    """Serves one job: joins, per-rank batch streams, adapter pushes and status.

    ``settings``: the model settings a joining trainer's ``Join.expected`` must match
    (``colm_server.contract.settings`` of the selector's model); None checks none.
    """

    def __init__(self, job: Job, *, job_id: str, fingerprint: str, pad_id: int,
                 max_adapter_bytes: int, settings: Mapping[str, str] | None = None):
        self.job, self.job_id, self.fingerprint = job, job_id, fingerprint
        self.pad_id, self.max_adapter_bytes = pad_id, max_adapter_bytes
        self.settings = None if settings is None else dict(settings)

    def _check_join(self, join: pb.Join, context: grpc.ServicerContext) -> None:
        w = self.job.world_size
        if join.job_id != self.job_id:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"service.job_id: trainer has {quote(join.job_id)}, selector has "
                          f"{quote(self.job_id)} (that job is not served here)")
        if join.world_size != w:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"service.world_size: trainer has {join.world_size}, selector has {w}")
        if join.rank >= w:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"rank {join.rank} outside world of {w}")
        if join.config_fingerprint and join.config_fingerprint != self.fingerprint:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"config fingerprint {quote(join.config_fingerprint)} disagrees with the "
                          f"selector's {self.fingerprint}")
        if join.expected and self.settings is not None \
                and (found := mismatches(join.expected, self.settings)):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "the trainer's model differs from the selector's: " + "; ".join(found))
        first = self.job.journal.first_step
        if first is not None and join.start_step < first:
            context.abort(grpc.StatusCode.OUT_OF_RANGE,
                          f"step {join.start_step} is no longer journaled; the oldest is {first}")
        selected = self.job.next_step  # a rank resumes after a step it received, never beyond
        if join.start_step > selected:  # waiting for it would let the selector run ahead unbounded
            context.abort(grpc.StatusCode.OUT_OF_RANGE,
                          f"step {join.start_step} is not selected yet; {selected} steps are selected")

    def Stream(self, request_iterator, context):
        request = next(request_iterator, None)
        if request is None or request.WhichOneof("kind") != "join":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a Join")
        join = request.join
        self._check_join(join, context)
        rank = join.rank
        try:
            connection = self.job.connect(rank, join.start_step, context.is_active)
        except ValueError as exc:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        context.add_callback(lambda: self.job.disconnect(rank, connection))
        threading.Thread(target=self._read_acks, args=(request_iterator, rank, connection),
                         daemon=True).start()
        try:
            while (rb := self.job.next_batch(rank, connection)) is not None:
                yield to_message(rb, self.pad_id, join.ids_only)
        except StepNotJournaled as exc:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, str(exc))
        except JobStopped as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        finally:
            self.job.disconnect(rank, connection)

    def _read_acks(self, requests, rank: int, connection: int) -> None:
        """Acks until the client half-closes; then this connection's stream ends."""
        try:
            for request in requests:
                if request.WhichOneof("kind") == "ack":
                    self.job.ack(rank, request.ack.step)
        except grpc.RpcError:
            pass  # cancelled: the termination callback disconnects
        finally:
            self.job.disconnect(rank, connection)

    def PushAdapter(self, request_iterator, context):
        expected = {name: t.shape for name, t in self.job.adapter.items()}
        try:
            step, tensors = receive_adapter(request_iterator, job_id=self.job_id, expected=expected,
                                            max_bytes=self.max_adapter_bytes)
        except AdapterError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"adapter refused: {exc}")
        try:
            version = self.job.push_adapter(tensors, step, timeout=context.time_remaining())
        except JobStopped as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except TimeoutError as exc:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        return pb.PushReply(param_version=version)

    def Status(self, request, context):
        if request.job_id and request.job_id != self.job_id:
            context.abort(grpc.StatusCode.NOT_FOUND, f"job {quote(request.job_id)} is not served here")
        job = self.job
        snap = job.snapshot()
        reply = pb.StatusReply(
            job_id=self.job_id, world_size=job.world_size, config_fingerprint=self.fingerprint,
            selected_steps=snap["selected_steps"], param_version=snap["param_version"],
            epoch=job.stream.epoch, journal_first_step=job.journal.first_step or 0,
            truncated=snap["truncated"], selections=snap["selections"],
            selection_seconds=snap["selection_seconds"], peak_rss_bytes=peak_rss_bytes(),
            peak_device_bytes=peak_device_bytes(), error=job.failure or "",
        )
        for r, (connected, next_step, acked) in enumerate(snap["ranks"]):
            reply.ranks.add(rank=r, connected=connected, next_step=next_step,
                            acked_step=max(acked, 0))
        reply.skipped.update(job.stream.skipped)
        reply.source_seen.update(snap["source_seen"])
        reply.source_selected.update(snap["source_selected"])
        return reply
