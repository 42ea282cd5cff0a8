"""The weighted loss: per-rank normalisation, and the step's total weight that makes DDP exact."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from colm_client.loss import weighted_loss
from colm_client.stream import CoresetBatch
from colm_server.data.collate import Collator
from colm_server.model.tiny import build_tokenizer
from colm_stream.launch import free_port
from colm_wire.proto import selector_pb2 as pb
from conftest import lora_model, make_records, spawn_ranks

# Rank 0 holds samples kept whole (weight 1), rank 1 heavily weighted ones: normalising each
# rank by its own weights gives rank 0's 4 units the same pull as rank 1's 115.
RANK_WEIGHTS = ([1.0, 1.0, 1.0, 1.0], [20.0, 30.0, 25.0, 40.0])
TOTAL = sum(map(sum, RANK_WEIGHTS))


def step_data():
    """The step's 8 samples collated once (same padding on every rank), rank r's are rows 4r..4r+3."""
    return Collator(build_tokenizer(), max_length=48)(make_records({"big": 5, "tiny": 3}, seed=2))


def rows(rank: int) -> slice:
    return slice(4 * rank, 4 * rank + 4)


def lora_grad(model) -> torch.Tensor:
    """Every LoRA matrix's gradient, flattened in parameter order."""
    return torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "lora_" in n])


def random_logits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 6, 11, generator=gen)
    labels = torch.randint(0, 11, (n, 6), generator=gen)
    labels[:, :2] = -100  # a prompt without loss
    return logits, labels


def test_the_steps_total_on_one_rank_is_todays_loss():
    logits, labels = random_logits(4, seed=0)
    weights = torch.tensor([0.5, 2.0, 1.0, 7.5])
    today = weighted_loss(logits, labels, weights)
    assert torch.allclose(weighted_loss(logits, labels, weights, total_weight=float(weights.sum())), today,
                          rtol=1e-6)
    assert torch.allclose(weighted_loss(logits, labels, weights, 11.0, world_size=1), today, rtol=1e-6)


def test_the_mean_over_ranks_is_the_steps_weighted_mean_and_per_rank_normalisation_is_not():
    logits, labels = random_logits(8, seed=1)
    weights = torch.tensor([w for ws in RANK_WEIGHTS for w in ws])
    step = weighted_loss(logits, labels, weights)  # sum_all w l / sum_all w
    per_rank = [(logits[4 * r:4 * r + 4], labels[4 * r:4 * r + 4], weights[4 * r:4 * r + 4]) for r in (0, 1)]
    exact = sum(weighted_loss(*x, total_weight=TOTAL, world_size=2) for x in per_rank) / 2
    assert torch.allclose(exact, step, rtol=1e-6)
    biased = sum(weighted_loss(*x) for x in per_rank) / 2
    assert not torch.allclose(biased, step, rtol=1e-2)


def test_a_non_positive_total_is_refused():
    logits, labels = random_logits(2, seed=3)
    with pytest.raises(ValueError, match="positive"):
        weighted_loss(logits, labels, torch.ones(2), total_weight=0.0)


def test_the_batch_exposes_the_steps_total_and_none_when_the_selector_does_not_send_it():
    msg = pb.CoresetBatch(step=1, ids=["a"], weights=[2.0], sources=["x"], step_weight_sum=9.5)
    assert CoresetBatch.from_message(msg).step_weight_sum == 9.5
    msg.ClearField("step_weight_sum")  # as an older selector sends it
    assert CoresetBatch.from_message(msg).step_weight_sum is None


def _ddp_rank(rank: int, port: int, out: str) -> None:
    """One rank of the 2-rank DDP step: its 4 samples, the step's total, one backward."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        batch = step_data()
        model = DDP(lora_model("llama"))  # same seed on both ranks; DDP broadcasts rank 0's anyway
        r = rows(rank)
        logits = model(input_ids=batch.input_ids[r], attention_mask=batch.attention_mask[r]).logits
        loss = weighted_loss(logits, batch.labels[r], torch.tensor(RANK_WEIGHTS[rank]), total_weight=TOTAL)
        loss.backward()  # DDP averages the two ranks' gradients
        torch.save(lora_grad(model.module), f"{out}/grad-rank{rank}.pt")
        del model, logits, loss  # DDP's reducer goes while the group is up
        dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()


def test_a_two_rank_ddp_step_gets_the_gradient_of_the_whole_steps_weighted_loss(tmp_path):
    spawn_ranks(_ddp_rank, (free_port(), str(tmp_path)), nprocs=2)
    ddp = [torch.load(tmp_path / f"grad-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert torch.equal(ddp[0], ddp[1])  # every rank steps with the same gradient

    # One process, the union of both ranks' samples: sum_all w l / sum_all w.
    batch, model = step_data(), lora_model("llama")
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    weights = torch.tensor([w for ws in RANK_WEIGHTS for w in ws])
    weighted_loss(logits, batch.labels, weights).backward()
    want = lora_grad(model)
    assert want.norm() > 0
    assert (ddp[0] - want).norm() <= 1e-5 * want.norm()

    # What per-rank normalisation would give: the mean of the ranks' own weighted means.
    model.zero_grad()
    for rank in (0, 1):
        r = rows(rank)
        logits = model(input_ids=batch.input_ids[r], attention_mask=batch.attention_mask[r]).logits
        (weighted_loss(logits, batch.labels[r], torch.tensor(RANK_WEIGHTS[rank])) / 2).backward()
    assert (lora_grad(model) - want).norm() > 0.1 * want.norm()
