"""The ``colm-train`` flags that carry the selector's ``model`` settings, both ways.

``add_model_arguments`` gives ``colm-train`` the keys of ``colm_wire.contract.KEYS`` as flags, with the
selector's defaults; ``model_arguments`` writes a ``ModelConfig`` back as those flags for the launchers.
"""

from __future__ import annotations

import argparse

from colm_server.config import ModelConfig

_DEFAULTS = ModelConfig()


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
