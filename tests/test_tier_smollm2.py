"""The real SmolLM2-135M-Instruct with host and disk tiers: a two-turn chat whose second turn is served
from host RAM, then from the disk folder by a new cache (a restart), identical to no cache each time."""

from __future__ import annotations

import pytest
import torch

from hf_prefix_cache import PrefixCache
from hf_prefix_cache_eval.data import default_system_prompt
from hf_prefix_cache_eval.models import load_model

pytestmark = pytest.mark.slow


def test_host_and_disk_hits_on_smollm2_are_identical(tmp_path):
    model, tokenizer = load_model("smollm2")
    messages = [
        {"role": "system", "content": default_system_prompt()},
        {
            "role": "user",
            "content": "My Aurora X2 speaker keeps disconnecting from Wi-Fi. What should I try?",
        },
    ]
    settings = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)

    def both(cache, inputs):
        plain = model.generate(**inputs, **settings)
        cached = model.generate(**inputs, **settings, cache=cache)
        assert torch.equal(plain.sequences, cached.sequences)
        worst = max((a - b).abs().max().item() for a, b in zip(plain.logits, cached.logits))
        assert worst < 1e-3, worst
        return cached

    cache = PrefixCache(model, max_memory="256MiB", host_memory="256MiB", disk=tmp_path / "kv")
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    first = both(cache, inputs)
    reply = tokenizer.decode(first.sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And if that fails?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )

    cache.store.tiers.spill_device()  # the pool forgets: the host tier serves the history
    both(cache, inputs)
    assert cache.last_call.hit_tokens_by_tier.get("host", 0) > 0.8 * cache.last_call.prompt_tokens
    assert cache.flush(60)

    restarted = PrefixCache(model, max_memory="256MiB", disk=tmp_path / "kv")  # a new process would do this
    both(restarted, inputs)
    assert restarted.last_call.hit_tokens_by_tier == {"disk": restarted.last_call.hit_tokens}
    assert restarted.last_call.hit_tokens > 0.8 * restarted.last_call.prompt_tokens
    assert cache.stats.tier_errors == restarted.stats.tier_errors == 0
