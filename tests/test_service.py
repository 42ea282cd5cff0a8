"""The selector service end to end: a real server on 127.0.0.1, real clients, real shards."""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
import webdataset as wds
from grpc_health.v1 import health_pb2, health_pb2_grpc

from colm_client.stream import CoresetStream, CoresetStreamError
from colm_client.sync import AdapterSync
from colm_server.config import fingerprint, load_config
from colm_server.service.server import SelectorServer
from colm_wire.adapter import adapter_chunks
from colm_wire.proto import selector_pb2 as pb
from colm_wire.proto import selector_pb2_grpc as pb_grpc
from conftest import lora_model, make_records

B, L, W = 4, 8, 2


def write_shards(folder, n_shards: int = 4) -> str:
    records = make_records({"big": 60, "mid": 30, "tiny": 6}, seed=5)
    for s in range(n_shards):
        with wds.TarWriter(str(folder / f"shard-{s}.tar")) as sink:
            for r in records[s::n_shards]:
                sink.write({"__key__": r["id"], "json": r})
    return str(folder / f"shard-{{0..{n_shards - 1}}}.tar")


def make_config(tmp_path, **extra):
    shards = tmp_path / "shards"
    shards.mkdir(exist_ok=True)
    overrides = {
        "data.urls": write_shards(shards), "data.buffer": 16,
        "model.source": "tiny:llama", "model.lora_r": 4,
        "tokenize.max_length": 48, "tokenize.chat_template": False,
        "selector.batch_size": B, "selector.large_batch_size": L, "selector.zo_dim": 64,
        "selector.small_source_share": 0.1,
        "service.world_size": W, "service.port": 0, "service.work_dir": str(tmp_path / "work"),
        "service.prefetch": 2, "service.max_inflight": 2, **extra,
    }
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture()
def server(tmp_path):
    srv = SelectorServer(make_config(tmp_path))
    srv.start()
    yield srv
    srv.stop(grace=1)


def target(srv) -> str:
    return f"127.0.0.1:{srv.port}"


def take(stream: CoresetStream, n: int) -> list:
    out = list(itertools.islice(iter(stream), n))
    stream.close()
    return out


def take_all(srv, n: int, start_step: int = 0) -> list[list]:
    """n batches for every rank, the ranks pulling side by side as a training job does."""
    with ThreadPoolExecutor(W) as pool:
        streams = [CoresetStream(target(srv), rank=r, world_size=W, start_step=start_step)
                   for r in range(W)]
        return list(pool.map(lambda s: take(s, n), streams))


def test_every_rank_gets_b_samples_per_step_in_order(server):
    ranks = take_all(server, 3)
    for step in range(3):
        per_rank = [ranks[r][step] for r in range(W)]
        assert all(b.step == step and len(b.ids) == B for b in per_rank)
        ids = [i for b in per_rank for i in b.ids]
        assert len(set(ids)) == W * B  # disjoint across ranks
        # Every rank is told the step's total weight: the sum over all ranks, not its own.
        total = sum(b.weights.double().sum().item() for b in per_rank)
        assert len({b.step_weight_sum for b in per_rank}) == 1
        assert per_rank[0].step_weight_sum == pytest.approx(total, rel=1e-6)
        for b in per_rank:
            assert (b.weights > 0).all()
            assert b.input_ids.shape == b.labels.shape == b.attention_mask.shape
            assert b.input_ids.shape[0] == B
            assert (b.labels[b.attention_mask == 0] == -100).all()
    # No sample is drawn twice within the first epoch.
    seen = [i for r in ranks for b in r for i in b.ids]
    assert len(seen) == len(set(seen))


def test_a_reconnecting_rank_gets_exactly_the_same_batches(server):
    first = take_all(server, 4)[0]
    again = take(CoresetStream(target(server), rank=0, world_size=W, start_step=2), 2)
    for a, b in zip(first[2:], again):
        assert a.ids == b.ids and torch.equal(a.weights, b.weights)
        assert torch.equal(a.input_ids, b.input_ids)


def test_ids_only_payload(server):
    (batch,) = take(CoresetStream(target(server), rank=0, world_size=W, payload=False), 1)
    assert batch.input_ids is None and len(batch.ids) == B


