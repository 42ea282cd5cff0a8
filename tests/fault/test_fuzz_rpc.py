"""Fuzzed RPCs against one real selector: every call ends OK or with a clean, expected status code.

An unhandled exception in the servicer reaches the client as UNKNOWN (or INTERNAL), and a hang as
DEADLINE_EXCEEDED once the call's deadline passes; neither may ever happen. UNAVAILABLE is not
allowed either: it means the selector is shutting down, and this one is not. After every example
the selector still answers Status, its flow-control bookkeeping is sane (no rank holds its
connection, only selected steps count as consumed, selection stays within the prefetch bound), and
its adapter changed only through a valid push.

The selector serves one rank, so a valid join never waits for another rank: it must get its first
batch before the deadline. Each stream example ends by half-closing its requests and reading the
stream to its end; once the call is over, the selector has released the rank, and the next example
can join it again.
"""

from __future__ import annotations

import hashlib
import queue
from dataclasses import dataclass

import grpc
import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from colm_server.config import fingerprint
from colm_server.service.server import SelectorServer
from colm_wire.adapter import adapter_chunks
from colm_wire.proto import selector_pb2 as pb
from colm_wire.proto import selector_pb2_grpc as pb_grpc
from colm_wire.tensors import DTYPES
from test_service import B, make_config, target

from .conftest import fuzz

DEADLINE = 10.0  # seconds per call: far above what any call here needs, so running out is a hang
OK = grpc.StatusCode.OK
INVALID, PRECONDITION, OUT_OF_RANGE, NOT_FOUND = (
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.NOT_FOUND)
JOB = "default"
U32, U64 = 2**32 - 1, 2**64 - 1
EDGES = [2**31 - 1, 2**31, U32, 2**32, 2**53 + 1, 2**63 - 1, 2**63, U64]  # int-size and sign boundaries
u32 = st.one_of(st.integers(0, 4), st.sampled_from([v for v in EDGES if v <= U32]), st.integers(0, U32))
u64 = st.one_of(st.integers(0, 12), st.sampled_from(EDGES), st.integers(0, U64))
names = st.one_of(st.just(""), st.text(max_size=24), st.sampled_from([JOB + " ", JOB.upper(), "default\x00"]))


class Fuzzed:
    """The selector under fuzzing, a client stub, and what its adapter must be now."""

    def __init__(self, server: SelectorServer, channel: grpc.Channel):
        sc = server.config.service
        self.server, self.stub = server, pb_grpc.SelectorStub(channel)
        self.fingerprint = fingerprint(server.config)
        self.prefetch, self.max_inflight = sc.prefetch, sc.max_inflight
        # The values the adapter must hold, changed only by an accepted push, and their version.
        self.adapter = {k: v.detach().clone() for k, v in server.job.adapter.items()}
        self.version = 0

    def __repr__(self) -> str:  # hypothesis prints the fixture with a failing example
        return f"<selector on port {self.server.port}, adapter version {self.version}>"

    def status(self) -> pb.StatusReply:
        return self.stub.Status(pb.StatusRequest(), timeout=DEADLINE)

    def check(self) -> pb.StatusReply:
        """The selector answers Status, its bookkeeping is sane, and its adapter is as expected."""
        status = self.status()
        (rank,) = status.ranks
        assert not rank.connected, "a finished stream still holds its rank"
        assert rank.acked_step < max(status.selected_steps, 1), "a step not selected counts as consumed"
        assert status.selected_steps <= rank.acked_step + 1 + self.prefetch, "selection ran past prefetch"
        assert status.param_version == self.version
        for name, value in self.server.job.adapter.items():
            assert torch.equal(value, self.adapter[name]), f"adapter tensor {name} changed"
        return status


@pytest.fixture(scope="module")
def selector(tmp_path_factory):
    config = make_config(tmp_path_factory.mktemp("fuzz-rpc"), **{"service.world_size": 1})
    srv = SelectorServer(config)
    srv.start()
    channel = grpc.insecure_channel(target(srv))
    yield Fuzzed(srv, channel)
    channel.close()
    srv.stop(grace=1)


def code_of(err: grpc.RpcError) -> grpc.StatusCode:
    code = err.code()
    assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), f"servicer crashed: {err}"
    assert code != grpc.StatusCode.DEADLINE_EXCEEDED, f"call hung: {err}"
    return code


