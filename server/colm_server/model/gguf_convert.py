"""Dequantise a GGUF file into a Hugging Face folder (model + tokenizer), as a process of its own.

``gguf_cache`` runs this module with ``python -m`` rather than calling it: a fresh interpreter never
has torch.distributed initialised, and transformers' ``save_pretrained`` writes weights on rank 0
only when it is, so a conversion asked for by any other rank would come out without them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig


def convert(gguf: Path, dest: Path) -> None:
    """Write ``gguf`` dequantised to float32, with its tokenizer, into the existing folder ``dest``."""
    gguf = gguf.resolve()
    # dequantize=True: plain dense weights that LoRA, probes and save_pretrained all accept.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
        local_files_only=True,
    )
    model.save_pretrained(dest)
    del model
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    tokenizer.save_pretrained(dest)


def main(argv: list[str] | None = None) -> None:
    """``python -m colm_server.model.gguf_convert GGUF DEST``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        raise SystemExit("usage: python -m colm_server.model.gguf_convert GGUF DEST")
    convert(Path(args[0]), Path(args[1]))


if __name__ == "__main__":
    main()
