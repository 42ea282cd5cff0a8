"""Held-out evaluation per source: loss, and exact match of greedy answers on math-style data."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from colm_client.loss import per_sample_loss
from colm_server.data.collate import Collator


@dataclass(frozen=True)
class SourceLosses:
    """Mean response-token loss per source; ``macro`` weighs sources equally, ``micro`` records."""

    per_source: dict[str, float]
    macro: float
    micro: float


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[torch.device]:
    """``model`` in eval mode (its device yielded), its training flag restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield next(model.parameters()).device
    finally:
        model.train(was_training)


@torch.no_grad()
def source_losses(model: nn.Module, collator: Collator, records: Sequence[Mapping[str, Any]],
                  batch_size: int = 64) -> SourceLosses:
    """Evaluate ``model`` on ``records`` in batches; a small source counts as much as a large one in macro."""
    if not records:
        raise ValueError("records: need at least one held-out record")
    per_source: dict[str, list[float]] = defaultdict(list)
    with _evaluating(model) as device:
        for i in range(0, len(records), batch_size):
            batch = collator(records[i:i + batch_size]).to(device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            for source, loss in zip(batch.sources, per_sample_loss(logits, batch.labels).tolist()):
                per_source[source].append(loss)
    means = {s: sum(v) / len(v) for s, v in sorted(per_source.items())}
    everything = [x for v in per_source.values() for x in v]
    return SourceLosses(means, sum(means.values()) / len(means), sum(everything) / len(everything))


_BOXED = "\\boxed{"
_ANSWER_IS = re.compile(r"answer is:?\s*(.+?)\s*(?:\.\s*)?$", re.IGNORECASE | re.MULTILINE)


def final_answer(text: str) -> str | None:
    """The final answer of a worked solution, normalised; None when it states none.

    Recognised, in this order: ``#### 42`` (GSM8K), the last ``\\boxed{...}`` (MATH) and the last
    ``The answer is 42.`` / ``The answer is (B).``.
    """
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return _normalise(tail.splitlines()[0]) if tail else None
    start = text.rfind(_BOXED)
    if start >= 0:
        depth, i = 1, start + len(_BOXED)
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return _normalise(text[i:j])
        return None  # an unclosed box: the generation was cut off
    found = _ANSWER_IS.findall(text)
    return _normalise(found[-1]) if found else None


def _normalise(answer: str) -> str | None:
    """Drop what does not change an answer: $ signs, LaTeX spacing, thousands commas, (A) -> A."""
    a = answer.strip().replace("\\$", "").replace("$", "").replace("\\!", "").replace("\\,", "")
    a = re.sub(r"(?<=\d),(?=\d{3}\b)", "", a).rstrip(".").strip()
    a = re.sub(r"^\(([A-Ea-e])\)$", r"\1", a)
    return a or None


@torch.no_grad()
def exact_match(model: nn.Module, collator: Collator, records: Sequence[Mapping[str, Any]], *,
                max_new_tokens: int = 256, batch_size: int = 16) -> dict[str, float]:
    """Share of records whose greedy completion states the reference's final answer, per source.

    Records whose reference response has no recognisable final answer are left out.
    """
    tokenizer = collator.tokenizer
    scored = [(r, final_answer(str(r["response"]))) for r in records]
    scored = [(r, ref) for r, ref in scored if ref is not None]
    if not scored:
        raise ValueError("records: none has a final answer to compare with")
    hits: dict[str, list[bool]] = defaultdict(list)
    with _evaluating(model) as device:
        for i in range(0, len(scored), batch_size):
            chunk = scored[i:i + batch_size]
            prompts = [collator.prompt_ids(str(r.get("prompt") or "")) for r, _ in chunk]
            width = max(len(p) for p in prompts)
            pad = collator.pad_token_id
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)  # left pad
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            for (record, ref), text in zip(chunk, texts):
                hits[str(record.get("source") or "unknown")].append(final_answer(text) == ref)
    return {s: sum(v) / len(v) for s, v in sorted(hits.items())}