class StreamCall:
    """A Stream call whose requests the test sends one by one; ``finish`` ends it cleanly.

    As a context manager it also cancels the call on the way out, so that an example that fails
    half-way does not leave the rank held for the next one.
    """

    def __init__(self, stub: pb_grpc.SelectorStub, first: list[pb.StreamRequest]):
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        for request in first:
            self.requests.put(request)
        self.call = stub.Stream(iter(self.requests.get, None), timeout=DEADLINE)

    def __enter__(self) -> StreamCall:
        return self

    def __exit__(self, *exc_info) -> None:
        self.call.cancel()  # no effect on a call that has ended

    def send(self, request: pb.StreamRequest) -> None:
        self.requests.put(request)

    def read(self) -> pb.CoresetBatch | grpc.StatusCode:
        """The next batch, or the code the call ended with."""
        try:
            return next(self.call)
        except StopIteration:
            return OK
        except grpc.RpcError as err:
            return code_of(err)

    def finish(self) -> tuple[list[pb.CoresetBatch], grpc.StatusCode]:
        """Half-close, then read to the end: the batches still in flight and the final code."""
        self.requests.put(None)
        rest = []
        while isinstance(got := self.read(), pb.CoresetBatch):
            rest.append(got)
        return rest, got


# --- Join -----------------------------------------------------------------------------------------
JOIN_WILD = {"job_id": names, "rank": u32, "world_size": u32, "start_step": u64,
             "config_fingerprint": st.one_of(st.text(max_size=20), st.text("0123456789abcdef", max_size=16))}


@st.composite
def joins(draw) -> dict:
    """Join fields for rank 0, half of the time with one or two of them replaced by wild values.

    The start step is a step far ahead, or an ``offset`` from the number of steps selected when the
    join is sent (<= 0: a step already selected; 1 or 2: one the selector may be selecting just
    then). A ``config_fingerprint`` of None stands for the selector's own.
    """
    far = draw(st.integers(0, 3)) == 0  # one in four starts far ahead of anything selected
    join = {"job_id": JOB, "rank": 0, "world_size": 1, "ids_only": draw(st.booleans()),
            "start_step": draw(st.sampled_from(EDGES)) if far else None,
            "offset": None if far else draw(st.integers(-6, 2)),
            "config_fingerprint": draw(st.sampled_from(["", None]))}
    if draw(st.booleans()):
        for name in draw(st.sets(st.sampled_from(sorted(JOIN_WILD)), min_size=1, max_size=2)):
            join[name] = draw(JOIN_WILD[name])
    if join["start_step"] is not None:  # a wild or far start step is absolute
        join["offset"] = None
    return join


# Mostly a Join; else what must never open a stream: nothing at all, acks, requests with no message.
acks = st.builds(lambda s: pb.StreamRequest(ack=pb.Ack(step=s)), u64)
not_joins = st.lists(st.just(pb.StreamRequest()) | acks, max_size=3)
openers = st.integers(0, 3).flatmap(lambda i: not_joins if i == 0 else joins())


def expected_join(join: pb.Join, fp: str, before: pb.StatusReply, prefetch: int) -> set[grpc.StatusCode]:
    """The codes a join may end with (OK: accepted), in the order the selector checks them."""
    selected = before.selected_steps
    if join.job_id != JOB or join.world_size != 1:
        return {PRECONDITION}
    if join.rank >= 1:
        return {INVALID}
    if join.config_fingerprint not in ("", fp):
        return {PRECONDITION}
    if join.start_step < before.journal_first_step:  # no longer journaled
        return {OUT_OF_RANGE}
    if join.start_step > selected + prefetch:  # beyond anything the selector can have selected
        return {OUT_OF_RANGE}
    if join.start_step > selected:  # selected meanwhile, or not: either answer is right
        return {OK, OUT_OF_RANGE}
    return {OK}


@fuzz(40)
@given(opener=openers)
def test_any_first_message_is_served_or_refused_cleanly(selector, opener):
    before = selector.status()
    if isinstance(opener, dict):
        fields = dict(opener)
        if (offset := fields.pop("offset")) is not None:
            fields["start_step"] = max(before.selected_steps + offset, 0)
        if fields["config_fingerprint"] is None:
            fields["config_fingerprint"] = selector.fingerprint
        join = pb.Join(**fields)
        expected = expected_join(join, selector.fingerprint, before, selector.prefetch)
        with StreamCall(selector.stub, [pb.StreamRequest(join=join)]) as call:
            first = call.read()
            rest, end = call.finish()
        event(f"join: {'accepted' if isinstance(first, pb.CoresetBatch) else first.name}")
        if isinstance(first, pb.CoresetBatch):
            assert OK in expected, f"accepted a join that should be refused with {expected}"
            assert (first.step, first.rank, len(first.ids)) == (join.start_step, 0, B)
            assert first.HasField("input_ids") != join.ids_only
            assert [b.step for b in rest] == list(range(join.start_step + 1, join.start_step + 1 + len(rest)))
            assert end == OK
        else:
            assert first != OK, "an accepted join ended without its first batch"
            assert first in expected - {OK} and not rest
    else:  # anything but a Join first is refused
        event("not a join")
        with StreamCall(selector.stub, opener) as call:
            rest, end = call.finish()
        assert (rest, end) == ([], INVALID)
    selector.check()


