"""Tokenize ``{id, source, prompt, response}`` records into right-padded training batches.

Layout of one row: prompt tokens, then response tokens, then padding.
``labels`` holds the token id on response tokens and -100 on prompt and padding, so a
causal LM's loss (which shifts labels itself) counts the response only.

- Prompt tokens: the tokenizer's chat template with one user turn and the generation
  prompt when ``chat_template`` is set and the tokenizer has one; otherwise the prompt
  tokenized with the tokenizer's special tokens (BOS).
- Response tokens: the response without special tokens, then EOS when the tokenizer has one.

Truncation, when prompt + response exceed ``max_length``: the response is kept and the
prompt is cut to its head; but the prompt keeps at least
``min(len(prompt), floor(max_length * min_prompt_fraction))`` tokens, the response being
cut at its tail to make room. A response always keeps at least one token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

IGNORE_INDEX = -100


@dataclass
class Batch:
    """A right-padded batch of tokenized samples with response-only labels."""

    input_ids: torch.Tensor  # LongTensor [N, T]
    attention_mask: torch.Tensor  # LongTensor [N, T], 1 on tokens, 0 on padding
    labels: torch.Tensor  # LongTensor [N, T], -100 on prompt and padding
    ids: list[str]
    sources: list[str]
    truncated: torch.Tensor | None = field(default=None, repr=False)  # BoolTensor [N] or unknown
    # Real tokens per row on the host, read from the mask once per batch (see `host_lengths`).
    _host_lengths: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        shape = self.input_ids.shape
        if self.input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected [N, T], got shape {tuple(shape)}")
        for name in ("attention_mask", "labels"):
            if getattr(self, name).shape != shape:
                raise ValueError(
                    f"{name}: shape {tuple(getattr(self, name).shape)} != {tuple(shape)}"
                )
        for name in ("ids", "sources"):
            if len(getattr(self, name)) != shape[0]:
                raise ValueError(f"{name}: {len(getattr(self, name))} entries for {shape[0]} rows")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with its tensors on ``device`` (and its host row lengths, when known)."""
        moved = replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            labels=self.labels.to(device),
        )
        if self._host_lengths is not None or self.attention_mask.device.type == "cpu":
            moved._host_lengths = self.host_lengths()
        return moved

    @property
    def num_truncated(self) -> int:
        """How many rows were cut to fit ``max_length`` (0 when unknown)."""
        return 0 if self.truncated is None else int(self.truncated.sum())

    def token_counts(self) -> torch.Tensor:
        """Real (non-padding) tokens per row, LongTensor [N]."""
        return self.attention_mask.sum(dim=1)

    def host_lengths(self) -> torch.Tensor:
        """Real tokens per row, LongTensor [N] on the host: read from a device mask once per
        batch (one sync), not once per `subset`."""
        if self._host_lengths is None:
            self._host_lengths = self.attention_mask.sum(dim=1).cpu()
        return self._host_lengths

    def subset(self, indices: torch.Tensor | Sequence[int]) -> Batch:
        """Rows ``indices`` in that order, padding trimmed to the new longest row.

        Row names and the new width come from host copies, so a batch on a device is not
        synchronised per subset (indices given as a device tensor are read back once)."""
        if isinstance(indices, torch.Tensor):
            host = indices.detach().to("cpu", torch.long).reshape(-1)
            idx = indices.to(self.input_ids.device, torch.long).reshape(-1)
        else:
            host = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
            idx = host.to(self.input_ids.device, non_blocking=True)
        lengths = self.host_lengths()[host]
        width = int(lengths.max()) if len(host) else 0
        rows = host.tolist()
        sub = Batch(
            input_ids=self.input_ids[idx, :width],
            attention_mask=self.attention_mask[idx, :width],
            labels=self.labels[idx, :width],
            ids=[self.ids[i] for i in rows],
            sources=[self.sources[i] for i in rows],
            truncated=None if self.truncated is None else self.truncated[host.to(self.truncated.device)],
        )
        sub._host_lengths = lengths
        return sub


@dataclass
class Collator:
    """Turns records into a ``Batch``: chat-templated or plain prompt, response-only labels."""

    tokenizer: Any
    max_length: int = 512
    chat_template: bool = False
    min_prompt_fraction: float = 0.25

    def __post_init__(self) -> None:
        if self.tokenizer is None:
            raise ValueError("tokenizer: required")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"max_length: must be an int >= 2, got {self.max_length!r}")
        if not 0.0 <= self.min_prompt_fraction <= 1.0:
            raise ValueError(
                f"min_prompt_fraction: must be in [0, 1], got {self.min_prompt_fraction!r}"
            )
        if self.pad_token_id is None:
            raise ValueError("tokenizer: has neither a pad token nor an EOS token to pad with")

    @property
    def pad_token_id(self) -> int | None:
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    def prompt_ids(self, prompt: str) -> list[int]:
        """Prompt tokens: chat template with a generation prompt, or plain with BOS."""
        tok = self.tokenizer
        if self.chat_template and getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            # The template writes the special tokens itself (BOS included).
            return list(tok(text, add_special_tokens=False)["input_ids"])
        return list(tok(prompt, add_special_tokens=True)["input_ids"])

    def response_ids(self, response: str) -> list[int]:
        """Response tokens without special tokens, then EOS when the tokenizer has one."""
        ids = list(self.tokenizer(response, add_special_tokens=False)["input_ids"])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def encode(self, prompt: str, response: str) -> tuple[list[int], list[int], bool]:
        """``(input_ids, labels, truncated)`` for one sample, truncated by the module's policy."""
        p, r = self.prompt_ids(prompt), self.response_ids(response)
        if not r:
            raise ValueError("response: tokenizes to no tokens (and the tokenizer has no EOS)")
        truncated = len(p) + len(r) > self.max_length
        if truncated:
            keep_prompt = min(len(p), math.floor(self.max_length * self.min_prompt_fraction))
            keep_response = max(1, min(len(r), self.max_length - keep_prompt))
            p, r = p[: self.max_length - keep_response], r[:keep_response]
        return p + r, [IGNORE_INDEX] * len(p) + r, truncated

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> Batch:
        """Collate records (``id``, ``source``, ``prompt``/``response`` or ``text``) into a Batch."""
        rows, ids, sources = [], [], []
        for rec in records:
            prompt, response = _prompt_response(rec)
            rows.append(self.encode(prompt, response))
            ids.append(str(rec["id"]))
            sources.append(str(rec.get("source") or "unknown"))
        n, width = len(rows), max((len(x) for x, _, _ in rows), default=0)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        for i, (x, y, _) in enumerate(rows):
            input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            labels[i, : len(y)] = torch.tensor(y, dtype=torch.long)
            attention_mask[i, : len(x)] = 1
        flags = torch.tensor([t for _, _, t in rows], dtype=torch.bool)
        return Batch(input_ids, attention_mask, labels, ids, sources, truncated=flags)


def _prompt_response(rec: Mapping[str, Any]) -> tuple[str, str]:
    """``(prompt, response)`` of a record; a ``text``-only record is all response."""
    if "id" not in rec:
        raise ValueError("record: missing field 'id'")
    if "response" in rec:
        return str(rec.get("prompt") or ""), str(rec["response"])
    if "text" in rec:
        return "", str(rec["text"])
    raise ValueError(f"record {rec['id']!r}: needs 'prompt' and 'response', or 'text'")
