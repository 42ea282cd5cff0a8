"""One training job: draw, select, deal, journal; then hand each rank its batches in order.

A producer thread turns the record stream into steps: ``W*L`` records, one selection of
``W*b``, ``b`` per rank, journaled before any rank can see them. It runs at most
``prefetch`` steps ahead of the slowest rank, and adapter pushes are swapped in between two
selections. Ranks read committed steps from the journal, so a reconnecting rank and a
restarted selector see exactly the same batches.

The job is ready once its producer has selected a step or waits at the prefetch bound; when the
producer fails it stops for good, every waiting rank gets the failure, and ``on_failure`` is told.

The job's lock guards bookkeeping only: no I/O and no tensor work runs under it, so an event loop
may call the quick methods (``connect``, ``claim_step``, ``ack``, ``snapshot``) directly, and
``add_listener`` tells it when to look again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from colm_server.data.collate import Collator
from colm_server.data.shards import ShardStream
from colm_server.peak_memory import DevicePeakWindow
from colm_server.select import Selection, Selector
from colm_server.select.mixture import realised_shares
from colm_server.service.batches import RankBatch, deal, pack_rows
from colm_server.service.journal import Journal
from colm_server.service.replicas import Leader

logger = logging.getLogger(__name__)


class JobStopped(RuntimeError):
    """The job is shutting down; streams end with a status the client retries on."""


class ConnectionGone(Exception):
    """The connection is no longer its rank's live one, or its client is gone: its stream ends."""


@dataclass
class RankState:
    """Flow-control bookkeeping of one rank."""

    connected: bool = False
    acked: int = -1  # last step the rank acknowledged
    next_step: int = 0  # next step to send
    connection: int = 0  # id of the live connection; a stale stream sees it change
    is_active: Callable[[], bool] = lambda: False


@dataclass
class PendingAdapter:
    """Validated adapter weights waiting for the gap between two selections."""

    tensors: dict[str, torch.Tensor]
    trainer_step: int
    applied: threading.Event = field(default_factory=threading.Event)
    version: int = 0
    superseded: list[PendingAdapter] = field(default_factory=list)  # older pushes this one replaced


