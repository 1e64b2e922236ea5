"""PEFT/LoRA adapters: switching, disabling or merging adapters changes K/V without changing a parameter,
so the namespace carries the adapter state; every call is exact and hits stay within one adapter state."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from exact import assert_same_output, greedy
from tiny_models import random_ids, tiny_model

from hf_prefix_cache import PrefixCache
from hf_prefix_cache.compat import CACHE_KWARG

BLOCK = 4
HIT = 28  # a 30-token prompt seen before loads 7 blocks of 4


def lora_model(task_type: str | None = "CAUSAL_LM"):
    """A tiny Llama with LoRA adapters "a" and "b" on q/k/v, with nonzero random weights (not a no-op)."""
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)
    base = tiny_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(5)
        model = peft.get_peft_model(base, peft.LoraConfig(task_type=task_type, **config), adapter_name="a")
        torch.manual_seed(6)
        model.add_adapter("b", peft.LoraConfig(task_type=task_type, **config))
    return model.eval(), base


def check(model, cache, prompt, hit: int | None):
    expected = greedy(model, prompt)
    actual = greedy(model, prompt, **{CACHE_KWARG: cache})
    assert_same_output(expected, actual)
    assert hit is None or cache.last_call.hit_tokens == hit
    assert cache.store.pool.num_referenced == 0
    return actual


@pytest.mark.parametrize("wrap", ["peft_model", "base_model", "both"])
def test_switching_adapters_is_exact_and_hits_stay_within_an_adapter(wrap):
    model, base = lora_model()
    if wrap == "both":  # PeftModel.generate calls the base model's: the inner wrapper must pass through
        PrefixCache(base, block_size=BLOCK, num_blocks=8)
    cache = PrefixCache(base if wrap == "base_model" else model, block_size=BLOCK, num_blocks=128)
    prompt = random_ids(30, seed=1)
    outputs = {}
    for adapter, hit in [("a", 0), ("b", 0), ("a", HIT), ("b", HIT)]:
        model.set_adapter(adapter)
        outputs[adapter] = check(model, cache, prompt, hit)
    assert not torch.equal(outputs["a"].sequences, outputs["b"].sequences)  # the adapters matter here


def test_disabled_adapters_are_their_own_namespace():
    model, _ = lora_model()
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128)
    prompt = random_ids(30, seed=2)
    model.set_adapter("a")
    check(model, cache, prompt, 0)
    with model.disable_adapter():
        check(model, cache, prompt, 0)
        check(model, cache, prompt, HIT)
    check(model, cache, prompt, HIT)


def test_a_merged_adapter_is_exact_and_does_not_hit_unmerged_blocks():
    model, _ = lora_model()
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128)
    prompt = random_ids(30, seed=3)
    model.set_adapter("b")
    check(model, cache, prompt, 0)
    model.merge_adapter()
    check(model, cache, prompt, 0)
    check(model, cache, prompt, HIT)
    model.unmerge_adapter()  # base weights come back only up to rounding: a hit or a miss, but exact
    check(model, cache, prompt, None)


def test_changed_adapter_weights_start_a_new_namespace():
    model, _ = lora_model(task_type=None)  # a plain PeftModel (no generate of its own) works the same
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128)
    prompt = random_ids(30, seed=4)
    model.set_adapter("a")
    check(model, cache, prompt, 0)
    lora_b = model.base_model.model.model.layers[0].self_attn.k_proj.lora_B["a"].weight
    with torch.no_grad():
        lora_b.mul_(2.0)
    check(model, cache, prompt, 0)


def test_negative_control_without_the_adapter_namespace_adapter_b_gets_a_s_kv(monkeypatch):
    """The check can fail: with the adapter suffix switched off, b hits a's blocks and differs."""
    import hf_prefix_cache.cache as cache_module

    monkeypatch.setattr(cache_module, "adapter_namespace", lambda model: "")
    model, _ = lora_model()
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128)
    prompt = random_ids(30, seed=1)
    model.set_adapter("a")
    greedy(model, prompt, **{CACHE_KWARG: cache})
    model.set_adapter("b")
    with pytest.raises(AssertionError):
        check(model, cache, prompt, HIT)
