"""Selector replicas under torchrun: rank 0 leads, the others score their share in lockstep.

``torchrun --nproc-per-node R -m colm_server.service serve --config job.yaml`` starts R replicas
(one per GPU). Each loads the model and reads the same record stream; every step, each scores
its share of the large batch and the sketches are gathered (`select.replicas`), so all of them
compute the same selection. Rank 0 is the service: it serves gRPC, owns the journal and the work
dir, and applies adapter pushes. Before each selection it broadcasts what comes next: a step (with
the adapter when it changed since the last one) or the end of the job. At start it sends its
journaled state, so a relaunched group resumes where the journal stops.

Control messages and sketches go over gloo (CPU tensors, small): a replica that dies closes its
connections, the others' next collective fails, the leader's producer fails (health NOT_SERVING,
exit 1) and torchrun ends the group with status 1; relaunched on the same work dir (by compose's
``restart: on-failure`` or any orchestrator), it resumes from the journal.
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from colm_server.data.collate import Collator
from colm_server.data.shards import ShardStream
from colm_server.select import Selector

logger = logging.getLogger(__name__)

STEP, STOP = 1, 0
# Replicas wait on the leader as long as trainers take to ask for the next step: no deadline.
WAIT = timedelta(days=365)


@dataclass(frozen=True)
class Replicas:
    """This process's place among the selector replicas (one replica: rank 0 of 1)."""

    rank: int = 0
    world: int = 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Replicas:
        """torchrun's ``RANK``/``WORLD_SIZE``; joins the gloo group when there are several."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=WAIT)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return cls(rank=dist.get_rank(), world=dist.get_world_size())


SINGLE = Replicas()  # one selector process, no torch.distributed


class Leader:
    """Rank 0's side of the lockstep: announces every step (and adapter changes) and the end."""

    def __init__(self, adapter: dict[str, torch.Tensor]):
        self.adapter = adapter
        self.changed = True  # the first step carries the adapter: followers start from rank 0's

    def share_state(self, state: dict | None) -> None:
        """Send the journaled state the job resumed from (None: a fresh job)."""
        dist.broadcast_object_list([state], src=0)

    def adapter_applied(self) -> None:
        self.changed = True

    def announce_step(self, step: int, ids: list[str]) -> None:
        """Step ``step`` is next, on the large batch of ``ids`` (followers check they drew the same)."""
        head = torch.tensor([STEP, step, int(self.changed), digest(ids)], dtype=torch.long)
        dist.broadcast(head, src=0)
        if self.changed:
            for name in sorted(self.adapter):
                dist.broadcast(self.adapter[name].detach().cpu().contiguous(), src=0)
            self.changed = False

    def announce_stop(self) -> None:
        try:
            dist.broadcast(torch.tensor([STOP, -1, 0, 0], dtype=torch.long), src=0)
        except RuntimeError as exc:  # a replica already gone: torchrun ends the group anyway
            logger.warning("could not tell the selector replicas to stop: %s", exc)


def digest(ids: list[str]) -> int:
    """A 32-bit checksum of a batch's sample ids, in order."""
    return zlib.crc32("\n".join(ids).encode())


def follow(*, selector: Selector, collator: Collator, stream: ShardStream,
           adapter: dict[str, torch.Tensor], records_per_step: int) -> int:
    """A follower replica's life: take the leader's state, then select each announced step.

    Returns the number of steps selected once the leader announces the end.
    """
    box: list[dict | None] = [None]
    dist.broadcast_object_list(box, src=0)
    state = box[0]
    if state is not None:
        stream.load_state_dict(state["stream"])
        selector.load_state_dict(state["selector"])
        logger.info("replica %d resumed at step %d", dist.get_rank(), state["next_step"])
    steps = 0
    head = torch.zeros(4, dtype=torch.long)
    while True:
        dist.broadcast(head, src=0)
        command, step, changed, ids_digest = head.tolist()
        if command == STOP:
            logger.info("replica %d: the leader ended the job after %d steps here", dist.get_rank(), steps)
            return steps
        if changed:
            with torch.no_grad():
                for name in sorted(adapter):
                    value = torch.empty_like(adapter[name], device="cpu")
                    dist.broadcast(value, src=0)
                    adapter[name].copy_(value)
        batch = collator(stream.take(records_per_step))
        if digest(batch.ids) != ids_digest:
            raise RuntimeError(f"replica {dist.get_rank()} drew another large batch than the leader at "
                               f"step {step}: the replicas' data settings or shards differ")
        selector.select(batch, step=step)
        steps += 1
