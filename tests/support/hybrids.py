"""Tiny random hybrid models (linear attention, Mamba2, short convolution beside attention layers), one
config per family, each with at least one attention layer: what ``checkpoints.py`` serves, and Jamba,
which it refuses."""

from __future__ import annotations

import functools

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from support.models import COMMON

BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
GDN = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8)
MAMBA2 = dict(
    mamba_n_heads=4, mamba_d_head=32, mamba_d_state=8, mamba_n_groups=1, mamba_d_conv=4, mamba_chunk_size=16
)
LINEAR_FULL_LINEAR = ["linear_attention", "full_attention", "linear_attention"]
FAMILIES = {
    "qwen3_5_text": dict(head_dim=16, num_hidden_layers=3, layer_types=LINEAR_FULL_LINEAR, **GDN),
    "qwen3_next": dict(
        head_dim=16,
        num_hidden_layers=3,
        layer_types=LINEAR_FULL_LINEAR,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        **GDN,
    ),
    "olmo_hybrid": dict(num_hidden_layers=3, layer_types=LINEAR_FULL_LINEAR, **GDN),
    "nemotron_h": dict(
        num_hidden_layers=3,
        hybrid_override_pattern="M*-",
        mamba_num_heads=4,
        mamba_head_dim=16,
        ssm_state_size=8,
        n_groups=1,
        conv_kernel=4,
        head_dim=16,
        chunk_size=16,
    ),
    "granitemoehybrid": dict(
        num_hidden_layers=3,
        layer_types=["mamba", "attention", "mamba"],
        mamba_n_heads=4,
        mamba_d_head=32,
        mamba_d_state=8,
        mamba_n_groups=1,
        mamba_d_conv=4,
        mamba_chunk_size=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        shared_intermediate_size=64,
    ),
    "falcon_h1": dict(num_hidden_layers=2, head_dim=16, mamba_d_ssm=128, **MAMBA2),
    "bamba": dict(num_hidden_layers=3, attn_layer_indices=[1], **MAMBA2),
    "lfm2": dict(num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"], conv_L_cache=3),
    "zamba2": dict(
        num_hidden_layers=3,
        layers_block_type=["mamba", "hybrid", "mamba"],
        mamba_d_state=8,
        mamba_headdim=16,
        n_mamba_heads=8,
        mamba_ngroups=1,
        mamba_d_conv=4,
        chunk_size=16,
        attention_head_dim=16,
    ),
}
REFUSED = {
    # Mamba1: its selective scan takes no initial state, so a restored state is ignored
    "jamba": dict(
        num_hidden_layers=2,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        num_experts=2,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_expand=2,
    ),
}


def hybrid_config(family: str):
    fields = FAMILIES.get(family) or REFUSED[family]
    return CONFIG_MAPPING[family](**{**COMMON, **BASE, **fields})


def hybrid_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A fresh tiny model of ``family``; the weights depend only on the family and ``seed``."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(hybrid_config(family)).to(dtype).eval()


@functools.cache
def shared_hybrid(family: str):
    """The same model, memoised: tests that do not mutate it share it."""
    return hybrid_model(family)