class Job:
    """Produces the steps of one job and serves them to its ranks."""

    def __init__(
        self,
        *,
        selector: Selector,
        collator: Collator,
        stream: ShardStream,
        journal: Journal,
        world_size: int,
        records_per_step: int,
        prefetch: int,
        max_inflight: int,
        adapter: dict[str, torch.Tensor] | None = None,
        on_adapter: Callable[[dict[str, torch.Tensor], int], None] | None = None,
        on_selected: Callable[[Selection, float], None] | None = None,
        on_failure: Callable[[str], None] | None = None,
        leader: Leader | None = None,
    ):
        self.selector, self.collator, self.stream, self.journal = selector, collator, stream, journal
        self.world_size, self.records_per_step = world_size, records_per_step  # W, and W*L
        self.prefetch, self.max_inflight = prefetch, max_inflight
        self.adapter = adapter or {}  # name -> live parameter tensor the selector scores with
        self.on_adapter = on_adapter  # persists an applied adapter (work dir)
        self.on_selected = on_selected  # sees each journaled selection and its seconds (metrics)
        self.on_failure = on_failure  # told the reason once the producer has failed (health, exit)
        self.leader = leader  # with selector replicas: keeps them in lockstep (producer thread only)
        self.ranks = [RankState() for _ in range(world_size)]
        self.param_version = 0
        self.param_step = 0  # next_step when the current adapter was swapped in
        self.next_step = 0  # next step to select
        self.source_seen: dict[str, int] = {}  # samples drawn per source, committed steps only
        self.source_selected: dict[str, int] = {}
        self.source_weight: dict[str, float] = {}  # loss weight selected per source, committed steps
        self.truncated = 0  # samples cut to max_length, committed steps only
        self.selections, self.selection_seconds = 0, 0.0  # this process only: not journaled
        self.selection_peak_device = 0  # CUDA bytes held at most during the last selection (0 on CPU)
        self._pending: PendingAdapter | None = None
        self._cond = threading.Condition()
        self._applying = threading.Lock()  # one adapter swap at a time (producer, or a push once it ended)
        self._listeners: list[Callable[[], None]] = []
        self._stopping = False
        self._ready = False  # the producer selected a step, or waits at the prefetch bound
        self._error: BaseException | None = None
        self._failure_told = False  # on_failure has returned
        self._thread: threading.Thread | None = None
        self._restore()
        self.target_share = selector.target_shares()  # the selector's, moved with each committed step

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (quick, non-blocking, with the job's lock held) after every state change."""
        with self._cond:
            self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        with self._cond:
            self._listeners.remove(callback)

    def _notify(self) -> None:
        """Wake the job's own waiters and tell the listeners (called with the lock held)."""
        self._cond.notify_all()
        for callback in self._listeners:
            callback()

    @property
    def stopping(self) -> bool:
        """The job is shutting down or its producer has failed: nothing new will be applied."""
        return self._stopping or self._error is not None

    # --- producer -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._produce, name="colm-producer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop producing; the step being selected is finished and journaled first."""
        with self._cond:
            self._stopping = True
            self._notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the producer has shown it can produce, has failed (and ``on_failure`` has
        returned), or the job stops.

        True when it is ready and has not failed: a step selected in this process, or all the steps
        the prefetch bound allows already journaled.
        """
        with self._cond:
            self._cond.wait_for(lambda: self._ready or self._failure_told or self._stopping, timeout)
            return self._ready and self._error is None

    @property
    def failure(self) -> str | None:
        """Why the producer stopped for good, or None while it has not failed."""
        error = self._error
        return None if error is None else f"{type(error).__name__}: {error}"

    def _slowest(self) -> int:
        return min(r.acked for r in self.ranks) + 1

    def _produce(self) -> None:
        try:
            if self.leader is not None:  # every collective runs on this thread, in one order
                self.leader.share_state(self.journal.state())
            while True:
                # Idle or not, no selection runs here: a push may be swapped in now,
                # so a trainer waiting for its push never waits on a stalled rank.
                self._apply_pending()
                with self._cond:
                    if self._stopping:
                        break
                    if self._pending is not None:  # pushed meanwhile: swap it in first
                        continue
                    if self.next_step >= self._slowest() + self.prefetch:
                        if not self._ready:  # every step the bound allows is journaled
                            self._ready = True
                            self._notify()
                        self._cond.wait()
                        continue
                    step = self.next_step
                self._select_step(step)
            if self.leader is not None:  # outside the lock: the replicas' last collective
                self.leader.announce_stop()
        except BaseException as exc:  # noqa: BLE001 - surfaced to every waiting rank
            logger.exception("producer failed")
            with self._cond:
                self._error = exc
                self._notify()
            try:
                if self.on_failure is not None:
                    self.on_failure(self.failure)
            finally:
                with self._cond:  # wait_ready returns once the failure has been handled
                    self._failure_told = True
                    self._notify()

    def _select_step(self, step: int) -> None:
        records = self.stream.take(self.records_per_step)
        batch = self.collator(records)
        if self.leader is not None:
            self.leader.announce_step(step, batch.ids)
        started = time.perf_counter()
        with DevicePeakWindow() as peak:  # the device peak of this selection alone
            sel = self.selector.select(batch, step=step)
        elapsed = time.perf_counter() - started
        chosen = sel.indices.tolist()
        weight_of = dict(zip(chosen, sel.weights.tolist()))
        step_weight_sum = sum(weight_of[i] for i in chosen)  # every rank's, sent to each rank
        counts = batch.token_counts().tolist()
        dealt = deal(chosen, [counts[i] for i in chosen], self.world_size)
        epoch = int(records[-1].get("epoch", 0)) if records else 0
        ranks = []
        for r, rows in enumerate(dealt):
            tokens, lengths, prompt_lens = pack_rows(batch, rows)
            ranks.append(RankBatch(
                step=step, rank=r, epoch=epoch, param_version=self.param_version,
                ids=[batch.ids[i] for i in rows], sources=[batch.sources[i] for i in rows],
                weights=[weight_of[i] for i in rows], tokens=tokens, lengths=lengths,
                prompt_lens=prompt_lens, step_weight_sum=step_weight_sum,
            ))
        truncated = self.truncated + batch.num_truncated
        seen, selected = dict(self.source_seen), dict(self.source_selected)
        weight = dict(self.source_weight)
        for s in batch.sources:
            seen[s] = seen.get(s, 0) + 1
        for i in chosen:
            selected[batch.sources[i]] = selected.get(batch.sources[i], 0) + 1
            weight[batch.sources[i]] = weight.get(batch.sources[i], 0.0) + weight_of[i]
        self.journal.commit(step, ranks, self._state(step + 1, seen, selected, weight, truncated))
        target = self.selector.target_shares()  # here: the producer thread owns the selector
        with self._cond:  # counters move with the step, so a status is one consistent snapshot
            self.next_step, self.source_seen, self.source_selected = step + 1, seen, selected
            self.source_weight, self.target_share = weight, target
            self.truncated = truncated
            self.selections += 1
            self.selection_seconds += elapsed
            self.selection_peak_device = peak.device_bytes
            self._ready = True
            self._notify()
        if self.on_selected is not None:
            self.on_selected(sel, elapsed)

    def snapshot(self) -> dict:
        """Progress and counters as of the last committed step."""
        with self._cond:
            return {
                "selected_steps": self.next_step, "param_version": self.param_version,
                "param_step": self.param_step,
                "source_seen": dict(self.source_seen), "source_selected": dict(self.source_selected),
                "source_weight": dict(self.source_weight),
                "source_target_share": dict(self.target_share),
                "source_realised_share": realised_shares(self.source_weight),
                "truncated": self.truncated,
                "selections": self.selections, "selection_seconds": self.selection_seconds,
                "selection_peak_device_bytes": self.selection_peak_device,
                "ranks": [(r.connected, r.next_step, r.acked) for r in self.ranks],
            }

    def _state(self, next_step: int, seen: dict, selected: dict, weight: dict, truncated: int) -> dict:
        return {
            "next_step": next_step,
            "param_version": self.param_version,
            "stream": self.stream.state_dict(),
            "selector": self.selector.state_dict(),
            "source_seen": seen,
            "source_selected": selected,
            "source_weight": weight,
            "truncated": truncated,
        }

    def _restore(self) -> None:
        state = self.journal.state()
        if state is None:
            return
        self.next_step = state["next_step"]
        self.param_version = state["param_version"]
        self.stream.load_state_dict(state["stream"])
        self.selector.load_state_dict(state["selector"])
        self.source_seen = dict(state["source_seen"])
        self.source_selected = dict(state["source_selected"])
        self.source_weight = dict(state.get("source_weight", {}))  # absent from older journals
        self.truncated = state["truncated"]
        self.param_step = self.next_step  # not journaled: staleness counts from the restart
        for r in self.ranks:  # ranks rejoin with their own start_step
            r.acked = self.next_step - 1 - self.prefetch
        logger.info("resumed at step %d, param version %d", self.next_step, self.param_version)

    # --- adapter sync ---------------------------------------------------------------------
    def push_adapter(self, tensors: dict[str, torch.Tensor], trainer_step: int,
                     timeout: float | None = None) -> int:
        """Queue validated weights; return the version once applied between two selections."""
        pending = self.queue_adapter(tensors, trainer_step)
        if not pending.applied.wait(timeout):
            raise TimeoutError("adapter not applied in time")
        return pending.version

    def queue_adapter(self, tensors: dict[str, torch.Tensor], trainer_step: int) -> PendingAdapter:
        """Queue validated weights for the gap between two selections; ``applied`` is set then.

        Without a running producer (not started, stopped or failed) they are applied here.
        """
        pending = PendingAdapter(tensors, trainer_step)
        with self._cond:
            older = self._pending  # a newer push supersedes one not yet applied: its caller
            if older is not None:  # is answered with the version that replaced it
                pending.superseded += [older, *older.superseded]
                older.tensors = {}  # never applied: its weights need not stay in memory
            self._pending = pending
            self._notify()
        if self._thread is None or not self._thread.is_alive():
            self._apply_pending()
        return pending

    def _apply_pending(self) -> None:
        """Swap in the pending adapter between two selections (called without the lock).

        Copying and persisting run outside the lock, so bookkeeping never waits on them; the
        version moves, and waiting pushes are answered, once the new weights are in place.
        """
        with self._applying:
            with self._cond:
                pending, self._pending = self._pending, None
                version = self.param_version + 1
            if pending is None:
                return
            with torch.no_grad():
                for name, value in pending.tensors.items():
                    self.adapter[name].copy_(value.to(self.adapter[name]))
            if self.on_adapter is not None:
                self.on_adapter(pending.tensors, version)
            if self.leader is not None:
                self.leader.adapter_applied()
            with self._cond:
                self.param_version = version
                self.param_step = self.next_step
                for done in (pending, *pending.superseded):
                    done.version = version
                    done.applied.set()
                self._notify()
        logger.info("adapter from trainer step %d applied as version %d", pending.trainer_step, version)

    # --- consumers ------------------------------------------------------------------------
    def connect(self, rank: int, start_step: int, is_active: Callable[[], bool]) -> int:
        """Make a connection the rank's live one from `start_step`; returns its id.

        A second live connection is refused; one whose predecessor is gone (a restarted
        trainer whose old stream has not been torn down yet) takes over.
        """
        with self._cond:
            state = self.ranks[rank]
            if state.connected and state.is_active():
                raise ValueError(f"rank {rank} is already connected")
            state.connection += 1
            state.connected, state.is_active = True, is_active
            state.next_step = start_step
            state.acked = max(state.acked, start_step - 1)
            self._notify()
            return state.connection

    def disconnect(self, rank: int, connection: int) -> None:
        with self._cond:
            state = self.ranks[rank]
            if state.connection == connection:
                state.connected = False
            self._notify()

    def ack(self, rank: int, step: int) -> None:
        with self._cond:
            state = self.ranks[rank]
            # A step not handed out yet cannot be consumed: a far-future ack must not lift flow control.
            state.acked = max(state.acked, min(step, state.next_step - 1))
            self._notify()

    def claim_step(self, rank: int, connection: int) -> int | None:
        """The step this connection may send next (committed, within credit), counted as sent;
        None while it must wait.

        Raises ConnectionGone once the connection is no longer the rank's live one or its client
        is gone, JobStopped when the job shuts down, RuntimeError once the producer has failed.
        """
        with self._cond:
            state = self.ranks[rank]
            if self._error is not None:
                raise RuntimeError(f"selector failed: {self._error}") from self._error
            if self._stopping:
                raise JobStopped("selector is shutting down")
            if state.connection != connection or not state.connected or not state.is_active():
                raise ConnectionGone(f"rank {rank}: connection {connection} ended")
            step = state.next_step
            if step < self.next_step and step - state.acked <= self.max_inflight:
                state.next_step = step + 1
                return step
            return None

    def next_batch(self, rank: int, connection: int, poll: float = 0.5) -> RankBatch | None:
        """Block until the rank may have its next step (committed, within credit).

        None once the connection is no longer the rank's live one or its client is gone.
        """
        with self._cond:
            while True:
                try:
                    step = self.claim_step(rank, connection)
                except ConnectionGone:
                    return None
                if step is not None:
                    break
                self._cond.wait(poll)  # re-check the client's liveness now and then
        return self.journal.read(step, rank)
