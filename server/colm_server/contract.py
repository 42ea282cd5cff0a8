"""What a trainer and its selector must agree on: the base model and the LoRA adapter on it.

The selector scores samples with the model the trainers train; a trainer with another alpha,
other target modules or another base would train on coresets chosen for a different model. The
settings are described once, here, for every side:

- the selector's ``model`` section (``ModelConfig``) and the model it builds from it;
- ``colm-train``'s flags (``add_model_arguments``) and the model it builds from them;
- the launchers' trainer command lines (``model_arguments``, used by ``jobs.trainer_args``).

A trainer sends ``settings()`` of its model in ``Join.expected``; the selector compares them with
``settings()`` of its own and refuses a join that differs (``mismatches``), naming the key and both
values. Both are read off the built peft model, so an adapter folder's own r/alpha/targets count,
and ``lora_targets: null`` means the attention projections on both sides. ``model.source`` is
compared as written: the trainer's ``--model`` must name the model the way the selector's
``model.source`` does (``tiny:llama``, ``smollm2``, or the same folder or .gguf path).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

from colm_server.config import ModelConfig
from colm_server.service.quote import clip, quote

# The settings a trainer's model must share with the selector's, as Join.expected's keys.
KEYS = ("model.source", "model.num_layers", "model.lora_r", "model.lora_alpha", "model.lora_dropout",
        "model.lora_targets")
MAX_REPORTED = 4  # mismatches one refusal spells out; the rest are counted

_DEFAULTS = ModelConfig()


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


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--num-layers`` and the LoRA flags of ``colm-train``: the ``model`` keys it shares."""
    d = _DEFAULTS
    parser.add_argument("--model", required=True, help="the selector's model.source, written the same way: "
                        "tiny:<arch>, smollm2, a HF folder or a .gguf")
    parser.add_argument("--num-layers", type=int, default=d.num_layers,
                        help="keep only the first n decoder layers, as model.num_layers (default: all)")
    parser.add_argument("--lora-r", type=int, default=d.lora_r, help="LoRA rank, as model.lora_r")
    parser.add_argument("--lora-alpha", type=float, default=d.lora_alpha,
                        help="LoRA alpha (scale = alpha / r), as model.lora_alpha")
    parser.add_argument("--lora-dropout", type=float, default=d.lora_dropout,
                        help="dropout on the LoRA input, as model.lora_dropout")
    parser.add_argument("--lora-targets", nargs="+", default=d.lora_targets,
                        help="module names, as model.lora_targets (default: the attention projections)")


def model_arguments(model: ModelConfig) -> list[str]:
    """The ``colm-train`` flags of ``add_model_arguments`` that give a trainer ``model``'s settings."""
    args = [f"--model={model.source}", "--lora-r", str(model.lora_r), "--lora-alpha", repr(model.lora_alpha),
            "--lora-dropout", repr(model.lora_dropout)]
    if model.num_layers is not None:
        args += ["--num-layers", str(model.num_layers)]
    if model.lora_targets is not None:
        args += ["--lora-targets", *model.lora_targets]
    return args
