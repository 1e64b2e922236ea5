"""The real SmolLM2-135M-Instruct: a two-turn chat sharing a system prompt, with and without the cache."""

from __future__ import annotations

import pytest
import torch

from hf_prefix_cache import PrefixCache
from hf_prefix_cache.compat import CACHE_KWARG
from hf_prefix_cache_eval.data import default_system_prompt
from hf_prefix_cache_eval.models import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2")


def chat(tokenizer, messages):
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )


def test_two_turn_chat_is_identical_and_reuses_the_history(smollm2):
    model, tokenizer = smollm2
    cache = PrefixCache(model, max_memory="256MiB")
    messages = [
        {"role": "system", "content": default_system_prompt()},
        {
            "role": "user",
            "content": "My Aurora X2 speaker keeps disconnecting from Wi-Fi. What should I try?",
        },
    ]
    stored: list[
        int
    ] = []  # what the cache holds: each call's prompt + reply tokens that went through the model
    hits = []
    for _ in range(2):
        inputs = chat(tokenizer, messages)
        settings = dict(max_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True)
        plain = model.generate(**inputs, **settings)
        cached = model.generate(**inputs, **settings, **{CACHE_KWARG: cache})
        assert torch.equal(plain.sequences, cached.sequences)
        worst = max((a - b).abs().max().item() for a, b in zip(plain.logits, cached.logits))
        assert worst < 1e-3, worst
        prompt = inputs["input_ids"][0].tolist()
        hits.append((cache.last_call.hit_tokens, expected_hit(stored, prompt, cache.block_size), len(prompt)))
        stored = cached.sequences[0, :-1].tolist()  # the last generated token is never fed to the model
        reply = tokenizer.decode(cached.sequences[0, len(prompt) :], skip_special_tokens=True)
        messages += [
            {"role": "assistant", "content": reply},
            {"role": "user", "content": "And if that fails?"},
        ]
    (first_hit, _, first_len), (second_hit, expected, _) = hits
    assert first_hit == 0
    # turn 2 reuses the whole first turn, its generated reply included, up to the last full shared block
    assert second_hit == expected, hits
    assert second_hit > first_len // cache.block_size * cache.block_size, "the reply's blocks were not reused"
    assert cache.store.pool.num_referenced == 0


def expected_hit(stored: list[int], prompt: list[int], block: int) -> int:
    """Full blocks of ``prompt`` that ``stored`` already holds, never the last prompt token."""
    common = next(
        (i for i, (a, b) in enumerate(zip(stored, prompt)) if a != b), min(len(stored), len(prompt))
    )
    return min(common, len(prompt) - 1) // block * block
