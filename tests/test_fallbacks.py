"""The README's fallbacks not covered elsewhere: other generation modes, encoder-decoders and multimodal
models recompute everything, say so once, and give exactly what generate() gives without a cache."""

from __future__ import annotations

import warnings

import pytest
import torch
from support.assertions import assert_exact
from support.calls import GEN, compare
from support.models import DECODER, EOS, PAD, model_for, random_ids
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
)

from hf_prefix_cache import PrefixCache, PrefixCacheFallbackWarning

# one intra-op thread and no deprecation noise (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("quiet_single_thread")

GREEDY = dict(do_sample=False, max_new_tokens=6)
IMAGE_TOKEN = 95


def fallback_warnings(records) -> list[str]:
    return [str(w.message) for w in records if issubclass(w.category, PrefixCacheFallbackWarning)]


class DecodingLoop:
    """Stands in for the Hub code of a deprecated mode (offline): greedy decoding, and a record of whether
    generate() handed it the PrefixCache (it must not: the mode falls back)."""

    def __init__(self):
        self.saw_prefix_cache: list[bool] = []

    def __call__(
        self, model, input_ids, logits_processor, stopping_criteria, generation_config, *args, **kwargs
    ):
        self.saw_prefix_cache.append(any(isinstance(v, PrefixCache) for v in kwargs.values()))
        return type(model)._sample(
            model, input_ids, logits_processor, stopping_criteria, generation_config, *args, **kwargs
        )


@pytest.mark.parametrize(
    ("mode", "kwargs"),
    [
        ("contrastive_search", dict(penalty_alpha=0.6, top_k=4)),
        ("dola_generation", dict(dola_layers="low")),
        ("group_beam_search", dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0)),
    ],
    ids=["contrastive_search", "dola_generation", "group_beam_search"],
)
def test_other_generation_modes_fall_back_with_one_warning(mode, kwargs):
    model = model_for("llama")
    loop = DecodingLoop()
    prompt = random_ids(30, 1)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        cache = PrefixCache(model, block_size=4, num_blocks=64)
        model.generate(prompt, cache=cache, **GREEDY)  # a supported call stores the prompt
        for _ in range(2):
            outcome = compare(model, cache, prompt, custom_generate=loop, **GREEDY, **kwargs)
            assert_exact(outcome.ref, outcome.out)
            assert outcome.forwards[0] == 30  # the whole prompt was recomputed, although it is stored
    messages = fallback_warnings(records)
    assert len(messages) == 1 and mode in messages[0], messages
    assert loop.saw_prefix_cache == [False] * 4
    assert cache.stats.calls == 1 and cache.store.pool.num_referenced == 0
    again = compare(model, cache, prompt, **GREEDY)  # the same cache still reuses in greedy calls
    assert_exact(again.ref, again.out)
    assert again.hit_tokens == 28


def _t5():
    config = T5Config(
        vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS,
    )  # fmt: skip
    return T5ForConditionalGeneration(config)


def _bart():
    config = BartConfig(
        vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS, decoder_start_token_id=EOS,
    )  # fmt: skip
    return BartForConditionalGeneration(config)


def _llava():
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
        patch_size=8, projection_dim=32,
    )  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**DECODER), image_token_id=IMAGE_TOKEN)
    return LlavaForConditionalGeneration(config)


@pytest.mark.parametrize(
    ("build", "reason"),
    [(_t5, "encoder-decoder"), (_bart, "encoder-decoder"), (_llava, "multimodal")],
    ids=["t5", "bart", "llava"],
)
def test_encoder_decoders_and_multimodal_models_fall_back_up_front(build, reason):
    torch.manual_seed(0)
    model = build().eval()
    inputs = {"input_ids": random_ids(24, 2)}
    if build is _llava:  # 4 image tokens (2x2 patches of 8 pixels) inside the text
        image = torch.full((1, 4), IMAGE_TOKEN)
        inputs = {"input_ids": torch.cat([random_ids(3, 3), image, random_ids(20, 4)], dim=1)}
        inputs["pixel_values"] = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        cache = PrefixCache(model, block_size=4, num_blocks=64)
        assert cache.store is None and reason in cache.fallback and cache.stats.fallback == cache.fallback
        ref = model.generate(**inputs, **GREEDY, **GEN)
        for _ in range(2):
            out = model.generate(**inputs, cache=cache, **GREEDY, **GEN)
            assert_exact(ref, out)
            assert cache.last_call.hit_tokens == 0 and cache.get_seq_length() == 0
    messages = fallback_warnings(records)
    assert len(messages) == 1 and reason in messages[0], messages


def test_a_custom_decoding_loop_falls_back_even_in_greedy_mode():
    """A callable ``custom_generate`` replaces generate()'s loop: the cache cannot know how it uses the
    K/V, so the call recomputes without it, exactly, and says so once."""
    model = model_for("llama")
    loop = DecodingLoop()
    prompt = random_ids(30, 2)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        cache = PrefixCache(model, block_size=4, num_blocks=64)
        model.generate(prompt, cache=cache, **GREEDY)  # a supported call stores the prompt
        for _ in range(2):
            outcome = compare(model, cache, prompt, custom_generate=loop, **GREEDY)
            assert_exact(outcome.ref, outcome.out)
            assert outcome.forwards[0] == 30  # the whole prompt was recomputed, although it is stored
    messages = fallback_warnings(records)
    assert len(messages) == 1 and "custom_generate" in messages[0], messages
    assert loop.saw_prefix_cache == [False] * 4
    assert cache.stats.calls == 1 and cache.store.pool.num_referenced == 0
