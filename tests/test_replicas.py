"""Scoring split over replicas selects what one selector selects on the same batches."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from colm_server.data.collate import Collator
from colm_server.model.tiny import build_tokenizer
from colm_server.select import SelectorConfig, build_selector
from colm_server.select.replicas import share
from colm_stream.launch import free_port
from conftest import lora_model, make_records, spawn_ranks

STEPS = 3
SKETCHES = {  # the default whole-adapter sketch, and zo (whose features are its coefficients)
    "exact": dict(strategy="colm"),
    "zo": dict(strategy="colm", sketch="zo", zo_probes=4),
}


def batches() -> list:
    """Large batches of 19 samples: an odd size, so the replicas' shares differ."""
    collator = Collator(build_tokenizer(), max_length=48)
    records = make_records({"big": 30, "mid": 18, "tiny": 9}, seed=4)
    return [collator(records[i * 19:(i + 1) * 19]) for i in range(STEPS)]


def selections(selector) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for step, batch in enumerate(batches()):
        s = selector.select(batch, step=step)
        out.append((s.indices, s.weights))
    return out


def config(sketch: str) -> SelectorConfig:
    return SelectorConfig(batch_size=8, large_batch_size=19, seed=3, sketch_chunk=4, **SKETCHES[sketch])


def _replica(rank: int, port: int, sketch: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        selector = build_selector(lora_model("llama"), config(sketch), replicas=True)
        torch.save(selections(selector), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_shares_cover_every_row_once_in_order():
    for n in (0, 1, 7, 19, 64):
        for world in (1, 2, 3, 8):
            rows = [i for r in range(world) for i in share(n, r, world)]
            assert rows == list(range(n))
            sizes = [len(share(n, r, world)) for r in range(world)]
            assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("sketch", list(SKETCHES))
def test_two_replicas_select_what_one_selector_selects(tmp_path, sketch):
    spawn_ranks(_replica, (free_port(), sketch, str(tmp_path)), nprocs=2)
    single = selections(build_selector(lora_model("llama"), config(sketch)))
    for rank in (0, 1):
        replicated = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for step, ((rows, w), (want_rows, want_w)) in enumerate(zip(replicated, single)):
            assert torch.equal(rows, want_rows), f"rank {rank}, step {step}"
            assert torch.allclose(w, want_w), f"rank {rank}, step {step}"


def test_replicas_need_torch_distributed():
    with pytest.raises(RuntimeError, match="torch.distributed"):
        build_selector(lora_model("llama"), config("exact"), replicas=True)
