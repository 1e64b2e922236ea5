"""The PrefixCache surface: lifecycle, sharing, invalidation, errors, stats and the generate() wrapper."""

from __future__ import annotations

import pytest
import torch
from support.exact import assert_same_output, greedy, run
from support.models import random_ids, tiny_model
from transformers import StoppingCriteria, StoppingCriteriaList

import hf_prefix_cache
from hf_prefix_cache import PrefixCache

BLOCK = 4


class Explode(StoppingCriteria):
    def __init__(self, error: BaseException, after: int):
        self.error, self.calls, self.after = error, 0, after

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.calls > self.after:
            raise self.error
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exceptions_inside_generate_leave_no_block_pinned(model, error):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    prompt = random_ids(30, seed=1)
    run(model, cache, prompt)
    with pytest.raises(type(error)):
        run(model, cache, prompt, stopping_criteria=StoppingCriteriaList([Explode(error, after=2)]))
    assert cache.store.pool.num_referenced == 0
    assert cache.get_seq_length() == 0  # nothing of the failed call is left in the layers
    expected, actual = greedy(model, prompt), run(model, cache, prompt)
    assert_same_output(expected, actual)


def test_second_view_shares_the_store(model):
    first = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    second = PrefixCache(model, store=first.store)
    prompt = random_ids(30, seed=2)
    run(model, first, prompt)
    expected, actual = greedy(model, prompt), run(model, second, prompt)
    assert_same_output(expected, actual)
    assert second.last_call.hit_tokens == 28


def test_salts_do_not_share_blocks(model):
    tenant_a = PrefixCache(model, block_size=BLOCK, num_blocks=64, cache_salt="a")
    tenant_b = PrefixCache(model, store=tenant_a.store, cache_salt="b")
    prompt = random_ids(30, seed=3)
    run(model, tenant_a, prompt)
    run(model, tenant_b, prompt)
    assert tenant_b.last_call.hit_tokens == 0
    # the same views do hit where the salt matches: the 0 above is the salt, not a cache that never hits
    run(model, tenant_b, prompt)
    assert tenant_b.last_call.hit_tokens == 28
    again_a = PrefixCache(model, store=tenant_a.store, cache_salt="a")
    run(model, again_a, prompt)
    assert again_a.last_call.hit_tokens == 28
    unsalted = PrefixCache(model, store=tenant_a.store)
    run(model, unsalted, prompt)
    assert unsalted.last_call.hit_tokens == 0


