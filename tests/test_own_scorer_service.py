"""The service with a scorer of its own (``selector.scorer_adapter: own``): a smaller model of the
same tokenizer, or an early exit of the trained one, whose LoRA the selector trains and journals."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from colm_client.stream import CoresetStream
from colm_client.sync import AdapterSync
from colm_server.model.load import decoder_layers
from colm_server.model.tiny import build_tokenizer, tiny_config
from colm_server.service.server import SelectorServer, ServingConfigError
from colm_wire.adapter import adapter_state
from conftest import lora_model
from test_service import W, make_config, take, take_all, target


def save_model(folder, *, num_layers: int, hidden: int, extra_tokens: tuple[str, ...] = ()) -> str:
    """A random tiny Llama and its tokenizer (the tiny one plus ``extra_tokens``) as an HF folder."""
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(list(extra_tokens))
    config = tiny_config("llama", vocab_size=len(tokenizer), num_layers=num_layers, hidden=hidden)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def scorer_lora(srv) -> dict[str, torch.Tensor]:
    model = srv.job.selector.scorer.split.model
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def own_config(tmp_path, work: str = "work", **extra):
    return make_config(tmp_path, **{"selector.scorer_adapter": "own", "selector.scorer_lr": 0.01,
                                    "service.work_dir": str(tmp_path / work), **extra})


def test_a_smaller_model_of_the_same_tokenizer_scores_and_trains_its_own_adapter(tmp_path):
    small = save_model(tmp_path / "small", num_layers=1, hidden=32)
    srv = SelectorServer(own_config(tmp_path, **{"selector.scorer_model": small, "service.metrics_port": 0}))
    srv.start()
    try:
        scorer = srv.job.selector.scorer.split.model
        assert len(decoder_layers(scorer)) == 1 and scorer.config.hidden_size == 32
        start = scorer_lora(srv)
        batches = take_all(srv, 3)
        assert all(len(b.ids) == 4 for rank in batches for b in rank)
        assert srv.job.selector.own_adapter.steps >= 3  # one step per selection
        assert any(not torch.equal(scorer_lora(srv)[n], start[n]) for n in start)
        assert srv.metrics.registry.get_sample_value("colm_scorer_loss") > 0  # its training, watched
        # The trainer's pushes still land, in the trained model's adapter, and leave the scorer's alone.
        trainer = lora_model("llama", seed=3)
        sync = AdapterSync(target(srv), trainer, every=1, rank=0)
        assert sync.maybe_push(step=0) == 1
        sync.close()
        for name, value in adapter_state(trainer).items():
            assert torch.equal(srv.job.adapter[name], value.detach())
        assert not any(p.is_cuda for p in srv.job.adapter.values())
    finally:
        srv.stop(grace=1)


def test_a_model_of_another_tokenizer_is_refused_at_start_naming_both(tmp_path):
    other = save_model(tmp_path / "other", num_layers=1, hidden=32, extra_tokens=("<tool>",))
    ours = len(build_tokenizer())
    refusal = (rf"selector\.scorer_model '.*other' has another tokenizer than model\.source 'tiny:llama' "
               rf"\({ours + 1} tokens against {ours}")
    with pytest.raises(ServingConfigError, match=refusal):
        SelectorServer(own_config(tmp_path, **{"selector.scorer_model": other}))


def test_an_early_exit_with_its_own_adapter_loads_only_the_layers_it_runs(tmp_path):
    srv = SelectorServer(own_config(tmp_path, **{"selector.scorer_layers": 1}))  # of tiny:llama's 2
    srv.start()
    try:
        assert len(decoder_layers(srv.job.selector.scorer.split.model)) == 1
        assert any(".layers.1." in name for name in srv.job.adapter)  # pushes still cover both
        assert take_all(srv, 1)[0][0].ids
    finally:
        srv.stop(grace=1)


def test_a_restarted_selector_resumes_its_own_adapter_and_selects_as_if_never_stopped(tmp_path):
    """Steps 3..5 after a restart are those of a run that never stopped: the scorer's adapter and
    optimiser state came back from the journal."""
    settings = {"selector.scorer_layers": 1, "service.prefetch": 1}
    whole = SelectorServer(own_config(tmp_path, "whole", **settings))
    whole.start()
    try:
        expected = take_all(whole, 6)
    finally:
        whole.stop(grace=1)
    config = own_config(tmp_path, "stopped", **settings)
    srv = SelectorServer(config)
    srv.start()
    try:
        take_all(srv, 3)
    finally:
        srv.stop(grace=1)
    srv = SelectorServer(config)
    srv.start()
    try:
        after = take_all(srv, 3, start_step=3)
        for rank in range(W):
            assert [b.ids for b in after[rank]] == [b.ids for b in expected[rank][3:6]]
            weights = [b.weights.tolist() for b in after[rank]]
            assert weights == [b.weights.tolist() for b in expected[rank][3:6]]
        replay = take(CoresetStream(target(srv), rank=0, world_size=W, start_step=0), 3)
        assert [b.ids for b in replay] == [b.ids for b in expected[0][:3]]
    finally:
        srv.stop(grace=1)
