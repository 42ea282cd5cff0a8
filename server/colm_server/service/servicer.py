"""The gRPC servicer (asyncio): translates messages to and from `Job` calls; no selection logic here.

Every call is a coroutine on the server's event loop, so a client that stalls holds no thread and
the selector stays answerable however many calls wait. Whatever waits on a client has a deadline:
a call's first message and each next chunk of a push. Blocking work (journal reads, building batch
messages, checking adapter bytes) runs on a thread pool whose tasks never wait on clients.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from typing import TypeVar

import grpc

from colm_server.peak_memory import peak_device_bytes, peak_rss_bytes
from colm_server.service.batches import RankBatch
from colm_server.service.changes import Changes
from colm_server.service.inbox import Inbox, NotReceived, Waiting
from colm_server.service.job import ConnectionGone, Job, JobStopped, PendingAdapter
from colm_server.service.journal import StepNotJournaled
from colm_server.service.sync import AdapterError, AdapterReceiver
from colm_wire.contract import mismatches
from colm_wire.proto import selector_pb2 as pb
from colm_wire.proto import selector_pb2_grpc as pb_grpc
from colm_wire.quote import quote
from colm_wire.tensors import to_proto

logger = logging.getLogger(__name__)

T = TypeVar("T")
POLL = 0.5  # seconds between two looks at a waiting call's client, changes or not
# What a call may wait for from its client: description, and the setting holding its deadline.
AWAITED = {
    "join": ("the first message (a Join)", "first_message_timeout"),
    "first_chunk": ("the first adapter chunk", "first_message_timeout"),
    "next_chunk": ("the next adapter chunk", "chunk_timeout"),
}


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
    (``colm_wire.contract.settings`` of the selector's model); None checks none.
    ``first_message_timeout`` / ``chunk_timeout``: seconds a call may wait for its first message /
    a push for its next chunk (or for a push slot) before it is ended. ``max_pushes``: pushes
    received at once, each holding at most the adapter's bytes.
    ``pool`` runs the blocking parts; ``changes`` wakes waiting calls when the job changes.
    """

    def __init__(self, job: Job, *, job_id: str, fingerprint: str, pad_id: int,
                 max_adapter_bytes: int, pool: Executor, changes: Changes,
                 settings: Mapping[str, str] | None = None, first_message_timeout: float = 10.0,
                 chunk_timeout: float = 30.0, max_pushes: int = 2, waiting: Waiting | None = None):
        self.job, self.job_id, self.fingerprint = job, job_id, fingerprint
        self.pad_id, self.max_adapter_bytes = pad_id, max_adapter_bytes
        self.settings = None if settings is None else dict(settings)
        self.timeouts = {"first_message_timeout": first_message_timeout, "chunk_timeout": chunk_timeout}
        self.max_pushes = max_pushes
        self._push_slots = asyncio.Semaphore(max_pushes)
        self._pool, self.changes = pool, changes
        self.waiting = waiting if waiting is not None else Waiting()

    async def _run(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _receive(self, inbox: Inbox, awaited: str, context: grpc.aio.ServicerContext):
        """The call's next message (None at its half-close) within its deadline; else the call
        ends with DEADLINE_EXCEEDED naming the message and the setting."""
        what, key = AWAITED[awaited]
        try:
            with self.waiting.on(awaited):
                return await inbox.next(self.timeouts[key], what)
        except NotReceived as exc:
            logger.warning("call from %s ended: %s", context.peer(), exc)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"{exc} (service.{key})")

    # --- Stream ---------------------------------------------------------------------------
    async def _check_join(self, join: pb.Join, context: grpc.aio.ServicerContext) -> None:
        w = self.job.world_size
        if join.job_id != self.job_id:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"service.job_id: trainer has {quote(join.job_id)}, selector has "
                                f"{quote(self.job_id)} (that job is not served here)")
        if join.world_size != w:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"service.world_size: trainer has {join.world_size}, selector has {w}")
        if join.rank >= w:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"rank {join.rank} outside world of {w}")
        if join.config_fingerprint and join.config_fingerprint != self.fingerprint:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"config fingerprint {quote(join.config_fingerprint)} disagrees with the "
                                f"selector's {self.fingerprint}")
        if join.expected and self.settings is not None \
                and (found := mismatches(join.expected, self.settings)):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "the trainer's model differs from the selector's: " + "; ".join(found))
        first = self.job.journal.first_step
        if first is not None and join.start_step < first:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE,
                                f"step {join.start_step} is no longer journaled; the oldest is {first}")
        selected = self.job.next_step  # a rank resumes after a step it received, never beyond
        if join.start_step > selected:  # waiting for it would let the selector run ahead unbounded
            await context.abort(grpc.StatusCode.OUT_OF_RANGE,
                                f"step {join.start_step} is not selected yet; {selected} steps are selected")

    async def Stream(self, request_iterator, context):
        inbox = Inbox(context)
        try:
            request = await self._receive(inbox, "join", context)
            if request is None or request.WhichOneof("kind") != "join":
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a Join")
            join = request.join
            await self._check_join(join, context)
            rank = join.rank
            try:
                connection = self.job.connect(rank, join.start_step, lambda: not context.done())
            except ValueError as exc:
                await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
            acks = asyncio.create_task(self._read_acks(inbox, rank, connection))
            try:
                while (step := await self._claim(rank, connection)) is not None:
                    yield await self._run(self._batch, step, rank, join.ids_only)
            except StepNotJournaled as exc:
                await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(exc))
            except JobStopped as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            finally:
                acks.cancel()
                self.job.disconnect(rank, connection)
        finally:
            inbox.close()

    async def _claim(self, rank: int, connection: int) -> int | None:
        """The next step this connection may send, once there is one; None when it has ended."""
        while True:
            changed = self.changes.next()
            try:
                step = self.job.claim_step(rank, connection)
            except ConnectionGone:
                return None
            if step is not None:
                return step
            await self.changes.wait(changed, POLL)

    def _batch(self, step: int, rank: int, ids_only: bool) -> pb.CoresetBatch:
        return to_message(self.job.journal.read(step, rank), self.pad_id, ids_only)

    async def _read_acks(self, inbox: Inbox, rank: int, connection: int) -> None:
        """Acks until the client half-closes; then this connection's stream ends."""
        try:
            while (request := await inbox.next()) is not None:
                if request.WhichOneof("kind") == "ack":
                    self.job.ack(rank, request.ack.step)
        except Exception:  # noqa: BLE001 - the call broke; its stream ends below
            pass
        finally:
            self.job.disconnect(rank, connection)

    # --- PushAdapter ----------------------------------------------------------------------
    async def PushAdapter(self, request_iterator, context):
        await self._push_slot(context)
        try:
            step, tensors = await self._receive_adapter(context)
        finally:
            self._push_slots.release()
        pending = await self._run(self.job.queue_adapter, tensors, step)
        try:
            version = await self._applied(pending, context.time_remaining())
        except JobStopped as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except TimeoutError as exc:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        return pb.PushReply(param_version=version)

    async def _push_slot(self, context: grpc.aio.ServicerContext) -> None:
        """Take one of the ``max_pushes`` slots, waiting at most ``chunk_timeout`` for one."""
        timeout = self.timeouts["chunk_timeout"]
        try:
            with self.waiting.on("push_slot"):
                await asyncio.wait_for(self._push_slots.acquire(), timeout)
        except TimeoutError:
            logger.warning("push from %s refused: all %d push slots stayed taken for %g s",
                           context.peer(), self.max_pushes, timeout)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"all {self.max_pushes} push slots are taken (service.max_pushes) and none "
                                f"freed within {timeout:g} s (service.chunk_timeout)")

    async def _receive_adapter(self, context: grpc.aio.ServicerContext) -> tuple[int, dict]:
        expected = {name: t.shape for name, t in self.job.adapter.items()}
        receiver = AdapterReceiver(job_id=self.job_id, expected=expected,
                                   max_bytes=self.max_adapter_bytes)
        inbox = Inbox(context)
        awaited = "first_chunk"
        try:
            while (chunk := await self._receive(inbox, awaited, context)) is not None:
                await self._run(receiver.feed, chunk)
                awaited = "next_chunk"
            return await self._run(receiver.finish)
        except AdapterError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"adapter refused: {exc}")
        finally:
            inbox.close()

    async def _applied(self, pending: PendingAdapter, timeout: float | None) -> int:
        """The version ``pending`` was applied as; TimeoutError after ``timeout`` s, JobStopped
        when the job ends first."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            changed = self.changes.next()
            if pending.applied.is_set():
                return pending.version
            if self.job.stopping:
                raise JobStopped(f"selector failed: {self.job.failure}" if self.job.failure
                                 else "selector is shutting down")
            left = POLL if deadline is None else min(POLL, deadline - loop.time())
            if left <= 0:
                raise TimeoutError("adapter not applied in time")
            await self.changes.wait(changed, left)

    # --- Status ---------------------------------------------------------------------------
    async def Status(self, request, context):
        if request.job_id and request.job_id != self.job_id:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"job {quote(request.job_id)} is not served here")
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
        reply.skipped.update(dict(job.stream.skipped))
        reply.source_seen.update(snap["source_seen"])
        reply.source_selected.update(snap["source_selected"])
        reply.source_target_share.update(snap["source_target_share"])
        reply.source_realised_share.update(snap["source_realised_share"])
        reply.source_weight.update(snap["source_weight"])
        return reply
