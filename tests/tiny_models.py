"""Tiny random models built from config, with weights large enough that outputs depend on context."""

from __future__ import annotations

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


def tiny_config(family: str, sliding_window: int = 8):
    if family == "llama":
        return LlamaConfig(**DECODER)
    if family == "qwen2":
        return Qwen2Config(**DECODER)
    if family == "qwen3":
        return Qwen3Config(head_dim=16, **DECODER)
    if family == "mistral":
        return MistralConfig(sliding_window=sliding_window, **DECODER)
    if family == "phi3":
        return Phi3Config(**{**DECODER, "num_key_value_heads": 4})
    if family == "gemma3":
        # query_pre_attn_scalar = head_dim, as in released Gemma 3 checkpoints. The config's default (256)
        # scaled this tiny model's attention scores down 4x, so attention was nearly uniform and bf16
        # logits barely moved when the stored keys were corrupted (issue 13, item 6).
        return Gemma3TextConfig(
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=sliding_window,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            **{**DECODER, "num_hidden_layers": 3},
        )
    if family == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=1024, **COMMON)
    raise ValueError(family)


def tiny_model(
    family: str = "llama", dtype: torch.dtype = torch.float32, attn: str = "sdpa", seed: int = 0, **kw
):
    torch.manual_seed(seed)
    config = tiny_config(family, **kw)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval()


def random_ids(length: int, seed: int, low: int = 3) -> torch.Tensor:
    """``[1, length]`` token ids that avoid BOS/EOS/PAD."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB, (1, length), generator=generator)