def test_restarted_selector_continues_from_its_work_dir(tmp_path):
    config = make_config(tmp_path)
    srv = SelectorServer(config)
    srv.start()
    before = take_all(srv, 3)
    srv.stop(grace=1)
    srv = SelectorServer(config)
    srv.start()
    try:
        replay = take(CoresetStream(target(srv), rank=0, world_size=W, start_step=1), 2)
        assert [b.ids for b in replay] == [b.ids for b in before[0][1:3]]
        after = take_all(srv, 2, start_step=3)
        assert [b.step for b in after[0]] == [3, 4]
        earlier = {i for r in before for b in r for i in b.ids}
        later = {i for r in after for b in r for i in b.ids}
        assert not earlier & later  # the stream cursor was restored, not restarted
    finally:
        srv.stop(grace=1)


@pytest.mark.parametrize("join,code", [
    (dict(world_size=3), grpc.StatusCode.FAILED_PRECONDITION),
    (dict(rank=5), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(job_id="other"), grpc.StatusCode.FAILED_PRECONDITION),
    (dict(config_fingerprint="0123456789abcdef"), grpc.StatusCode.FAILED_PRECONDITION),
])
def test_bad_joins_are_refused_with_a_reason(server, join, code):
    args = dict(rank=0, world_size=W, job_id="default") | join
    fp = args.pop("config_fingerprint", "")
    stream = CoresetStream(target(server), config_fingerprint=fp, **args)
    with pytest.raises(CoresetStreamError) as err:
        take(stream, 1)
    assert err.value.code == code


def test_a_duplicate_live_rank_is_refused(server):
    live = iter(CoresetStream(target(server), rank=0, world_size=W))
    next(live)
    with pytest.raises(CoresetStreamError) as err:
        take(CoresetStream(target(server), rank=0, world_size=W), 1)
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
    live.close()


def test_the_matching_fingerprint_is_accepted(server):
    fp = fingerprint(server.config)
    (batch,) = take(CoresetStream(target(server), rank=0, world_size=W, config_fingerprint=fp), 1)
    assert batch.step == 0


def test_a_huge_job_id_is_refused_quoting_only_its_head(server):
    huge = "j" * (1 << 20)  # 1 MiB: repeated whole, the refusal would not fit the trailing metadata
    join = pb.StreamRequest(join=pb.Join(job_id=huge, rank=0, world_size=W))
    with grpc.insecure_channel(target(server)) as channel:
        stub = pb_grpc.SelectorStub(channel)
        with pytest.raises(grpc.RpcError) as stream:
            next(stub.Stream(iter([join]), timeout=30))
        with pytest.raises(grpc.RpcError) as status:
            stub.Status(pb.StatusRequest(job_id=huge), timeout=30)
        with pytest.raises(grpc.RpcError) as pushed:
            stub.PushAdapter(adapter_chunks({"w": torch.zeros(2)}, huge, trainer_step=0), timeout=30)
    codes = [err.value.code() for err in (stream, status, pushed)]
    assert codes == [grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
                     grpc.StatusCode.INVALID_ARGUMENT]
    head = f"'{'j' * 64}'… (1048576 characters)"
    assert f"service.job_id: trainer has {head}" in stream.value.details()
    for err in (stream, status, pushed):
        details = err.value.details()
        assert head in details and len(details) < 200, details


def push(srv, chunks):
    with grpc.insecure_channel(target(srv)) as channel:
        return pb_grpc.SelectorStub(channel).PushAdapter(iter(chunks), timeout=30)


def test_adapter_push_is_applied_and_later_selections_use_it(server):
    trainer = lora_model("llama", seed=3)
    sync = AdapterSync(target(server), trainer, every=1, rank=0)
    assert sync.maybe_push(step=0) == 1
    sync.close()
    live = {k: v for k, v in server.job.adapter.items()}
    from colm_wire.adapter import adapter_state

    for name, value in adapter_state(trainer).items():
        assert torch.equal(live[name], value.detach())
    batches = take_all(server, 4)[0]
    assert batches[-1].param_version == 1  # selected after the push (prefetch is 2)


