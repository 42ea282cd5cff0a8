"""`colm-train` on GPUs, checked on the CPU: one device per rank, the base in the compute dtype with
float32 LoRA, the process group's timeout, and the same initial adapter on a bf16 and an fp32 base."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
import torch

from colm_server.model.load import attach_lora, load_model
from colm_server.service.server import SelectorServer, build_engine
from colm_stream import train as train_mod
from colm_stream.train import load_trainer_model, parse_args, setup_distributed, train
from colm_wire.adapter import adapter_state
from test_service import make_config, target

BASE = ["--model", "tiny:llama", "--lora-r", "4", "--selector", "127.0.0.1:1", "--steps", "1",
        "--output-dir", "unused"]


@pytest.fixture()
def fake_gpus(monkeypatch):
    """A machine with 4 CUDA devices as far as the trainer can tell; the devices made current."""
    current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return current


@pytest.fixture()
def process_group(monkeypatch):
    """init_process_group recorded instead of run, as rank 1 of 2."""
    calls: list[tuple[tuple, dict]] = []
    monkeypatch.setattr(train_mod.dist, "init_process_group", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(train_mod.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(train_mod.dist, "get_world_size", lambda: 2)
    return calls


@pytest.mark.parametrize("rank,world,local,want", [(0, 2, None, 0), (1, 2, None, 1), (5, 8, None, 1),
                                                   (3, 4, "2", 2)])
def test_independent_ranks_get_a_gpu_each(fake_gpus, monkeypatch, rank, world, local, want):
    """--rank/--world-size: cuda:LOCAL_RANK when a launcher sets it, else cuda:(rank mod 4)."""
    if local is not None:
        monkeypatch.setenv("LOCAL_RANK", local)
    got = setup_distributed(parse_args(BASE + ["--rank", str(rank), "--world-size", str(world)]))
    assert got == (rank, world, torch.device("cuda", want), False)
    assert fake_gpus == [torch.device("cuda", want)]


def test_torchrun_ranks_get_their_local_gpu_and_the_timeout(fake_gpus, process_group, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    got = setup_distributed(parse_args(BASE))
    assert got == (1, 2, torch.device("cuda", 1), True)
    assert fake_gpus == [torch.device("cuda", 1)]
    assert process_group == [(("nccl",), {"timeout": timedelta(minutes=60)})]


def test_the_process_group_timeout_is_the_flags(process_group, monkeypatch):
    """On the CPU too (gloo): a long selector restart must not end DDP at the default 10 minutes."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    got = setup_distributed(parse_args(BASE + ["--dist-timeout", "90"]))
    assert got == (1, 2, torch.device("cpu"), True)
    assert process_group == [(("gloo",), {"timeout": timedelta(minutes=90)})]


def test_a_local_rank_without_a_gpu_is_refused(fake_gpus, process_group, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(ValueError, match="LOCAL_RANK 5 names no GPU: this machine has 4"):
        setup_distributed(parse_args(BASE))
    assert process_group == []


@pytest.mark.parametrize("value", ["0", "-5"])
def test_the_timeout_must_be_positive_and_is_documented(value, capsys):
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--dist-timeout", value])
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--dist-timeout MINUTES" in text and "(default 60)" in text


@pytest.mark.parametrize("precision,base_dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_the_base_loads_in_the_compute_dtype_and_lora_stays_float32(precision, base_dtype):
    model = load_trainer_model(parse_args(BASE + ["--precision", precision]), torch.device("cpu"))
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    base = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    assert lora and base
    assert {p.dtype for p in lora.values()} == {torch.float32}
    assert {p.dtype for p in base.values()} == {base_dtype}
    assert all(p.requires_grad for p in lora.values()) and not any(p.requires_grad for p in base.values())
    assert model.training


def lora_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("seed", [0, 7])
def test_a_new_adapter_is_bit_identical_on_a_bf16_and_an_fp32_base(seed):
    """peft rounds A to the base layer's dtype before upcasting it; attach_lora draws it in float32."""
    on_bf16 = lora_of(attach_lora(load_model("tiny:llama", dtype=torch.bfloat16), r=4, seed=seed))
    on_fp32 = lora_of(attach_lora(load_model("tiny:llama"), r=4, seed=seed))
    assert on_bf16.keys() == on_fp32.keys()
    a = [n for n in on_fp32 if "lora_A" in n]
    assert a and len(a) == len(on_fp32) // 2
    for name, value in on_fp32.items():
        assert on_bf16[name].dtype == value.dtype == torch.float32, name
        assert torch.equal(on_bf16[name], value), name
    assert all(on_fp32[n].abs().max() > 0 for n in a)  # A random, B zero
    assert all(not on_fp32[n].any() for n in on_fp32 if "lora_B" in n)
    # Not a bf16 number: float32 draws survive (an A rounded to bf16 would equal its rounding).
    assert any(not torch.equal(on_fp32[n], on_fp32[n].bfloat16().float()) for n in a)
    other = lora_of(attach_lora(load_model("tiny:llama"), r=4, seed=seed + 1))
    assert not torch.equal(other[a[0]], on_fp32[a[0]])


def test_the_rng_of_the_caller_is_left_as_it_was():
    torch.manual_seed(3)
    want = torch.rand(4)
    torch.manual_seed(3)
    attach_lora(load_model("tiny:llama"), r=4)
    assert torch.equal(torch.rand(4), want)


def test_a_bf16_selector_starts_from_the_bf16_trainers_adapter(tmp_path):
    """The selector's engine (model.dtype bfloat16, as on a GPU) and a trainer with --precision bf16."""
    engine = build_engine(make_config(tmp_path, **{"model.dtype": "bfloat16"}))
    trainer = load_trainer_model(parse_args(BASE + ["--precision", "bf16"]), torch.device("cpu"))
    pushed = adapter_state(trainer)
    assert engine.adapter.keys() == pushed.keys()
    for name, value in pushed.items():
        assert engine.adapter[name].dtype == torch.float32 and torch.equal(engine.adapter[name], value), name


def test_a_bf16_trainer_trains_and_pushes(tmp_path):
    srv = SelectorServer(make_config(tmp_path, **{"service.world_size": 1}))
    srv.start()
    try:
        result = train(parse_args(["--model", "tiny:llama", "--lora-r", "4", "--selector", target(srv),
                                   "--steps", "2", "--output-dir", str(tmp_path / "run"),
                                   "--precision", "bf16", "--push-every", "2"]))
        assert srv.job.param_version == 1
    finally:
        srv.stop(grace=1)
    assert result["steps"] == 2 and math.isfinite(result["loss"])