# --- Acks after a valid Join ----------------------------------------------------------------------
actions = st.lists(st.one_of(
    st.tuples(st.just("ack"), u64),
    st.tuples(st.just("ack-received"), st.integers(-3, 1)),  # near the last received step
    st.tuples(st.just("read"), st.none()),
    st.tuples(st.just("join"), st.none()),  # a second Join on the same stream is ignored
    st.tuples(st.just("empty"), st.none()),
), max_size=12)


@fuzz(20)
@given(back=st.integers(0, 8), steps=actions)
def test_acks_in_any_order_never_break_the_stream_or_flow_control(selector, back, steps):
    start = max(selector.status().selected_steps - back, 0)  # a step already selected: a valid join
    join = pb.Join(job_id=JOB, rank=0, world_size=1, start_step=start, ids_only=True)
    with StreamCall(selector.stub, [pb.StreamRequest(join=join)]) as call:
        first = call.read()
        assert isinstance(first, pb.CoresetBatch) and first.step == start, f"valid join got {first}"
        last = start  # last step received
        acked = start - 1  # acknowledged as far as the selector knows, at least: bounds the credit
        for kind, value in steps:
            if kind in ("ack", "ack-received"):
                step = value if kind == "ack" else max(last + value, 0)
                call.send(pb.StreamRequest(ack=pb.Ack(step=step)))
                acked = max(acked, min(step, last))
            elif kind == "read" and last + 1 - acked <= min(selector.max_inflight, selector.prefetch):
                got = call.read()  # within credit and prefetch: it must come
                assert isinstance(got, pb.CoresetBatch) and got.step == last + 1, f"wanted {last + 1}: {got}"
                last += 1
            elif kind == "join":
                call.send(pb.StreamRequest(join=join))
            elif kind == "empty":
                call.send(pb.StreamRequest())
        rest, end = call.finish()
    event(f"acks: {last - start + 1} batches read")
    assert end == OK and [b.step for b in rest] == list(range(last + 1, last + 1 + len(rest)))
    selector.check()


# --- PushAdapter ------------------------------------------------------------------------------------
MUTATIONS = ("job", "nan", "inf", "shape", "unknown", "missing", "duplicate", "dtype", "nbytes", "flip",
             "checksum", "no-checksum", "truncate", "swap", "headerless", "trailing", "empty", "header-only")


@dataclass
class Push:
    """The chunks of one push, the tensors they carry, and how they were broken (empty: valid)."""

    chunks: list[pb.AdapterChunk]
    tensors: dict[str, torch.Tensor]  # what a valid push sets, by name
    mutations: frozenset[str]