@pytest.mark.parametrize("corrupt", ["shape", "nan", "checksum", "unknown", "missing", "job"])
def test_a_bad_push_is_refused_whole(server, corrupt):
    from colm_wire.adapter import adapter_state

    state = {k: v.detach().clone() for k, v in adapter_state(lora_model("llama", seed=3)).items()}
    before = {k: v.clone() for k, v in server.job.adapter.items()}
    name = next(iter(state))
    job = "default"
    if corrupt == "shape":
        state[name] = torch.zeros(state[name].shape[0] + 1, state[name].shape[1])
    elif corrupt == "nan":
        state[name][0, 0] = float("nan")
    elif corrupt == "unknown":
        state["not.a.lora.weight"] = torch.zeros(2)
    elif corrupt == "missing":
        del state[name]
    elif corrupt == "job":
        job = "other"
    chunks = list(adapter_chunks(state, job, trainer_step=0, chunk_bytes=256))
    if corrupt == "checksum":
        chunks[1].data = bytes(len(chunks[1].data))
    with pytest.raises(grpc.RpcError) as err:
        push(server, chunks)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert server.job.param_version == 0
    for k, v in server.job.adapter.items():
        assert torch.equal(v, before[k])


def test_health_reflection_and_status(server):
    with grpc.insecure_channel(target(server)) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="colm.v1.Selector"))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        take_all(server, 2)
        status = pb_grpc.SelectorStub(channel).Status(pb.StatusRequest(job_id="default"))
    assert status.world_size == W and status.selected_steps >= 2
    assert status.config_fingerprint == fingerprint(server.config)
    assert sum(status.source_seen.values()) == status.selected_steps * W * L
    # A batch counts as consumed when the trainer asks for the next: step 1 is not yet.
    assert status.ranks[0].next_step == 2 and status.ranks[0].acked_step == 0
    # Cost of this process: every selection timed, peak memory of a live Python process.
    assert status.selections == status.selected_steps and status.selection_seconds > 0
    assert status.peak_rss_bytes > 50 << 20 and status.peak_device_bytes == 0  # CPU here