def test_a_weight_update_invalidates_stored_blocks(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    prompt = random_ids(30, seed=4)
    run(model, cache, prompt)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(1.5)  # in place, like an optimizer step
    expected, actual = greedy(model, prompt), run(model, cache, prompt)
    assert_same_output(expected, actual)
    assert cache.last_call.hit_tokens == 0


def test_another_model_never_hits(model):
    other = tiny_model("llama", seed=1)  # same config and class, other weights
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    prompt = random_ids(30, seed=5)
    run(model, cache, prompt)
    shared = PrefixCache(other, store=cache.store)
    run(other, shared, prompt)
    assert shared.last_call.hit_tokens == 0
    # the same store and view do hit for their own model: the 0 above is the model's identity
    run(other, shared, prompt)
    assert shared.last_call.hit_tokens == 28
    same_model = PrefixCache(model, store=cache.store)
    run(model, same_model, prompt)
    assert same_model.last_call.hit_tokens == 28


def test_clear_drops_everything(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    prompt = random_ids(30, seed=6)
    run(model, cache, prompt)
    assert cache.stats.stored_blocks > 0
    cache.clear()
    assert cache.stats.stored_blocks == 0 and cache.stats.used_bytes == 0
    run(model, cache, prompt)
    assert cache.last_call.hit_tokens == 0


def test_stats_count_tokens_and_evictions(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=12)
    a, b = random_ids(30, seed=7), random_ids(30, seed=8)
    for prompt in (a, a, b, b):
        run(model, cache, prompt, max_new_tokens=2)
    stats = cache.stats
    assert stats.calls == 4 and stats.prompt_tokens == 120
    assert stats.hit_tokens == 56 and stats.computed_tokens == 64
    assert stats.hit_rate == pytest.approx(56 / 120)
    assert stats.evictions > 0 and stats.stored_blocks <= 12
    assert stats.capacity_bytes == 12 * BLOCK * 2 * 2 * 2 * 16 * 4  # blocks*tokens*K,V*layers*heads*dim*fp32
    assert "hit rate" in str(stats) and "<table>" in stats._repr_html_() and "PrefixCache" in repr(cache)
    cache.reset_stats()
    assert cache.stats.calls == 0 and cache.stats.evictions == 0 and cache.stats.stored_blocks > 0


def test_wrapper_is_idempotent_removable_and_passive_without_a_prefix_cache(model):
    first = PrefixCache(model, block_size=BLOCK, num_blocks=8)
    wrapped = model.generate
    second = PrefixCache(model, block_size=BLOCK, num_blocks=8)
    assert model.generate is wrapped and hf_prefix_cache.is_installed(model)
    prompt = random_ids(10, seed=9)
    # without a PrefixCache the wrapper hands every argument, unchanged, to the class's own generate()
    kwargs = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    through_wrapper = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    unwrapped = type(model).generate(model, prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    assert_same_output(unwrapped, through_wrapper)
    assert through_wrapper.sequences.shape == (1, 13)
    plain = type(model).generate(model, prompt, max_new_tokens=3)  # no mask, tensor output
    assert torch.equal(model.generate(prompt, max_new_tokens=3), plain) and plain.shape == (1, 13)
    assert all(cache.stats.calls == 0 for cache in (first, second))  # no cache was consulted
    assert hf_prefix_cache.uninstall(model)
    assert not hf_prefix_cache.is_installed(model) and not hf_prefix_cache.uninstall(model)
    assert "generate" not in model.__dict__  # the class's generate() is back
    assert torch.equal(model.generate(prompt, max_new_tokens=3), plain)


def test_right_padding_is_refused_with_the_fix(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=8)
    ids = torch.cat([random_ids(6, seed=10), random_ids(6, seed=11)])
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with pytest.raises(ValueError, match="padding_side = 'left'"):
        run(model, cache, ids, attention_mask=mask)
    assert cache.store.pool.num_referenced == 0


def test_bad_arguments_name_the_fix(model):
    with pytest.raises(ValueError, match="either num_blocks or max_memory"):
        PrefixCache(model, num_blocks=4, max_memory="1MiB")
    with pytest.raises(ValueError, match="smaller than one block"):
        PrefixCache(model, max_memory=16)
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=8)
    with pytest.raises(ValueError, match="differs from the shared store"):
        PrefixCache(model, store=cache.store, block_size=8)
    with pytest.raises(ValueError, match="other K/V shapes"):
        PrefixCache(tiny_model("gemma3"), store=cache.store)


def test_max_memory_sizes_the_store(model):
    cache = PrefixCache(model, block_size=BLOCK, max_memory="64KiB")
    assert cache.stats.capacity_bytes <= 64 * 1024
    assert cache.stats.num_blocks == 64 * 1024 // (BLOCK * 2 * 2 * 2 * 16 * 4)


def test_explain_shows_where_the_prompt_stops_hitting(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    stored = random_ids(30, seed=20)
    run(model, cache, stored)
    changed = stored.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 90 + 3  # a "timestamp" that differs at token 10
    report = cache.explain(changed)
    assert report.hit_tokens == 8 and report.matched_tokens == 10 and report.first_miss == 10
    assert "first miss at token 10" in str(report) and "background" in report._repr_html_()
    same = cache.explain(stored)
    assert same.hit_tokens == 28 and same.first_miss is None
    assert cache.store.pool.num_referenced == 0 and cache.stats.calls == 1  # read-only