@st.composite
def pushes(draw, shapes: dict[str, tuple[int, ...]]) -> Push:
    """A valid push (any tensor order, float dtype, chunk size, trainer step), then maybe broken."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    dtype = DTYPES[draw(st.sampled_from(["float32", "bfloat16", "float16"]))]
    order = draw(st.permutations(sorted(shapes)))
    state = {name: (torch.randn(shapes[name], generator=gen) * 0.05).to(dtype) for name in order}
    mutations = draw(st.sets(st.sampled_from(MUTATIONS), max_size=2))
    name = draw(st.sampled_from(order))
    if "nan" in mutations or "inf" in mutations:
        state[name].view(-1)[0] = float("nan") if "nan" in mutations else float("-inf")
    if "shape" in mutations:
        shape = list(shapes[name])
        shape[draw(st.integers(0, len(shape) - 1))] += draw(st.sampled_from([-1, 1, 7]))
        state[name] = torch.zeros(shape, dtype=dtype)
    if "unknown" in mutations:
        state[draw(st.text(max_size=40).filter(lambda n: n not in shapes))] = torch.zeros(3, dtype=dtype)
    if "missing" in mutations:
        del state[name]
    job = draw(names.filter(lambda j: j != JOB)) if "job" in mutations else JOB
    chunk_bytes = draw(st.sampled_from([64, 333, 1024, 1 << 20]))
    chunks = list(adapter_chunks(state, job, draw(u64), chunk_bytes=chunk_bytes)) if state else []
    if "duplicate" in mutations and chunks:  # one tensor's chunks sent twice, the checksum over all
        again = list(adapter_chunks({n: state[n] for n in list(state)[:1]}, job, 0, chunk_bytes))
        chunks = again + chunks
        chunks[0].job_id, chunks[len(again)].job_id = job, ""
        chunks[-1].sha256 = hashlib.sha256(b"".join(c.data for c in chunks)).hexdigest()
    headers = [c for c in chunks if c.HasField("header")]
    if "dtype" in mutations and headers:  # not a float of the same size: its bytes would be valid
        h = draw(st.sampled_from(headers)).header
        size = DTYPES[h.dtype].itemsize
        other = sorted(n for n, d in DTYPES.items() if not (d.is_floating_point and d.itemsize == size))
        h.dtype = draw(st.sampled_from(other) | st.text(max_size=10).filter(lambda t: t not in DTYPES))
    if "nbytes" in mutations and headers:
        h = draw(st.sampled_from(headers)).header
        h.nbytes = draw(u64.filter(lambda n: n != h.nbytes))
    data_chunks = [c for c in chunks if c.data]
    if "flip" in mutations and data_chunks:
        c = draw(st.sampled_from(data_chunks))
        i = draw(st.integers(0, len(c.data) - 1))
        c.data = c.data[:i] + bytes([c.data[i] ^ draw(st.integers(1, 255))]) + c.data[i + 1:]
    if "checksum" in mutations and chunks:
        digest = chunks[-1].sha256
        chunks[-1].sha256 = draw(st.one_of(st.text(max_size=70), st.just(digest.upper())).filter(
            lambda s: s != digest))
    if "no-checksum" in mutations and chunks:
        chunks[-1].sha256 = ""
    if "truncate" in mutations and len(chunks) > 1:
        chunks = chunks[:draw(st.integers(1, len(chunks) - 1))]
    if "swap" in mutations and len(chunks) > 1:
        i, j = draw(st.lists(st.integers(0, len(chunks) - 1), min_size=2, max_size=2, unique=True))
        chunks[i], chunks[j] = chunks[j], chunks[i]
    if "headerless" in mutations and chunks:
        chunks[0].ClearField("header")
    if "trailing" in mutations:
        chunks.append(pb.AdapterChunk(data=draw(st.binary(min_size=1, max_size=64))))
    if "empty" in mutations:
        chunks = []
    if "header-only" in mutations and chunks:
        chunks = [pb.AdapterChunk(job_id=job, header=headers[0].header)]
    return Push(chunks, state, frozenset(mutations))


random_chunks = st.lists(st.builds(
    pb.AdapterChunk, job_id=names, trainer_step=u64,
    header=st.one_of(st.none(), st.builds(
        pb.TensorHeader, name=st.text(max_size=60), dtype=st.text(max_size=10), nbytes=u64,
        shape=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4))),
    data=st.binary(max_size=64), sha256=st.text(max_size=70)), max_size=6)


def push(selector: Fuzzed, chunks: list[pb.AdapterChunk]) -> pb.PushReply | grpc.StatusCode:
    try:
        return selector.stub.PushAdapter(iter(chunks), timeout=DEADLINE)
    except grpc.RpcError as err:
        return code_of(err)


@fuzz(25)
@given(data=st.data())
def test_a_push_is_applied_whole_or_refused_whole(selector, data):
    shapes = {k: tuple(v.shape) for k, v in selector.adapter.items()}
    plan = data.draw(pushes(shapes), label="push")
    reply = push(selector, plan.chunks)
    event(f"push: {'applied' if isinstance(reply, pb.PushReply) else reply.name}")
    if plan.mutations:
        assert reply == INVALID, f"{sorted(plan.mutations)}: expected INVALID_ARGUMENT, got {reply}"
    else:
        assert isinstance(reply, pb.PushReply), f"a valid push was refused: {reply}"
        selector.version += 1
        assert reply.param_version == selector.version
        for name, value in plan.tensors.items():  # the selector's dtype, converted as it applies them
            selector.adapter[name] = value.to(selector.adapter[name].dtype)
    selector.check()


@fuzz(25)
@given(chunks=random_chunks)
def test_random_chunks_are_refused_as_invalid(selector, chunks):
    assert push(selector, chunks) == INVALID
    selector.check()


# --- Status ---------------------------------------------------------------------------------------
@fuzz(20)
@given(job_id=names)
def test_status_answers_for_its_job_and_refuses_others(selector, job_id):
    try:
        reply = selector.stub.Status(pb.StatusRequest(job_id=job_id), timeout=DEADLINE)
        code = OK
    except grpc.RpcError as err:
        reply, code = None, code_of(err)
    if job_id in ("", JOB):
        assert code == OK and reply.job_id == JOB and reply.world_size == 1
    else:
        assert code == NOT_FOUND
    selector.check()
