"""The demo's base model: a tiny Llama pretrained for a few seconds so LoRA has something to adapt.

LoRA on a randomly initialised model barely moves its loss, so the demo first trains all weights
of a small Llama on a balanced mix of the synthetic tasks (the "pretraining"), then saves it as an
ordinary Hugging Face folder, with its character tokenizer, for the selector and trainers to load.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from colm_client.loss import weighted_loss
from colm_server.data.collate import Collator
from colm_server.data.synthetic import synthetic_stream
from colm_server.model.tiny import build_tokenizer, tiny_config


def pretrain_base(folder: str | Path, *, steps: int = 150, batch_size: int = 16, num_layers: int = 4,
                  hidden: int = 128, max_length: int = 64, lr: float = 3e-3, seed: int = 0) -> Path:
    """Train a tiny Llama from scratch on the balanced task mix and save it to ``folder``."""
    folder = Path(folder)
    tokenizer = build_tokenizer()
    collator = Collator(tokenizer, max_length=max_length, chat_template=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_config("llama", vocab_size=len(tokenizer), num_layers=num_layers, hidden=hidden))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    stream = synthetic_stream(seed=seed + 1_000_003, balanced=True)  # not the fine-tuning stream
    for _ in tqdm(range(steps), desc="pretraining the base model", unit="step"):
        batch = collator(list(itertools.islice(stream, batch_size)))
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        weighted_loss(logits, batch.labels, torch.ones(batch_size)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
