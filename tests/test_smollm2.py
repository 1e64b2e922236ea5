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
    hit_rates = []
    for _ in range(2):
        inputs = chat(tokenizer, messages)
        settings = dict(max_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True)
        plain = model.generate(**inputs, **settings)
        cached = model.generate(**inputs, **settings, **{CACHE_KWARG: cache})
        assert torch.equal(plain.sequences, cached.sequences)
        worst = max((a - b).abs().max().item() for a, b in zip(plain.logits, cached.logits))
        assert worst < 1e-3, worst
        hit_rates.append(cache.last_call.hit_rate)
        reply = tokenizer.decode(
            cached.sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        messages += [
            {"role": "assistant", "content": reply},
            {"role": "user", "content": "And if that fails?"},
        ]
    assert hit_rates[0] == 0.0
    assert hit_rates[1] > 0.8, hit_rates
    assert cache.store.pool.num_referenced == 0
