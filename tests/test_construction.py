"""Constructing a PrefixCache runs no forward pass: the K/V layout is read from the config and confirmed by
the first call's own K/V (a wrong prediction is replaced by a probe's answer before anything is stored).
Where the layout must be known up front (tiers), the probe forward runs once per model object and again
whenever the model changed in a way that could change its layout; reusing it never serves a stale one."""

from __future__ import annotations

import dataclasses
import gc
import warnings
import weakref

import pytest
import torch
from support.exact import assert_same_output, greedy
from support.models import random_ids, tiny_model

from hf_prefix_cache import PrefixCache, PrefixCacheFallbackWarning, construction, parse_bytes
from hf_prefix_cache import call as call_module
from hf_prefix_cache.compat import CACHE_KWARG
from hf_prefix_cache.layout import UnsupportedLayout, run_probe


class ForwardCounter:
    """Counts forward passes of the model's base transformer (the probe runs through it)."""

    def __init__(self, model):
        self.count = 0
        model.base_model.register_forward_pre_hook(self._seen)

    def _seen(self, module, args):
        self.count += 1


FAMILIES = [("llama", {}), ("qwen2", {}), ("gpt2", {}), ("mistral", {"sliding_window": 8}), ("gemma3", {})]


def reuse_twice(model, cache, expect_hit: int = 20):
    """A first call stores a 21-token prompt; a second call must hit its 20 stored tokens, exactly."""
    prefix = random_ids(21, seed=3)[0].tolist()
    first = torch.tensor([[*prefix, 5]])
    assert_same_output(greedy(model, first), greedy(model, first, **{CACHE_KWARG: cache}))
    prompt = torch.tensor([[*prefix, 7, 9]])
    out = greedy(model, prompt, max_new_tokens=6, **{CACHE_KWARG: cache})
    assert cache.last_call.hit_tokens == expect_hit
    assert_same_output(greedy(model, prompt, max_new_tokens=6), out)


@pytest.mark.parametrize(("family", "config"), FAMILIES, ids=[family for family, _ in FAMILIES])
def test_a_new_cache_runs_no_forward_and_its_first_call_confirms_the_predicted_layout(family, config):
    model = tiny_model(family, **config)
    forwards = ForwardCounter(model)
    cache = PrefixCache(model, block_size=4, num_blocks=64)
    assert forwards.count == 0, "constructing a PrefixCache ran a forward pass"
    assert not cache.store.confirmed
    reuse_twice(model, cache)
    assert cache.store.confirmed and cache.store.layouts == run_probe(model)


def test_a_second_cache_on_a_confirmed_model_is_confirmed_without_a_forward():
    model = tiny_model("llama")
    first = PrefixCache(model, block_size=4, num_blocks=32)
    reuse_twice(model, first)
    forwards = ForwardCounter(model)
    second = PrefixCache(model, num_blocks=32, install=False)
    assert forwards.count == 0
    assert second.store.confirmed, "the layout the first cache's call confirmed was not kept for the model"
    assert second.store.layouts == first.store.layouts == run_probe(model)


def test_caches_with_tiers_probe_once_per_unchanged_model():
    model = tiny_model("llama")
    forwards = ForwardCounter(model)
    first = PrefixCache(model, num_blocks=32, host_memory="1MiB", install=False)
    assert forwards.count == 1 and first.store.confirmed, "tier entries need the layout before any call"
    second = PrefixCache(model, num_blocks=32, host_memory="1MiB", install=False)
    assert forwards.count == 1, "the probe forward ran again for an unchanged model"
    assert second.store.layouts == first.store.layouts == run_probe(model)


@pytest.mark.parametrize(
    "budget", [{"num_blocks": 64}, {"max_memory": "256KiB"}], ids=["num_blocks", "max_memory"]
)
@pytest.mark.parametrize("wrong", ["dtype", "head_dim"])
def test_a_wrong_prediction_is_replaced_by_the_probe_before_anything_is_stored(monkeypatch, wrong, budget):
    model = tiny_model("llama")
    truth = run_probe(model)
    lies = {"dtype": {"dtype": torch.bfloat16}, "head_dim": {"head_dim": 2 * truth[0].head_dim}}[wrong]
    monkeypatch.setattr(
        construction, "predict_layout", lambda model: [dataclasses.replace(x, **lies) for x in truth]
    )
    cache = PrefixCache(model, block_size=4, **budget)
    assert cache.store.layouts != truth
    reuse_twice(model, cache)
    assert cache.store.confirmed and cache.store.layouts == truth
    assert cache.stats.refused_calls == 0
    per_block = sum(x.block_bytes(4) for x in truth)
    expected = budget.get("num_blocks") or parse_bytes(budget["max_memory"]) // per_block
    assert cache.store.pool.num_blocks == expected, "the pool was not sized again for the real layout"


