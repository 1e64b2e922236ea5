"""Whether a call's decode steps should get an explicit attention mask, as ``StaticCache``'s do.

For a one-token step without padding transformers drops the mask, and its SDPA integration then runs
grouped-query attention with ``enable_gqa``. On CPU that kernel reads every K/V head once per query head
(3x for SmolLM2's 9 query / 3 K/V heads): at 8k tokens of context it cost ~1.3 ms more per layer and step
than the ``pack_gqa`` path (query heads packed onto their K/V head, each K/V head read once), which
transformers takes only when a mask is present. It builds one for a single-query step only when the cache
reports ``is_compileable``. So a ``PrefixCache`` reports it during such a call, and only then: it is never
compiled (generate() compiles on CPU only when asked to with ``compile_config``, and then the mask is left
off). On CUDA the mask-free ``enable_gqa`` path is the fast one, so nothing changes there.

The packed path has fewer work items (one per K/V head instead of one per query head), so while a short
context's K/V still come from the CPU caches it is the slower one. On a 2-core AVX2 EPYC (32 MiB L3),
SmolLM2 decode steps with / without the mask, alternating within one call (``bench_decode --sections
masks``, two runs): 1.01 / 1.01 at 1k tokens of context, 1.03 / 1.01 at 2k, 1.02 / 1.00 at 3k, 1.02 /
1.00 at 4k, 0.95 / 0.90 at 6k, 0.87 / 0.85 at 8k. Steps below ``MIN_CONTEXT_TOKENS`` therefore keep
transformers' default.
"""

from __future__ import annotations

import torch

MIN_CONTEXT_TOKENS = 4096


def wants_decode_masks(model: torch.nn.Module, device_types: set[str]) -> bool:
    """True for an SDPA model with grouped-query attention whose K/V all live on the CPU."""
    config = model.config
    text = config.get_text_config(decoder=True)
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None)
    return (
        getattr(config, "_attn_implementation", None) == "sdpa"
        and isinstance(heads, int)
        and isinstance(kv_heads, int)
        and 0 < kv_heads < heads
        and device_types == {"cpu"}
    )


def long_enough(context_tokens: int) -> bool:
    """Whether a step over ``context_tokens`` cached tokens reads enough K/V for the packed path to win."""
    return context_tokens >= MIN_CONTEXT_TOKENS
