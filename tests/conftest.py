"""Shared fixtures: a tiny tokenizer, tiny models and a small imbalanced batch."""

from __future__ import annotations

import random
import time

import pytest
import torch
import torch.multiprocessing as mp

from colm_server.data.collate import Batch, Collator
from colm_server.model.load import attach_lora
from colm_server.model.tiny import build_tokenizer, tiny_model


def make_records(counts: dict[str, int], seed: int = 0) -> list[dict]:
    """Arithmetic records, ``counts[source]`` of each source, in a seeded random order."""
    rng = random.Random(seed)
    sources = [s for s, n in counts.items() for _ in range(n)]
    rng.shuffle(sources)
    records = []
    for i, src in enumerate(sources):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        records.append({
            "id": f"{src}-{i}",
            "source": src,
            "prompt": f"{src}: {a} + {b} = ?" + " pad" * rng.randint(0, 4),
            "response": f"{a + b}" + "!" * rng.randint(0, 6),
        })
    return records


@pytest.fixture(autouse=True)
def no_selector_credentials_from_the_environment(monkeypatch):
    """Tests give tokens and CAs explicitly; the shell's COLM_AUTH_TOKEN_FILE / COLM_TLS_CA stay out."""
    for name in ("COLM_AUTH_TOKEN_FILE", "COLM_TLS_CA"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def collator(tokenizer) -> Collator:
    return Collator(tokenizer, max_length=48)


@pytest.fixture()
def batch(collator) -> Batch:
    """16 samples: two large sources and one small one."""
    return collator(make_records({"big": 10, "mid": 5, "tiny": 1}, seed=1))


def randomize_lora(model, seed: int):
    """Every LoRA matrix drawn from N(0, 0.05²) with ``seed`` (B != 0: an adapter that has trained)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def lora_model(arch: str = "llama", seed: int = 0, trained: bool = True):
    """A tiny model with a LoRA adapter; `trained` gives B != 0 so A gets gradients too."""
    model = attach_lora(tiny_model(arch, seed=seed, num_layers=2), r=4, alpha=8)
    return randomize_lora(model, seed + 1) if trained else model.eval()


def spawn_ranks(fn, args: tuple, nprocs: int, timeout: float = 120.0) -> None:
    """``mp.spawn`` with a deadline: ranks that hang fail the test instead of stalling the run."""
    ranks = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not ranks.join(timeout=max(deadline - time.monotonic(), 0)):  # raises if a rank failed
        if time.monotonic() >= deadline:
            for p in ranks.processes:
                p.kill()
                p.join()
            pytest.fail(f"{nprocs} ranks still running after {timeout:.0f}s")
