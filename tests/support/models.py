"""The one tiny-model factory of the tests: random models built from config, with weights large enough
that outputs depend on context, and a character-level tokenizer over their vocabulary (no download).

``tiny_model`` makes a fresh model (a test may mutate it); ``model_for`` is the same factory memoised, a
shared model that no test mutates (each test makes its own PrefixCache). Same arguments, same weights.
"""

from __future__ import annotations

import functools

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 96
BOS, EOS, PAD = 1, 2, 0
COMMON = dict(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, initializer_range=0.1)
DECODER = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    **COMMON,
)
VARIANTS = {
    # Qwen2/Qwen3/Phi3 with their sliding window on: layer 0 full, layer 1 sliding (Phi3: all sliding).
    "qwen2-sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "qwen3-sliding": ("qwen3", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "phi3-sliding": ("phi3", dict(sliding_window=8)),
}


def tiny_config(family: str, sliding_window: int = 8, **fields):
    """The config of ``family``; ``fields`` replace DECODER's (e.g. ``vocab_size`` for another tokenizer)."""
    decoder = {**DECODER, **fields}
    if family == "llama":
        return LlamaConfig(**decoder)
    if family == "qwen2":
        return Qwen2Config(**decoder)
    if family == "qwen3":
        return Qwen3Config(head_dim=16, **decoder)
    if family == "mistral":
        return MistralConfig(sliding_window=sliding_window, **decoder)
    if family == "phi3":
        return Phi3Config(**{**decoder, "num_key_value_heads": 4})
    if family == "gemma3":
        # query_pre_attn_scalar = head_dim, as in released Gemma 3 checkpoints. The config's default (256)
        # scaled this tiny model's attention scores down 4x, so attention was nearly uniform and bf16
        # logits barely moved when the stored keys were corrupted (issue 13, item 6).
        return Gemma3TextConfig(
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=sliding_window,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            **{**decoder, "num_hidden_layers": 3},
        )
    if family == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=1024, **{**COMMON, **fields})
    raise ValueError(family)


def tiny_model(
    name: str = "llama", dtype: torch.dtype = torch.float32, attn: str = "sdpa", seed: int = 0, **fields
):
    """A fresh tiny model: ``name`` is a family of ``tiny_config`` or one of ``VARIANTS``; the weights
    depend only on the config and ``seed``. ``fields`` go to ``tiny_config``."""
    family, overrides = VARIANTS.get(name, (name, {}))
    torch.manual_seed(seed)
    config = tiny_config(family, **fields)
    for key, value in overrides.items():
        setattr(config, key, value)
    if overrides:
        config = type(config)(**config.to_dict())  # recompute derived fields such as layer_types
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval()


# A shared tiny model (never mutated by the tests; each test makes its own PrefixCache).
model_for = functools.cache(tiny_model)


def random_ids(length: int, seed: int, low: int = 3) -> torch.Tensor:
    """``[1, length]`` token ids that avoid BOS/EOS/PAD."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB, (1, length), generator=generator)


# -- a tiny offline tokenizer ------------------------------------------------------------------------------
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>a:{% endif %}"
)


def char_tokenizer():
    """A character-level fast tokenizer over the tiny models' 96 ids: <pad>=0, <s>=1, </s>=2, then 93
    characters (newline and printable ASCII but ` ~ ^), with a small chat template. No download."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 127) if chr(c) not in "`~^"]
    vocab = {"<pad>": PAD, "<s>": 1, "</s>": 2} | {c: i + 3 for i, c in enumerate(chars)}
    assert len(vocab) == 96
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
