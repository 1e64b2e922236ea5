"""Decode steps of a CPU grouped-query SDPA call get a mask, so SDPA packs the query heads (decode_masks.py).

The point is speed (``bench_decode``); the tests check the path taken, that it is taken only where it
helps, that the flag never outlives its call, and that the output stays that of generate() without a cache.
"""

from __future__ import annotations

import pytest
import torch
from support.exact import assert_same_output, greedy
from support.models import random_ids, tiny_model
from transformers import CompileConfig, StoppingCriteria, StoppingCriteriaList

from hf_prefix_cache import PrefixCache, decode_masks
from hf_prefix_cache.compat import CACHE_KWARG


class SdpaCalls:
    """Records (query shape, whether a mask came, enable_gqa) of every SDPA call transformers makes."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[tuple[int, ...], bool, bool]] = []
        original = torch.nn.functional.scaled_dot_product_attention

        def spy(query, key, value, attn_mask=None, **kwargs):
            self.calls.append((tuple(query.shape), attn_mask is not None, bool(kwargs.get("enable_gqa"))))
            return original(query, key, value, attn_mask=attn_mask, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)


class FlagPerStep(StoppingCriteria):
    """What the cache reports as ``is_compileable`` at every generated token."""

    def __init__(self, cache):
        self.cache, self.seen = cache, []

    def __call__(self, input_ids, scores, **kwargs):
        self.seen.append(self.cache.is_compileable)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def store_prefix(model, cache) -> list[int]:
    prefix = random_ids(29, seed=3)[0].tolist()
    greedy(model, torch.tensor([[*prefix, 5]]), max_new_tokens=2, **{CACHE_KWARG: cache})
    return prefix


def warm_call(model, cache, prefix, new_tokens=6, **kwargs):
    prompt = torch.tensor([[*prefix, 7, 9]])
    flags = FlagPerStep(cache)
    out = greedy(
        model,
        prompt,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        stopping_criteria=StoppingCriteriaList([flags]),
        **kwargs,
        **{CACHE_KWARG: cache},
    )
    assert cache.last_call.hit_tokens > 0
    return prompt, out, flags.seen


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_cpu_grouped_query_decode_steps_take_the_packed_masked_path_and_stay_exact(family, monkeypatch):
    """From ``MIN_CONTEXT_TOKENS`` cached tokens on (here 33: the prompt is 31), not before."""
    monkeypatch.setattr(decode_masks, "MIN_CONTEXT_TOKENS", 33)
    model = tiny_model(family)
    config = model.config
    heads, kv_heads, layers = config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers
    assert heads > kv_heads
    cache = PrefixCache(model, block_size=4, num_blocks=64)
    assert cache.is_compileable is False
    prefix = store_prefix(model, cache)
    sdpa = SdpaCalls(monkeypatch)
    prompt, out, flags = warm_call(model, cache, prefix)
    assert prompt.shape[1] == 31
    assert flags == [False, False, True, True, True, True]  # read after each step: 31, 32, 33, ... cached
    assert cache.is_compileable is False, "the flag outlived its call"
    assert len(sdpa.calls) == 6 * layers  # a prefill and five decode steps, in layer order
    # sliding layers (gemma3) get a mask for the window anyway; the full-attention ones are the point
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * layers
    full = [i for i, kind in enumerate(kinds) if kind == "full_attention"]
    steps = [[sdpa.calls[step * layers + i] for i in full] for step in range(1, 6)]
    plain = ((1, heads, 1, config.head_dim), False, True)  # no mask, enable_gqa: transformers' default
    packed = ((1, kv_heads, heads // kv_heads, config.head_dim), True, False)  # pack_gqa with a mask
    assert steps == [[plain] * len(full)] * 2 + [[packed] * len(full)] * 3, steps  # over 31, 32 | 33-35
    monkeypatch.undo()
    assert_same_output(greedy(model, prompt, max_new_tokens=6, min_new_tokens=6), out)


@pytest.mark.parametrize(
    "case",
    ["eager", "no_grouped_queries", "gpt2", "compile_config"],
)
def test_decode_masks_stay_off_where_they_do_not_help(case, monkeypatch):
    """Eager attention and models without grouped queries gain nothing from the mask; with a
    compile_config a cache reporting is_compileable would have generate() compile the forward."""
    monkeypatch.setattr(decode_masks, "MIN_CONTEXT_TOKENS", 0)
    family = {"no_grouped_queries": "phi3", "gpt2": "gpt2"}.get(case, "llama")
    model = tiny_model(family, attn="eager" if case == "eager" else "sdpa")
    cache = PrefixCache(model, block_size=4, num_blocks=64)
    extra = {"compile_config": CompileConfig()} if case == "compile_config" else {}
    prompt, out, flags = warm_call(model, cache, store_prefix(model, cache), **extra)
    assert flags == [False] * 6
    assert_same_output(greedy(model, prompt, max_new_tokens=6, min_new_tokens=6), out)


def test_beam_search_with_decode_masks_matches_no_cache(monkeypatch):
    """Beams reorder the cache rows between masked steps."""
    monkeypatch.setattr(decode_masks, "MIN_CONTEXT_TOKENS", 0)
    model = tiny_model("llama")
    cache = PrefixCache(model, block_size=4, num_blocks=64)
    beams = dict(num_beams=3, num_return_sequences=2)
    prompt, out, flags = warm_call(model, cache, store_prefix(model, cache), **beams)
    assert flags == [True] * 6
    assert_same_output(greedy(model, prompt, max_new_tokens=6, min_new_tokens=6, **beams), out)
