"""Small random models and a character tokenizer, built in code for offline tests and demos.

Nothing here touches the disk or the network: the tokenizer is assembled with the
``tokenizers`` library and the models are random initialisations of real Hugging Face
architectures, so code paths (attention, rotary embeddings, GQA, LoRA targets) are the
ones a pretrained checkpoint of the same family takes.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, processors
from transformers import (
    AutoModelForCausalLM,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PhiConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0..3, in this order
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
CHARACTERS = "".join(chr(c) for c in range(32, 127)) + "\n\t"

# Role markers are plain characters, so the template needs no extra vocabulary.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

TINY_ARCHS = ("llama", "qwen2", "mistral", "gpt_neox", "phi")
_CONFIGS = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "mistral": MistralConfig,
    "gpt_neox": GPTNeoXConfig,
    "phi": PhiConfig,
}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A deterministic character-level tokenizer (printable ASCII, newline, tab) with a chat template.

    ``add_special_tokens=True`` prepends ``<s>``; ``</s>`` is EOS and ``<pad>`` the pad token.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARACTERS:
        vocab[ch] = len(vocab)
    # BPE without merges and without a pre-tokenizer splits any text into single characters.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, BOS_ID)]
    )
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
    )


def tiny_config(
    arch: str, vocab_size: int, num_layers: int = 2, hidden: int = 64
) -> PretrainedConfig:
    """A small config of ``arch`` (one of ``TINY_ARCHS``): 4 heads, 2 KV heads where GQA exists."""
    if arch not in _CONFIGS:
        raise ValueError(f"arch: unknown tiny architecture {arch!r}; expected one of {TINY_ARCHS}")
    if hidden % 4 or hidden < 8:
        raise ValueError(f"hidden: must be a multiple of 4 and >= 8, got {hidden}")
    if num_layers < 1:
        raise ValueError(f"num_layers: must be >= 1, got {num_layers}")
    common = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
    }
    if arch != "gpt_neox":  # GPT-NeoX has no grouped-query attention
        common["num_key_value_heads"] = 2
    config = _CONFIGS[arch](**common)
    config._attn_implementation = "sdpa"  # supported by all five families in transformers 5
    return config


def tiny_model(
    arch: str = "llama", seed: int = 0, num_layers: int = 2, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """A random ``arch`` causal LM sized for ``build_tokenizer()``, the same for the same seed."""
    config = tiny_config(arch, vocab_size=len(build_tokenizer()), num_layers=num_layers)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
