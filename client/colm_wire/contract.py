"""What a trainer and its selector must agree on: the base model and the LoRA adapter on it.

The selector scores samples with the model the trainers train; a trainer with another alpha,
other target modules or another base would train on coresets chosen for a different model. The
settings are described once, here, for every side:

- the selector's ``model`` section (``colm_server.config.ModelConfig``) and the model it builds;
- ``colm-train``'s flags (``colm_stream.model_flags``) and the model it builds from them;
- a Hugging Face ``Trainer``'s PEFT model (``colm_client.hf``).

A trainer sends ``settings()`` of its model in ``Join.expected``; the selector compares them with
``settings()`` of its own and refuses a join that differs (``mismatches``), naming the key and both
values. Both are read off the built peft model, so an adapter folder's own r/alpha/targets count,
and ``lora_targets: null`` means the attention projections on both sides. ``model.source`` is
compared as written: the trainer's ``--model`` must name the model the way the selector's
``model.source`` does (``tiny:llama``, ``smollm2``, or the same folder or .gguf path).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from colm_wire.quote import clip, quote

# The settings a trainer's model must share with the selector's, as Join.expected's keys.
KEYS = ("model.source", "model.num_layers", "model.lora_r", "model.lora_alpha", "model.lora_dropout",
        "model.lora_targets")
MAX_REPORTED = 4  # mismatches one refusal spells out; the rest are counted



def encode(source: str, num_layers: int | None, r: int, alpha: float, dropout: float,
           targets: Any) -> dict[str, str]:
    """The settings as ``{key: JSON text}``: alpha and dropout as floats, targets as a sorted list."""
    if isinstance(targets, str):  # peft also takes one regex
        targets = [targets]
    values = {"model.source": str(source), "model.num_layers": num_layers, "model.lora_r": int(r),
              "model.lora_alpha": float(alpha), "model.lora_dropout": float(dropout),
              "model.lora_targets": sorted(str(t) for t in targets)}
    return {k: json.dumps(v) for k, v in values.items()}


def settings(source: str, num_layers: int | None, peft_model) -> dict[str, str]:
    """``encode`` of a built model: ``source`` and ``num_layers`` as loaded, LoRA as peft holds it."""
    lora = peft_model.peft_config[peft_model.active_adapter]
    return encode(source, num_layers, lora.r, lora.lora_alpha, lora.lora_dropout, lora.target_modules)


def _value(text: str) -> Any:
    """The JSON value of ``text``; text that is not JSON stands for itself (a bare string)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list):  # target modules: a set
        return sorted(map(str, a)) == sorted(map(str, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b  # 16 == 16.0: a client may send alpha as an integer


def show(value: Any) -> str:
    """A setting as a refusal shows it: Python literals (null for None), at most a short prefix."""
    if value is None:
        return "null"
    return quote(value) if isinstance(value, str) else clip(repr(value))


def mismatches(expected: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    """``key: trainer has X, selector has Y`` for every expected key that differs from ``actual``.

    Keys ``expected`` leaves out are not checked; a key the selector does not have is a mismatch
    (listed after the differing values). At most ``MAX_REPORTED`` are spelled out, then ``N more``.
    """
    found = [f"{key}: trainer has {show(theirs)}, selector has {show(ours)}"
             for key in actual if key in expected
             if not _same(theirs := _value(expected[key]), ours := _value(actual[key]))]
    unknown = sorted(key for key in expected if key not in actual)
    found += [f"{clip(key)}: trainer has {show(_value(expected[key]))}, selector has no such setting"
              for key in unknown[:MAX_REPORTED + 1]]
    total = len(found) + max(len(unknown) - MAX_REPORTED - 1, 0)
    if total > MAX_REPORTED:
        found[MAX_REPORTED:] = [f"{total - MAX_REPORTED} more"]
    return found