def test_a_budget_that_holds_no_block_of_the_real_layout_refuses_to_store(monkeypatch):
    model = tiny_model("llama")
    truth = run_probe(model)
    small = [dataclasses.replace(x, head_dim=x.head_dim // 2) for x in truth]
    monkeypatch.setattr(construction, "predict_layout", lambda model: small)
    cache = PrefixCache(model, block_size=4, max_memory=sum(x.block_bytes(4) for x in small))
    prompt = random_ids(21, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrefixCacheFallbackWarning)
        assert_same_output(greedy(model, prompt), greedy(model, prompt, **{CACHE_KWARG: cache}))
    assert "holds no block" in cache.last_call.refused and not cache.store.confirmed
    assert cache.store.pool.num_cached == 0


def test_calls_under_autocast_neither_use_nor_feed_the_store():
    """Blocks hold what the model computes by default. Under autocast a call computes other K/V (values in
    bf16): reusing stored blocks would differ from generate() under autocast, and storing its K/V would
    make a later plain call differ from generate() without a cache."""
    model = tiny_model("llama")
    cache = PrefixCache(model, block_size=4, num_blocks=64)
    reuse_twice(model, cache)
    longer = torch.tensor([[*random_ids(21, seed=3)[0].tolist(), *random_ids(20, seed=4)[0].tolist()]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrefixCacheFallbackWarning)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = greedy(model, longer, **{CACHE_KWARG: cache})
            ref = greedy(model, longer)
    assert_same_output(ref, out)
    assert cache.last_call.hit_tokens == 0, "a call under autocast reused blocks computed without it"
    assert cache.stats.refused_calls == 1 and "autocast" in cache.last_call.refused
    prompt = torch.cat([longer, random_ids(3, seed=5)], dim=1)
    out = greedy(model, prompt, max_new_tokens=6, **{CACHE_KWARG: cache})
    assert cache.last_call.hit_tokens == 20
    assert_same_output(greedy(model, prompt, max_new_tokens=6), out)


def test_calls_in_training_mode_neither_use_nor_feed_the_store():
    """Dropout in training mode changes the hidden states, so K/V of later layers: a forgotten
    ``model.eval()`` must not put noisy K/V in the store, nor serve clean ones to a sampled-dropout call."""
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    cache = PrefixCache(model, block_size=4, num_blocks=64)
    reuse_twice(model, cache)
    longer = torch.tensor([[*random_ids(21, seed=3)[0].tolist(), *random_ids(20, seed=4)[0].tolist()]])
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrefixCacheFallbackWarning)
        greedy(model, longer, **{CACHE_KWARG: cache})
    assert cache.last_call.hit_tokens == 0, "a call in training mode reused stored blocks"
    assert cache.stats.refused_calls == 1 and "training mode" in cache.last_call.refused
    model.eval()
    prompt = torch.cat([longer, random_ids(3, seed=5)], dim=1)
    out = greedy(model, prompt, max_new_tokens=6, **{CACHE_KWARG: cache})
    assert cache.last_call.hit_tokens == 20
    assert_same_output(greedy(model, prompt, max_new_tokens=6), out)


def test_a_layout_the_first_call_finds_unservable_turns_reuse_off_with_one_warning(monkeypatch):
    model = tiny_model("llama")
    truth = run_probe(model)
    monkeypatch.setattr(
        construction, "predict_layout", lambda model: [dataclasses.replace(x, num_heads=7) for x in truth]
    )

    def unservable(model):
        raise UnsupportedLayout("layer 1 stored no per-token K/V during a forward pass")

    monkeypatch.setattr(call_module, "probe_layout", unservable)
    cache = PrefixCache(model, block_size=4, num_blocks=64)
    prompt = random_ids(21, seed=3)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        for _ in range(2):
            assert_same_output(greedy(model, prompt), greedy(model, prompt, **{CACHE_KWARG: cache}))
            assert cache.last_call.hit_tokens == 0
    messages = [str(r.message) for r in records if issubclass(r.category, PrefixCacheFallbackWarning)]
    assert len(messages) == 1 and "layer 1 stored no per-token K/V" in messages[0], messages
    assert cache.store is None and "layer 1" in cache.stats.fallback


def cast_to_float64(model):
    model.to(torch.float64)


def shrink_the_window(model):
    model.config.sliding_window = 4


def replace_a_projection(model):
    attention = model.model.layers[1].self_attn
    old = attention.v_proj
    attention.v_proj = torch.nn.Linear(old.in_features, old.out_features, bias=False)


@pytest.mark.parametrize(
    ("family", "change"),
    [("llama", cast_to_float64), ("mistral", shrink_the_window), ("llama", replace_a_projection)],
)
def test_the_probe_runs_again_after_the_model_changed_and_the_new_cache_is_exact(family, change):
    model = tiny_model(family, **({"sliding_window": 8} if family == "mistral" else {}))
    PrefixCache(model, num_blocks=32, host_memory="1MiB", install=False)
    forwards = ForwardCounter(model)
    change(model)
    cache = PrefixCache(model, block_size=4, num_blocks=64, host_memory="1MiB")
    assert forwards.count == 1, "the probe result of the model before the change was reused"
    assert cache.store.layouts == run_probe(model)
    prefix = random_ids(21, seed=3)[0].tolist()
    greedy(model, torch.tensor([[*prefix, 5]]), **{CACHE_KWARG: cache})
    prompt = torch.tensor([[*prefix, 7, 9]])
    out = greedy(model, prompt, max_new_tokens=6, **{CACHE_KWARG: cache})
    assert cache.last_call.hit_tokens == 20
    assert_same_output(greedy(model, prompt, max_new_tokens=6), out)


def test_the_kept_probe_result_does_not_keep_the_model_alive():
    model = tiny_model("llama")
    PrefixCache(model, num_blocks=8, host_memory="1MiB", install=False)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
