"""Which models the block store can serve exactly, decided before any call.

Token blocks hold per-token K/V computed causally at fixed positions. Models whose K/V or attention do
not fit that picture get plain recomputation instead of garbage: recurrent / linear-attention state,
bidirectional prompt attention, RoPE whose frequencies depend on the current length, encoder-decoders.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

SERVABLE_LAYER_TYPES = {"full_attention", "sliding_attention"}
LENGTH_DEPENDENT_ROPE = {"dynamic", "longrope"}


def unsupported_reason(model: Any) -> str | None:
    """Why prefix reuse would not be exact for ``model``, or None when it is supported."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    if hasattr(config, "vision_config") or hasattr(config, "audio_config"):
        return "multimodal models are not supported (media tokens may attend bidirectionally)"
    text = config.get_text_config(decoder=True)
    if getattr(text, "use_bidirectional_attention", False):
        return "the model attends bidirectionally over the prompt (use_bidirectional_attention)"
    for layer_type in getattr(text, "layer_types", None) or ():
        if layer_type not in SERVABLE_LAYER_TYPES:
            return f"layer type {layer_type!r} keeps state that token blocks cannot reproduce"
    for rope_type in _rope_types(text):
        if rope_type in LENGTH_DEPENDENT_ROPE:
            return f"RoPE type {rope_type!r} depends on the current sequence length"
    return None


def _rope_types(config: Any) -> Iterator[str]:
    for name in ("rope_parameters", "rope_scaling"):
        yield from _find_rope_types(getattr(config, name, None))


def _find_rope_types(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("rope_type", "type") and isinstance(item, str):
                yield item
            else:
                yield from _find_rope_types(item)
