"""Adapter pushes larger than gRPC's 4 MiB default message, the push size limit, bfloat16 pushes.

The selector's LoRA rank is large (2560: about 9 MiB of float32 adapter on the tiny llama) and
its gRPC messages are capped at 4 MiB, so only a chunked push can get through.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from colm_client.sync import AdapterSync
from colm_server.model.load import attach_lora
from colm_server.model.tiny import tiny_model
from colm_server.service.server import ADAPTER_FILE, SelectorServer
from colm_wire.adapter import adapter_chunks, adapter_state
from colm_wire.proto import selector_pb2 as pb
from colm_wire.proto import selector_pb2_grpc as pb_grpc
from test_service import make_config, target

R = 2560
MIB = 1 << 20


def start(tmp_path, max_adapter_mb: int) -> SelectorServer:
    config = make_config(tmp_path, **{
        "model.lora_r": R, "model.lora_alpha": 16.0, "selector.strategy": "random",
        "service.max_message_mb": 4, "service.max_adapter_mb": max_adapter_mb})
    srv = SelectorServer(config)
    srv.start()
    return srv


@pytest.fixture()
def roomy(tmp_path):
    srv = start(tmp_path, max_adapter_mb=16)
    yield srv
    srv.stop(grace=1)


@pytest.fixture()
def tight(tmp_path):
    srv = start(tmp_path, max_adapter_mb=8)
    yield srv
    srv.stop(grace=1)


def trainer(dtype: torch.dtype = torch.float32, seed: int = 3):
    """A trainer's model with the selector's LoRA shapes and random (non-initial) weights."""
    model = attach_lora(tiny_model("llama", seed=seed), r=R, alpha=16)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.to(dtype)


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapter_state(model).items()}


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def status(srv) -> pb.StatusReply:
    with grpc.insecure_channel(target(srv)) as channel:
        return pb_grpc.SelectorStub(channel).Status(pb.StatusRequest(), timeout=30)


def test_an_adapter_over_the_message_limit_is_pushed_in_chunks_and_applied_exactly(roomy):
    model = trainer()
    pushed = state_of(model)
    assert nbytes(pushed) > 8 * MIB
    chunks = list(adapter_chunks(pushed, "default", trainer_step=0))
    assert max(c.ByteSize() for c in chunks) < 4 * MIB < sum(c.ByteSize() for c in chunks)

    # The selector's message limit is real: one 5 MiB message is refused before any check.
    name = next(iter(pushed))
    big = pb.AdapterChunk(job_id="default", data=bytes(5 * MIB), header=pb.TensorHeader(
        name=name, shape=list(pushed[name].shape), dtype="float32", nbytes=5 * MIB))
    with grpc.insecure_channel(target(roomy)) as channel:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.SelectorStub(channel).PushAdapter(iter([big]), timeout=60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    sync = AdapterSync(target(roomy), model, every=1, rank=0, timeout=60)
    try:
        assert sync.maybe_push(step=0) == 1
    finally:
        sync.close()
    live = roomy.job.adapter
    assert live.keys() == pushed.keys()
    for name, value in pushed.items():
        assert live[name].dtype == torch.float32
        assert torch.equal(live[name], value), name
    assert status(roomy).param_version == 1
    saved = torch.load(Path(roomy.config.service.work_dir) / ADAPTER_FILE, weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in pushed.items())


def test_a_push_over_max_adapter_mb_is_refused_and_the_weights_stay(tight):
    before = {k: v.detach().clone() for k, v in tight.job.adapter.items()}
    pushed = state_of(trainer())
    assert nbytes(pushed) > 8 * MIB
    with grpc.insecure_channel(target(tight)) as channel:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.SelectorStub(channel).PushAdapter(adapter_chunks(pushed, "default", 0), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "limit" in err.value.details()
    assert tight.job.param_version == 0 and status(tight).param_version == 0
    for name, value in tight.job.adapter.items():
        assert torch.equal(value, before[name]), name
    assert not (Path(tight.config.service.work_dir) / ADAPTER_FILE).exists()


def test_a_bfloat16_push_is_accepted_and_converted(tight):
    model = trainer(torch.bfloat16, seed=4)
    pushed = state_of(model)
    assert all(v.dtype == torch.bfloat16 for v in pushed.values())
    assert 4 * MIB < nbytes(pushed) < 8 * MIB  # over one message, within the push limit
    sync = AdapterSync(target(tight), model, every=1, rank=0, timeout=60)
    try:
        assert sync.push(step=5) == 1
    finally:
        sync.close()
    for name, value in pushed.items():
        live = tight.job.adapter[name]
        assert live.dtype == torch.float32  # the selector's own dtype is kept
        assert torch.equal(live, value.float()), name  # bfloat16 -> float32 is exact


def test_a_push_while_the_selector_is_down_is_skipped_not_fatal(caplog):
    from colm_stream.launch import free_port

    sync = AdapterSync(f"127.0.0.1:{free_port()}", trainer(), every=2, rank=0, timeout=5)
    try:
        assert sync.maybe_push(step=0) is None  # not a push step
        assert sync.maybe_push(step=1) is None  # a push step; nobody listens: skipped, warned
        assert "adapter push of step 1 skipped: selector unavailable" in caplog.text
        with pytest.raises(grpc.RpcError):  # an explicit push still says what happened
            sync.push(step=1)
    finally:
        sync.close()