def test_reflection_lists_the_selector_service(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(target(server)) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(stub.ServerReflectionInfo(iter([request])))
    names = {s.name for s in reply.list_services_response.service}
    assert "colm.v1.Selector" in names and "grpc.health.v1.Health" in names


def test_status_cli_prints_progress_and_counters(server, capsys):
    from colm_client.status import main as status_main
    from colm_client.status import status

    take_all(server, 1)
    s = status(target(server))
    assert int(s["selected_steps"]) >= 1 and len(s["ranks"]) == W
    status_main([target(server)])
    out = capsys.readouterr().out
    assert "steps selected" in out and "big:" in out and "skipped records: none" in out
    assert "samples truncated to max length: 0" in out and "selections" in out


def test_status_health_flag_exits_0_while_serving_and_1_when_nobody_listens(server):
    from colm_client.status import main as status_main

    with pytest.raises(SystemExit) as up:
        status_main(["--health", target(server)])
    with socket.socket() as s:  # a port nobody listens on once the socket is closed
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(SystemExit) as down:
        status_main(["--health", closed])
    assert (up.value.code, down.value.code) == (0, 1)


def test_a_producer_that_cannot_go_on_turns_health_not_serving_and_says_why(tmp_path, capsys):
    from colm_client.status import main as status_main

    config = make_config(tmp_path)
    shutil.rmtree(tmp_path / "shards")  # the job names shards that do not exist
    reasons: list[str] = []
    srv = SelectorServer(config, on_failure=reasons.append)
    srv.start()  # returns once the producer is ready or, here, has failed
    try:
        assert (srv.failure or "").startswith("RuntimeError: no valid record in 4 shard(s)")
        assert reasons == [srv.failure]
        with grpc.insecure_channel(target(srv)) as channel:
            for service in ("", "colm.v1.Selector"):
                health = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING, service
            status = pb_grpc.SelectorStub(channel).Status(pb.StatusRequest(), timeout=10)
        assert status.error == srv.failure and status.selected_steps == 0
        status_main([target(srv)])
        assert capsys.readouterr().out.startswith(f"FAILED: {srv.failure}\n")
        with pytest.raises(CoresetStreamError) as err:
            take(CoresetStream(target(srv), rank=0, world_size=W), 1)
        assert "no valid record" in err.value.details
    finally:
        srv.stop(grace=1)


def test_health_answers_serving_only_once_a_step_is_selected(server):
    assert server.job.next_step >= 1  # start() returned once the producer was ready
    with grpc.insecure_channel(target(server)) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        status = pb_grpc.SelectorStub(channel).Status(pb.StatusRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING and status.error == ""


def test_truncated_samples_are_counted(tmp_path):
    srv = SelectorServer(make_config(tmp_path, **{"tokenize.max_length": 12}))
    srv.start()
    try:
        batches = take_all(srv, 2)
        assert all(b.input_ids.shape[1] <= 12 for r in batches for b in r)
        with grpc.insecure_channel(target(srv)) as channel:
            status = pb_grpc.SelectorStub(channel).Status(pb.StatusRequest())
        assert status.truncated > 0 and status.truncated <= status.selected_steps * W * L
    finally:
        srv.stop(grace=1)


def test_malformed_records_are_skipped_and_counted_while_the_stream_goes_on(tmp_path):
    config = make_config(tmp_path)
    bad = tmp_path / "shards" / "shard-0.tar"
    with wds.TarWriter(str(bad)) as sink:  # replace one good shard by a bad one
        sink.write({"__key__": "badjson", "json": b"{not json"})
        sink.write({"__key__": "nosource", "json": {"id": "x1", "prompt": "p", "response": "r"}})
        sink.write({"__key__": "empty", "json": {"id": "x2", "source": "s", "prompt": "p",
                                                 "response": ""}})
        sink.write({"__key__": "utf8", "json": b'{"id": "x3", "source": "s", "response": "\xff"}'})
    srv = SelectorServer(config)
    srv.start()
    try:
        batches = take_all(srv, 6)
        assert all(len(b.ids) == B for r in batches for b in r)
        with grpc.insecure_channel(target(srv)) as channel:
            status = pb_grpc.SelectorStub(channel).Status(pb.StatusRequest())
        assert status.skipped["bad_json"] >= 1 and status.skipped["bad_utf8"] >= 1
        assert status.skipped["missing_field"] >= 2
    finally:
        srv.stop(grace=1)


def test_a_selector_that_never_comes_back_ends_the_stream_after_the_reconnect_timeout():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stream = CoresetStream(f"127.0.0.1:{port}", rank=0, world_size=1, reconnect_timeout=1.0)
    with pytest.raises(CoresetStreamError) as err:
        take(stream, 1)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


TRAINER = """
import json, sys
from colm_client import CoresetStream
target, start, stop, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
with open(out, "a") as f:
    for b in CoresetStream(target, rank=0, world_size=2, start_step=start):
        f.write(json.dumps({"step": b.step, "ids": b.ids, "weights": b.weights.tolist()}) + "\\n")
        f.flush()  # the trainer's "checkpoint": what it has trained on
        if b.step + 1 >= stop:
            break
"""


def trainer(srv, start: int, stop: int, out) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", TRAINER, target(srv), str(start), str(stop), str(out)])


def lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_a_killed_rank_resumes_with_identical_batches(server, tmp_path):
    total = 6
    other = threading.Thread(target=take, args=(CoresetStream(target(server), rank=1, world_size=W),
                                                total))
    other.start()
    out = tmp_path / "rank0.jsonl"
    first = trainer(server, 0, 100, out)
    deadline = time.monotonic() + 120
    while len(lines(out)) < 3:  # progress check with a deadline, then the crash
        assert first.poll() is None and time.monotonic() < deadline, "trainer made no progress"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    done = lines(out)
    resume = done[-1]["step"] + 1
    second = trainer(server, resume, total, out)
    assert second.wait(120) == 0
    other.join(120)

    got = lines(out)
    assert [g["step"] for g in got] == list(range(total))  # nothing lost, nothing repeated
    fresh = take(CoresetStream(target(server), rank=0, world_size=W, start_step=0), total)
    for g, f in zip(got, fresh):
        assert g["ids"] == f.ids and g["weights"] == f.weights.tolist()


def test_a_stalled_rank_holds_selection_at_the_prefetch_bound_and_drains(server):
    prefetch = server.config.service.prefetch
    early = take(CoresetStream(target(server), rank=0, world_size=W), prefetch)
    with grpc.insecure_channel(target(server)) as channel:
        status = pb_grpc.SelectorStub(channel).Status(pb.StatusRequest())
    # Rank 1 has not acknowledged anything: no step past the bound has been selected.
    assert status.selected_steps == prefetch and not status.ranks[1].connected
    assert [b.step for b in early] == list(range(prefetch))
    ranks = take_all(server, prefetch + 3)  # rank 1 drains; selection moves on for both
    assert [b.step for b in ranks[1]] == list(range(prefetch + 3))


@pytest.mark.parametrize("urls_kind", ["manifest", "pattern"])
def test_a_manifest_tells_the_selector_its_small_sources_from_the_first_step(tmp_path, urls_kind):
    from colm_server.data.prepare import write_shards as prepare_shards

    # 200 records, 2 of them "tiny" (1% of the data) and both in the first large batch of
    # W*L = 16: the stream alone shows tiny at 12.5% there, above small_source_share = 10%.
    records = make_records({"big": 198}, seed=1)
    tiny = [{**r, "id": f"tiny-{i}", "source": "tiny"} for i, r in enumerate(make_records({"x": 2}))]
    manifest = prepare_shards(tiny + records, tmp_path / "shards")
    urls = str(tmp_path / "shards" / "manifest.json") if urls_kind == "manifest" else manifest["urls"]
    srv = SelectorServer(make_config(tmp_path, **{"data.urls": urls, "data.buffer": 0,
                                                  "data.shuffle_shards": False}))
    srv.start()
    try:
        first = [batches[0] for batches in take_all(srv, 1)]
    finally:
        srv.stop(grace=1)
    kept = sum(s == "tiny" for batch in first for s in batch.sources)
    # From the manifest's counts the selector knows tiny is small: both samples are kept.
    # From the stream alone it is not yet, and gets its proportional 2/16 of 8: one sample.
    assert kept == (2 if urls_kind == "manifest" else 1)


def journaled_weight(srv, steps: int) -> dict[str, float]:
    """Weight selected per source over the first ``steps`` steps, read back from the journal."""
    weight: dict[str, float] = {}
    for step in range(steps):
        for rank in range(W):
            batch = srv.job.journal.read(step, rank)
            for source, w in zip(batch.sources, batch.weights):
                weight[source] = weight.get(source, 0.0) + w
    return weight


def test_status_shows_target_and_realised_shares_and_they_survive_a_restart(tmp_path, capsys):
    from colm_client.status import main as status_main
    from colm_client.status import status

    config = make_config(tmp_path, **{"selector.mixture": "balanced"})
    srv = SelectorServer(config)
    srv.start()
    try:
        take_all(srv, 3)
        for _ in range(20):  # the CLI's read and ours of one committed step (a prefetched one may land)
            s = status(target(srv))
            status_main([target(srv)])
            out = capsys.readouterr().out
            if status(target(srv))["selected_steps"] == s["selected_steps"]:
                break
        steps = int(s["selected_steps"])
        weight = journaled_weight(srv, steps)
    finally:
        srv.stop(grace=1)
    assert s["source_target_share"] == pytest.approx({"big": 1 / 3, "mid": 1 / 3, "tiny": 1 / 3})
    total = sum(weight.values())
    assert s["source_weight"] == pytest.approx(weight, rel=1e-9)
    assert s["source_realised_share"] == pytest.approx({k: w / total for k, w in weight.items()}, rel=1e-9)
    seen = {k: int(v) / (steps * W * L) for k, v in s["source_seen"].items()}
    assert s["source_realised_share"]["tiny"] > 2 * seen["tiny"]  # weighted up towards a third
    assert "target / realised" in out and f"{s['source_realised_share']['tiny']:.1%}" in out
    assert "tiny: " in out and "; 33.3% / " in out
    journaled = srv.job.snapshot()  # as of the last committed step, the producer now stopped
    srv = SelectorServer(config)
    srv.start()
    try:
        again = status(target(srv))
    finally:
        srv.stop(grace=1)
    assert int(again["selected_steps"]) == journaled["selected_steps"]  # nothing selected since
    assert again["source_weight"] == pytest.approx(journaled["source_weight"], rel=1e-12)
    assert again["source_realised_share"] == pytest.approx(journaled["source_realised_share"], rel=1e-12)
    assert again["source_target_share"] == pytest.approx(journaled["source_target_share"], rel=1e-12)


def test_an_explicit_mixture_naming_a_source_the_data_lacks_is_refused_at_start(tmp_path):
    from colm_server.data.prepare import write_shards as prepare_shards

    prepare_shards(make_records({"big": 40, "tiny": 4}, seed=2), tmp_path / "shards")
    urls = str(tmp_path / "shards" / "manifest.json")
    config = make_config(tmp_path, **{"data.urls": urls, "selector.mixture": "{big: 1, tiny: 1, typo: 1}"})
    refusal = r"^selector\.mixture names source\(s\) 'typo' .*its sources: big, tiny"
    with pytest.raises(ValueError, match=refusal):
        SelectorServer(config)
    assert not (tmp_path / "work").exists()  # refused before the job was made
