"""Constructing a PrefixCache: the probe forward runs once per model object and again whenever the model
changed in a way that could change its K/V layout; reusing it never serves a stale layout."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from exact import assert_same_output, greedy
from tiny_models import random_ids, tiny_model

from hf_prefix_cache import PrefixCache
from hf_prefix_cache.compat import CACHE_KWARG
from hf_prefix_cache.layout import run_probe


class ForwardCounter:
    """Counts forward passes of the model's base transformer (the probe runs through it)."""

    def __init__(self, model):
        self.count = 0
        model.base_model.register_forward_pre_hook(self._seen)

    def _seen(self, module, args):
        self.count += 1


def test_a_second_cache_on_an_unchanged_model_reuses_the_probe():
    model = tiny_model("llama")
    forwards = ForwardCounter(model)
    first = PrefixCache(model, num_blocks=32, install=False)
    assert forwards.count == 1
    second = PrefixCache(model, num_blocks=32, install=False)
    assert forwards.count == 1, "the probe forward ran again for an unchanged model"
    assert second.store.layouts == first.store.layouts == run_probe(model)


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
    PrefixCache(model, num_blocks=32, install=False)
    forwards = ForwardCounter(model)
    change(model)
    cache = PrefixCache(model, block_size=4, num_blocks=64)
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
    PrefixCache(model, num_blocks=8, install=False)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
