"""Gradient accumulation: a step's batch in micro-batches has the gradient and loss of one pass."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from colm_client import backward_micro_batches, weighted_loss
from colm_server.data.collate import Batch, Collator
from colm_server.model.tiny import build_tokenizer
from colm_server.service.server import SelectorServer
from colm_stream.launch import free_port
from colm_stream.train import parse_args
from conftest import lora_model, make_records, spawn_ranks
from test_service import make_config
from test_train import ledger, run

# Unequal weights: a micro-batch normalised by its own weights would pull differently.
WEIGHTS = torch.tensor([0.5, 3.0, 1.0, 7.5, 2.0, 0.25, 4.0])
# Two ranks' weights; the step's total over both ranks normalises each rank's loss.
RANK_WEIGHTS = ([1.0, 4.0, 0.5, 2.0], [20.0, 30.0, 25.0, 40.0])
TOTAL = sum(map(sum, RANK_WEIGHTS))


def collate(records: list[dict]) -> Batch:
    """Right-padded to the longest of ``records``."""
    return Collator(build_tokenizer(), max_length=48)(records)


def lora_grad(model) -> torch.Tensor:
    """Every LoRA matrix's gradient, flattened in parameter order."""
    return torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "lora_" in n])


def one_pass(model, batch: Batch, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient, loss) of ``weighted_loss`` over the whole batch in one forward and backward."""
    model.zero_grad()
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    loss = weighted_loss(logits, batch.labels, weights)
    loss.backward()
    grad = lora_grad(model)
    model.zero_grad()
    return grad, loss.detach()


@pytest.fixture(scope="module")
def ragged() -> Batch:
    """7 samples of different lengths."""
    b = collate(make_records({"big": 5, "tiny": 2}, seed=3))
    assert len(set(b.token_counts().tolist())) > 2
    return b


@pytest.mark.parametrize("micro_batch", [1, 3, 7, None])
def test_micro_batches_accumulate_the_one_pass_gradient_and_loss(ragged, micro_batch):
    model = lora_model("llama")
    want, want_loss = one_pass(model, ragged, WEIGHTS)
    loss = backward_micro_batches(model, ragged.input_ids, ragged.attention_mask, ragged.labels, WEIGHTS,
                                  micro_batch=micro_batch)
    got = lora_grad(model)
    assert want.norm() > 0
    assert (got - want).norm() <= 1e-5 * want.norm()
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-6)


def test_each_micro_batch_is_cut_to_its_own_longest_row(ragged):
    model = lora_model("llama")
    widths = []
    model.register_forward_pre_hook(lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                    with_kwargs=True)
    backward_micro_batches(model, ragged.input_ids, ragged.attention_mask, ragged.labels, WEIGHTS,
                           micro_batch=3)
    lengths = ragged.token_counts()
    assert widths == [int(lengths[i:i + 3].max()) for i in (0, 3, 6)]
    assert min(widths) < ragged.input_ids.shape[1]


def test_autocast_wraps_every_forward(ragged):
    model = lora_model("llama")
    _, want_loss = one_pass(model, ragged, WEIGHTS)
    dtypes = []
    model.register_forward_hook(lambda _, args, out: dtypes.append(out.logits.dtype))

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    loss = backward_micro_batches(model, ragged.input_ids, ragged.attention_mask, ragged.labels, WEIGHTS,
                                  micro_batch=3, autocast=bf16)
    assert dtypes == [torch.bfloat16] * 3
    assert loss.item() == pytest.approx(want_loss.item(), rel=2e-2)


@pytest.mark.parametrize("micro_batch", [0, -2])
def test_a_micro_batch_below_one_is_refused(ragged, micro_batch):
    with pytest.raises(ValueError, match="micro_batch"):
        backward_micro_batches(lora_model("llama"), ragged.input_ids, ragged.attention_mask, ragged.labels,
                               WEIGHTS, micro_batch=micro_batch)


def _counting_allreduce(calls: list, bucket):
    """DDP's default all-reduce, counted: it runs only on backwards that synchronise."""
    calls.append(bucket.index())
    return allreduce_hook(None, bucket)


def _ddp_rank(rank: int, port: int, out: str) -> None:
    """One rank of a 2-rank DDP step: its own 4 samples, micro-batches of 2, then one pass to compare."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        batch = collate(make_records({"big": 5, "tiny": 3}, seed=2)[4 * rank:4 * rank + 4])
        weights = torch.tensor(RANK_WEIGHTS[rank])
        model = DDP(lora_model("llama"))
        calls = []
        model.register_comm_hook(calls, _counting_allreduce)
        loss = backward_micro_batches(model, batch.input_ids, batch.attention_mask, batch.labels, weights,
                                      micro_batch=2, total_weight=TOTAL, world_size=2)
        accumulated, grad = len(calls), lora_grad(model.module)
        model.zero_grad()
        backward_micro_batches(model, batch.input_ids, batch.attention_mask, batch.labels, weights,
                               micro_batch=None, total_weight=TOTAL, world_size=2)
        torch.save({"grad": grad, "loss": loss, "syncs": (accumulated, len(calls) - accumulated)},
                   f"{out}/rank{rank}.pt")
        del model  # DDP's reducer goes while the group is up
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ddp_ranks_accumulate_the_gradient_of_the_whole_steps_weighted_loss(tmp_path):
    spawn_ranks(_ddp_rank, (free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert torch.equal(ranks[0]["grad"], ranks[1]["grad"])
    for r in ranks:  # all-reduced as often as one pass: on the last micro-batch only
        assert r["syncs"][0] == r["syncs"][1] > 0

    # One process, both ranks' samples together: sum_all w l / sum_all w.
    weights = torch.tensor([w for ws in RANK_WEIGHTS for w in ws])
    want, want_loss = one_pass(lora_model("llama"), collate(make_records({"big": 5, "tiny": 3}, seed=2)),
                               weights)
    assert want.norm() > 0
    assert (ranks[0]["grad"] - want).norm() <= 1e-5 * want.norm()
    mean_loss = (ranks[0]["loss"] + ranks[1]["loss"]) / 2
    assert mean_loss.item() == pytest.approx(want_loss.item(), rel=1e-5)


def test_colm_train_takes_a_micro_batch_of_at_least_zero():
    base = ["--model", "tiny:llama", "--selector", "127.0.0.1:1", "--steps", "1", "--output-dir", "x"]
    assert parse_args(base).micro_batch == 0
    assert parse_args(base + ["--micro-batch", "3"]).micro_batch == 3
    with pytest.raises(SystemExit):
        parse_args(base + ["--micro-batch", "-1"])


def test_colm_train_with_micro_batches_trains_as_with_whole_batches(tmp_path):
    srv = SelectorServer(make_config(tmp_path, **{"service.world_size": 1}))
    srv.start()
    try:
        run(srv, tmp_path / "whole", 3)
        run(srv, tmp_path / "micro", 3, "--micro-batch", "3")
    finally:
        srv.stop(grace=1)
    whole, micro = ledger(tmp_path / "whole"), ledger(tmp_path / "micro")
    assert [e["ids"] for e in micro] == [e["ids"] for e in whole]
    assert [e["loss"] for e in micro] == pytest.approx([e["loss"] for e in whole], rel=1e-4)
