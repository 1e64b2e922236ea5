"""PrefixCache gives exactly what generate() gives without any cache, while computing less."""

from __future__ import annotations

import pytest
import torch
from support.exact import PrefillRecorder, assert_same_output, greedy
from support.models import random_ids, tiny_model

from hf_prefix_cache import PrefixCache
from hf_prefix_cache.compat import CACHE_KWARG

FAMILIES = ["llama", "qwen2", "gpt2"]
BLOCK = 4


@pytest.fixture(params=FAMILIES)
def model(request):
    return tiny_model(request.param)


def cached_and_plain(model, cache, input_ids, **kwargs):
    expected = greedy(model, input_ids, **kwargs)
    actual = greedy(model, input_ids, **{CACHE_KWARG: cache}, **kwargs)
    return expected, actual


def test_cold_then_warm_shared_system_prompt(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128)
    system = random_ids(37, seed=1)
    recorder = PrefillRecorder(model)
    for turn, seed in enumerate([2, 3, 4]):
        prompt = torch.cat([system, random_ids(6, seed=seed)], dim=1)
        expected, actual = cached_and_plain(model, cache, prompt)
        assert_same_output(expected, actual)
        hit = cache.last_call.hit_tokens
        assert hit == (0 if turn == 0 else 36)  # 9 full blocks of the 37-token system prompt
        # The warm call fed only the uncached tokens to the model (the hook saw the plain call first).
        assert recorder.lengths[-actual.sequences.shape[1] + prompt.shape[1]] == prompt.shape[1] - hit
        recorder.clear()
    assert cache.store.pool.num_referenced == 0


def test_three_turn_conversation_reuses_history_and_replies(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=256)
    history = random_ids(21, seed=5)
    previous_prompt_len = 0
    for turn in range(3):
        expected, actual = cached_and_plain(model, cache, history)
        assert_same_output(expected, actual)
        if turn > 0:
            # everything but the newest user message and the partial last block was reused,
            # including the previous turn's generated reply
            assert cache.last_call.hit_tokens >= history.shape[1] - 5 - BLOCK
            assert cache.last_call.hit_tokens > previous_prompt_len
        previous_prompt_len = history.shape[1]
        history = torch.cat([actual.sequences, random_ids(5, seed=10 + turn)], dim=1)
    assert cache.stats.hit_rate > 0.5


def test_unrelated_prompt_after_conversation_is_unaffected(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=256)
    conversation = random_ids(40, seed=7)
    greedy(model, conversation, **{CACHE_KWARG: cache})
    unrelated = random_ids(23, seed=8)
    expected, actual = cached_and_plain(model, cache, unrelated)
    assert_same_output(expected, actual)
    assert cache.last_call.hit_tokens == 0


def test_prompt_shorter_than_one_block(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    for _ in range(2):
        expected, actual = cached_and_plain(model, cache, random_ids(3, seed=9))
        assert_same_output(expected, actual)
        assert cache.last_call.hit_tokens == 0


@pytest.mark.parametrize("length", [16, 17])
def test_prompt_that_is_exactly_a_cached_prefix(model, length):
    """The whole prompt is stored: the last token must still be computed (the generate() trap)."""
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    prompt = random_ids(length, seed=11)
    greedy(model, prompt, **{CACHE_KWARG: cache})
    recorder = PrefillRecorder(model)
    expected, actual = cached_and_plain(model, cache, prompt)
    assert_same_output(expected, actual)
    recorder.remove()
    hit = cache.last_call.hit_tokens
    assert hit == (length - 1) // BLOCK * BLOCK
    assert hit < length
    # forwards: the plain run's (the whole prompt, then one per new token), then the cached run's, whose
    # prefill is fed exactly the uncached tail: at least the last prompt token
    steps = len(expected.logits)
    assert recorder.lengths == [length] + [1] * (steps - 1) + [length - hit] + [1] * (steps - 1)


def test_explicit_prepare_and_commit_without_the_wrapper(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64, install=False)
    assert "generate" not in model.__dict__
    prompt = random_ids(30, seed=12)
    for _ in range(2):
        expected = greedy(model, prompt)
        filled = cache.prepare(prompt)
        actual = greedy(model, prompt, **{CACHE_KWARG: filled})
        cache.commit(actual.sequences)
        assert_same_output(expected, actual)
    assert cache.last_call.hit_tokens == 28


def test_forward_calls_behave_like_dynamic_cache(model):
    from transformers import DynamicCache

    cache = PrefixCache(model, block_size=BLOCK, num_blocks=16)
    plain = DynamicCache(config=model.config)
    ids = random_ids(12, seed=13)
    with torch.no_grad():
        a = model(ids[:, :8], **{CACHE_KWARG: cache}).logits
        b = model(ids[:, :8], **{CACHE_KWARG: plain}).logits
        c = model(ids[:, 8:], **{CACHE_KWARG: cache}).logits
        d = model(ids[:, 8:], **{CACHE_KWARG: plain}).logits
    assert torch.equal(a, b) and torch.equal(c, d)
    assert cache.get_seq_length() == plain.get_seq_length() == 12


def test_negative_control_wrong_prefix_kv_is_caught(model):
    """Serving K/V of another prefix must fail the exactness check: the check can fail."""
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    prompt = torch.cat([random_ids(32, seed=14), random_ids(5, seed=15)], dim=1)
    greedy(model, prompt, **{CACHE_KWARG: cache})
    wrong = random_ids(37, seed=16)
    greedy(model, wrong, **{CACHE_KWARG: PrefixCache(model, store=cache.store, block_size=BLOCK)})
    # Swap in the stored blocks of the wrong prompt's chain under the right prompt's hashes.
    right_blocks = [cache.store.pool.table[h] for h in cache.block_hashes(prompt[0].tolist())]
    wrong_blocks = [cache.store.pool.table[h] for h in cache.block_hashes(wrong[0].tolist())]
    for layer in range(len(cache.store.layouts)):
        for pool in (cache.store.kv.keys[layer], cache.store.kv.values[layer]):
            pool[:, [b.block_id for b in right_blocks]] = pool[:, [b.block_id for b in wrong_blocks]]
    expected, actual = cached_and_plain(model, cache, prompt)
    assert cache.last_call.hit_tokens == 36
    with pytest.raises(AssertionError):
        assert_same_output(expected, actual)


def test_cache_keyword_of_transformers_5_24(model):
    from hf_prefix_cache.compat import CACHE_KWARG

    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    prompt = random_ids(25, seed=17)
    for _ in range(2):
        expected = greedy(model, prompt)
        actual = greedy(model, prompt, **{CACHE_KWARG: cache})
        assert_same_output(expected, actual)
    assert cache.last_call.hit_tokens == 24
