"""A trainer joins only a selector with its model: the settings of ``colm_wire.contract``.

A real selector on 127.0.0.1, the tiny model, and ``colm-train`` as its users run it.
"""

from __future__ import annotations

import json
import math

import grpc
import pytest

from colm_client.stream import CoresetStream, CoresetStreamError
from colm_server.config import ModelConfig, from_dict, to_dict
from colm_server.service.server import SelectorServer
from colm_stream.jobs import trainer_args
from colm_stream.model_flags import model_arguments
from colm_stream.train import parse_args, train
from colm_wire.proto import selector_pb2 as pb
from colm_wire.proto import selector_pb2_grpc as pb_grpc
from test_service import make_config, take, target


@pytest.fixture()
def selector(tmp_path):
    """One rank; model.source tiny:llama, lora_r 4, the other model keys at their defaults."""
    srv = SelectorServer(make_config(tmp_path, **{"service.world_size": 1}))
    srv.start()
    yield srv
    srv.stop(grace=1)


def run(srv, out, *flags: str) -> dict:
    """``colm-train`` for 2 steps against ``srv``; ``flags`` come last and win."""
    return train(parse_args(["--model", "tiny:llama", "--lora-r", "4", "--selector", target(srv),
                             "--steps", "2", "--output-dir", str(out), *flags]))


@pytest.mark.parametrize("flags,message", [
    (["--lora-alpha", "32"], "model.lora_alpha: trainer has 32.0, selector has 16.0"),
    (["--lora-targets", "q_proj", "v_proj"],
     "model.lora_targets: trainer has ['q_proj', 'v_proj'], "
     "selector has ['k_proj', 'o_proj', 'q_proj', 'v_proj']"),
    (["--model", "tiny:qwen2"], "model.source: trainer has 'tiny:qwen2', selector has 'tiny:llama'"),
    (["--lora-r", "8"], "model.lora_r: trainer has 8, selector has 4"),
    (["--num-layers", "1"], "model.num_layers: trainer has 1, selector has null"),
    (["--job-id", "other"], "service.job_id: trainer has 'other', selector has 'default'"),
])
def test_a_trainer_with_another_model_or_job_is_refused_naming_the_key_and_both_values(
        selector, tmp_path, flags, message):
    with pytest.raises(CoresetStreamError) as err:
        run(selector, tmp_path / "run", *flags)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert message in err.value.details, err.value.details
    assert not (tmp_path / "run" / "checkpoint-1").exists()  # nothing trained


def test_a_trainer_with_the_selectors_model_trains(selector, tmp_path):
    result = run(selector, tmp_path / "run", "--lora-alpha", "16")  # an int on the command line
    assert result["step"] == 1 and math.isfinite(result["loss"])


def test_a_join_without_expectations_is_accepted_as_before(selector):
    (batch,) = take(CoresetStream(target(selector), rank=0, world_size=1), 1)
    assert batch.step == 0


def test_a_client_may_check_only_some_keys_and_spell_numbers_as_integers(selector):
    expected = {"model.source": '"tiny:llama"', "model.lora_alpha": "16", "model.lora_r": "4"}
    (batch,) = take(CoresetStream(target(selector), rank=0, world_size=1, expected=expected), 1)
    assert batch.step == 0


def test_every_differing_key_is_named_and_an_unknown_key_is_refused(selector):
    expected = {"model.lora_alpha": "8.0", "model.lora_dropout": "0.5", "model.quantized": "true"}
    with pytest.raises(CoresetStreamError) as err:
        take(CoresetStream(target(selector), rank=0, world_size=1, expected=expected), 1)
    details = err.value.details
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "model.lora_alpha: trainer has 8.0, selector has 16.0" in details
    assert "model.lora_dropout: trainer has 0.5, selector has 0.0" in details
    assert "model.quantized: trainer has True, selector has no such setting" in details


def test_huge_expectations_are_refused_quoting_only_their_head(selector):
    huge = "m" * (1 << 20)
    expected = {"model.source": json.dumps(huge), **{f"k{i}" * 1000: "1" for i in range(50)}}
    join = pb.StreamRequest(join=pb.Join(job_id="default", rank=0, world_size=1, expected=expected))
    with grpc.insecure_channel(target(selector)) as channel:
        with pytest.raises(grpc.RpcError) as err:
            next(pb_grpc.SelectorStub(channel).Stream(iter([join]), timeout=30))
    details = err.value.details()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"model.source: trainer has '{'m' * 64}'… (1048576 characters)" in details
    assert "47 more" in details and len(details) < 2000, details


def test_the_flags_of_model_arguments_give_the_trainer_the_config_settings():
    model = ModelConfig(source="tiny:qwen2", num_layers=1, lora_r=2, lora_alpha=3.5, lora_dropout=0.25,
                        lora_targets=["q_proj", "v_proj"])
    args = parse_args([*model_arguments(model), "--selector", "x:1", "--steps", "1",
                       "--output-dir", "x"])
    assert (args.model, args.num_layers, args.lora_r, args.lora_alpha, args.lora_dropout,
            args.lora_targets) == ("tiny:qwen2", 1, 2, 3.5, 0.25, ["q_proj", "v_proj"])
    defaults = parse_args(["--model", "m", "--selector", "x:1", "--steps", "1", "--output-dir", "x"])
    mc = ModelConfig()
    assert (defaults.num_layers, defaults.lora_r, defaults.lora_alpha, defaults.lora_dropout,
            defaults.lora_targets) == (mc.num_layers, mc.lora_r, mc.lora_alpha, mc.lora_dropout,
                                       mc.lora_targets)
    assert isinstance(defaults.lora_alpha, float)


def test_the_default_trainer_of_a_job_trains_against_its_selector(tmp_path):
    """``jobs.trainer_args`` carries the job id and every model setting the selector checks."""
    job = to_dict(make_config(tmp_path, **{
        "service.world_size": 1, "service.job_id": "job-7", "model.num_layers": 1,
        "model.lora_alpha": 8, "model.lora_dropout": 0.1, "model.lora_targets": "[q_proj, v_proj]"}))
    srv = SelectorServer(from_dict(job))
    srv.start()
    out = tmp_path / "trainer"
    try:
        argv = trainer_args(job, steps=2, output_dir=out, lr=1e-3)
        result = train(parse_args([*argv, "--selector", target(srv)]))
    finally:
        srv.stop(grace=1)
    assert result["step"] == 1 and result["steps"] == 2 and math.isfinite(result["loss"])
    assert (out / "checkpoint-1" / "adapter" / "adapter_config.json").is_file()
