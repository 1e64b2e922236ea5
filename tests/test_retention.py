"""Pins, TTLs and priorities through PrefixCache: what they keep, exactly, and what they never leak.

Every keep-under-pressure test has its negative control: the same traffic without the pin or the
priority evicts the prefix.
"""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from support.exact import assert_same_output, greedy, run
from support.models import VOCAB, char_tokenizer, random_ids
from support.tiers import BLOCK as TIER_BLOCK
from support.tiers import NAMESPACE as TIER_NAMESPACE
from support.tiers import make_store as make_tier_store
from support.tiers import match as tier_match
from support.tiers import store_tokens as tier_store_tokens

from hf_prefix_cache import CACHE_KWARG, PrefixCache, role_priorities
from hf_prefix_cache.tiers import DiskTier

BLOCK = 4
POOL = 16
PREFIX = random_ids(4 * BLOCK, seed=11)  # 4 blocks: what is pinned or prioritized


def traffic(model, cache, calls: int = 4, seed: int = 100) -> None:
    """Calls of 3 blocks each, unrelated to PREFIX, then one that needs the whole 16-block pool: together
    they evict everything nothing keeps, whatever the policy."""
    for index in range(calls):
        run(model, cache, random_ids(3 * BLOCK + 1, seed=seed + index), max_new_tokens=2)
    run(model, cache, random_ids((POOL + 1) * BLOCK + 1, seed=seed + calls), max_new_tokens=2)


def prefix_hit(model, cache, prompt) -> int:
    """Greedy generate() with ``cache`` equals plain generate() (checked); returns its hit tokens."""
    expected, actual = greedy(model, prompt), run(model, cache, prompt)
    assert_same_output(expected, actual)
    return cache.last_call.hit_tokens


def continued(extra: int = 5, seed: int = 12) -> torch.Tensor:
    return torch.cat([PREFIX, random_ids(extra, seed=seed)], 1)


# -- pins --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pinned", [True, False])
def test_a_pinned_prefix_survives_heavy_traffic_and_stays_exact(model, pinned):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=POOL)
    if pinned:
        assert cache.pin(PREFIX) == 4 * BLOCK  # not stored yet: computed, stored and pinned
        assert cache.stats.pinned_blocks == 4
    else:
        run(model, cache, PREFIX)
    traffic(model, cache)
    assert cache.stats.evictions > 0
    hit = prefix_hit(model, cache, continued())
    assert hit == (4 * BLOCK if pinned else 0)  # without the pin, the traffic evicted it (the control)
    if pinned:
        assert cache.stats.pinned_bytes == 4 * cache.store.kv.block_bytes()
        assert cache.store.pool.num_referenced == 4  # the pin's references, and only those
        assert cache.unpin(PREFIX) is True
    assert cache.store.pool.num_referenced == 0


def test_pin_takes_text_with_its_tokenizer_and_explain_marks_the_pinned_blocks(model):
    tokenizer = char_tokenizer()
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=POOL)
    text = "A system prompt to keep."  # 24 characters: 6 blocks
    assert cache.pin(text, tokenizer=tokenizer) == 24
    report = cache.explain(text + " and a question", tokenizer)
    assert report.pinned_tokens == 24 and report.hit_tokens >= 24
    assert "pinned" in str(report) and "pinned" in report._repr_html_()
    assert cache.explain(random_ids(9, seed=3)).pinned_tokens == 0
    assert cache.unpin(text, tokenizer=tokenizer) and cache.explain(text, tokenizer).pinned_tokens == 0


def test_pins_survive_reset_stats_and_clear_drops_them_and_says_so(model, caplog):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=POOL)
    cache.pin(PREFIX)
    cache.reset_stats()
    assert cache.stats.pinned_blocks == 4
    with caplog.at_level(logging.WARNING, logger="hf_prefix_cache.pins"):
        cache.clear()
    assert "released 1 pins" in caplog.text
    assert cache.stats.pinned_blocks == 0 and cache.store.pool.num_referenced == 0
    assert cache.unpin(PREFIX) is False  # cleared: unpin is a no-op


def test_a_pin_expires_after_its_ttl_and_then_holds_nothing(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=POOL)
    now = [1000.0]
    cache.store.pins.clock = lambda: now[0]
    cache.pin(PREFIX, ttl=5)
    now[0] += 4
    traffic(model, cache)
    assert prefix_hit(model, cache, continued()) == 4 * BLOCK  # within its TTL: kept
    cache.pin(PREFIX, ttl=5)  # pinning again renews the TTL (it holds the same blocks once)
    assert cache.store.pins.num_blocks == 4 and len(cache.store.pins) == 1
    now[0] += 6
    assert cache.stats.pinned_blocks == 0 and cache.store.pool.num_referenced == 0
    traffic(model, cache, seed=300)
    assert prefix_hit(model, cache, continued(seed=13)) == 0  # expired: evicted like anything else
    assert cache.unpin(PREFIX) is False


def test_pins_over_the_cap_are_refused_with_the_fix_and_leave_no_reference(model):
    block_bytes = PrefixCache(model, block_size=BLOCK, num_blocks=POOL, install=False).store.kv.block_bytes()
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=POOL, max_pinned=5 * block_bytes)
    cache.pin(PREFIX)  # 4 of 5 blocks
    with pytest.raises(ValueError, match="max_pinned"):
        cache.pin(random_ids(2 * BLOCK, seed=21))
    assert cache.store.pool.num_referenced == 4 and cache.stats.pinned_blocks == 4
    default = PrefixCache(model, block_size=BLOCK, num_blocks=POOL)  # default cap: half the pool (8)
    with pytest.raises(ValueError, match="unpin something first"):
        default.pin(random_ids(9 * BLOCK, seed=22))
    assert default.store.pool.num_referenced == 0


def test_bad_pins_are_clear_errors_or_documented_no_ops(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=POOL)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        cache.pin(torch.tensor([[5, 6, VOCAB + 7, 8, 9]]))  # another model's tokenizer
    with pytest.raises(ValueError, match="fewer than one block"):
        cache.pin(PREFIX[:, :3])
    with pytest.raises(ValueError, match="ttl"):
        cache.pin(PREFIX, ttl=-1)
    with pytest.raises(ValueError, match="tokenizer="):
        cache.pin("text without a tokenizer")
    assert cache.unpin(random_ids(8, seed=5)) is False  # never pinned: a no-op that says so
    assert cache.store.pool.num_referenced == 0


def test_pin_in_one_thread_unpin_in_another_and_many_at_once(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64, max_pinned=10**9)
    prompts = [random_ids(2 * BLOCK, seed=40 + i) for i in range(6)]
    for prompt in prompts:
        cache.pin(prompt)  # computed here, on this thread
    store = cache.store
    barrier = threading.Barrier(6)
    errors = []

    def churn(index: int) -> None:
        try:
            barrier.wait()
            for _ in range(20):  # unpin what the main thread pinned, pin it again (stored: no compute)
                assert cache.unpin(prompts[index])
                assert cache.pin(prompts[index]) == 2 * BLOCK
            assert cache.unpin(prompts[index])
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert store.pool.num_referenced == 0 and store.pins.num_blocks == 0


# -- priorities ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("priority", [1, None])
def test_a_higher_priority_prefix_goes_after_lower_ones(model, priority):
    """Through the generate() wrapper: ``priority=`` is the cache's, taken out before generate() runs.
    The prefix is the most recent, so retain would evict it first at the default priority."""
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=POOL)
    for index in range(4):  # 12 of the 16 blocks
        run(model, cache, random_ids(3 * BLOCK + 1, seed=200 + index), max_new_tokens=2)
    expected = greedy(model, PREFIX)
    actual = run(model, cache, PREFIX, priority=priority)  # the last 4 blocks: the pool is full
    assert_same_output(expected, actual)
    run(model, cache, random_ids(3 * BLOCK + 1, seed=300), max_new_tokens=2)  # 3 evictions
    hit = prefix_hit(model, cache, continued())
    if priority:
        assert hit == 4 * BLOCK
    else:  # the control: at the default priority it lost its tail
        assert hit < 4 * BLOCK
    assert cache.store.pool.num_referenced == 0


def test_prepare_takes_a_priority_per_token_and_a_block_takes_its_highest(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=POOL, install=False)
    levels = [2] * 5 + [1] * 7 + [0] * 5  # 17 tokens: blocks of 4 get 2, 1, 1, 0 (+ the reply: 0)
    prompt = random_ids(17, seed=30)
    cache.prepare(prompt, priority=levels)
    output = model.generate(prompt, **{CACHE_KWARG: cache}, max_new_tokens=4, do_sample=False)
    cache.commit(output)
    stored = {b.key[1]: b.priority for b in cache.store.pool.table.values()}
    ids = output[0].tolist()
    assert [stored[tuple(ids[i * BLOCK : (i + 1) * BLOCK])] for i in range(5)] == [2, 2, 1, 0, 0]
    with pytest.raises(ValueError, match="one int per token"):
        cache.prepare(prompt, priority=[1, 2])
    with pytest.raises(ValueError, match="priority="):
        cache.prepare(prompt, priority="high")
    assert cache.store.pool.num_referenced == 0


def test_role_priorities_follow_the_chat_template():
    tokenizer = char_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye?"},
    ]
    levels = role_priorities(tokenizer, messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(levels) == len(ids)
    pieces = text.split("\n")  # "<s>s:Be brief.", "<s>u:Hi?", "<s>a:Hello.", "<s>u:Bye?", "<s>a:"
    sizes = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) + 1 for p in pieces[:-1]]
    expected = [2] * sizes[0] + [1] * sizes[1] + [0] * sizes[2] + [1] * sizes[3]
    assert levels == expected + [0] * (len(ids) - len(expected))
    assert role_priorities(tokenizer, messages, {"system": 5})[:3] == [5, 5, 5]


# -- tiers ---------------------------------------------------------------------------------------------
def test_a_priority_travels_to_the_host_tier_and_back():
    """Written back with the block; the host evicts lower priorities first; promoted, the block has it again."""
    store = make_tier_store(2, host=3 * make_tier_store(1).kv.block_bytes())  # the host holds 3 blocks
    high, low = list(range(100, 100 + 2 * TIER_BLOCK)), list(range(200, 200 + 2 * TIER_BLOCK))
    tier_store_tokens(store, high)
    blocks, _, _ = tier_match(store, high, keep=True)
    store.prioritize(blocks, [3, 3])
    store.release(blocks)
    tier_store_tokens(store, low)  # evicts high's two blocks: written back to host with priority 3
    host = store.tiers.host
    assert sorted(entry.priority for entry in host._entries.values()) == [3, 3]
    for start in (300, 400):  # low's blocks, then the 300s, go to host: it evicts priority 0 to make room
        tier_store_tokens(store, list(range(start, start + 2 * TIER_BLOCK)))
    assert sorted(entry.priority for entry in host._entries.values())[-2:] == [3, 3]  # kept over priority 0
    blocks, sources, _ = tier_match(store, high, keep=True)
    assert sources == ["host", "host"] and [b.priority for b in blocks] == [3, 3]
    store.release(blocks)
    assert store.pool.num_referenced == 0


def test_the_disk_size_sweep_keeps_the_entries_of_pinned_blocks(tmp_path):
    store = make_tier_store(4, disk=tmp_path, disk_size=10**9)
    disk = store.tiers.tiers[0]
    assert isinstance(disk, DiskTier)
    pinned = list(range(100, 100 + 2 * TIER_BLOCK))
    tier_store_tokens(store, pinned)
    blocks, _, _ = tier_match(store, pinned, keep=True)
    store.pins.pin(("ns", (), blocks[-1].block_hash), blocks, None)
    for start in range(200, 1400, 2 * TIER_BLOCK):
        tier_store_tokens(store, list(range(start, start + 2 * TIER_BLOCK)))
    store.tiers.flush()
    entry = disk.path(store.tiers.namespace("model/salt"), blocks[0].block_hash).stat().st_size
    disk.size = 6 * entry  # now far too small: the next write sweeps down to 90%
    disk._used = None
    tier_store_tokens(store, list(range(5000, 5000 + TIER_BLOCK)))
    store.tiers.flush()
    for block in blocks:
        assert disk.path(store.tiers.namespace("model/salt"), block.block_hash).exists()
    assert disk.counters.evictions > 0
    store.pins.clear()
    assert store.pool.num_referenced == 0


def test_the_host_tier_never_evicts_the_entry_of_a_pinned_block():
    """A block promoted from host and then pinned: the host's copy stays while other blocks churn."""
    block_bytes = make_tier_store(1).kv.block_bytes()
    store = make_tier_store(3, host=10 * block_bytes)
    pinned = list(range(100, 100 + 2 * TIER_BLOCK))
    tier_store_tokens(store, pinned)
    tier_store_tokens(store, list(range(200, 200 + 3 * TIER_BLOCK)))  # pinned's blocks go to host
    blocks, sources, _ = tier_match(store, pinned, keep=True)  # promoted back; the host keeps its copies
    namespace = store.tiers.namespace(TIER_NAMESPACE)
    assert sources == ["host", "host"] and all(host_has(store, namespace, block) for block in blocks)
    store.pins.max_bytes = 10**9  # two of the three pool blocks (the default cap is half the pool)
    store.pins.pin(("ns", (), blocks[-1].block_hash), blocks, None)
    host = store.tiers.host
    host.capacity = 3 * block_bytes  # now too small: every write-back evicts an older entry
    for start in range(300, 700, TIER_BLOCK):  # one-block calls: the free pool block churns through host
        tier_store_tokens(store, list(range(start, start + TIER_BLOCK)))
    assert host.counters.evictions > 0
    assert all(host_has(store, namespace, block) for block in blocks)
    store.pins.clear()
    assert store.pool.num_referenced == 0


def host_has(store, namespace, block) -> bool:
    return store.tiers.host.has(namespace, block.block_hash)


def test_an_attached_model_takes_priority_and_pins_through_its_cache(model):
    """attach(): generate() without a cache still takes ``priority=``; the returned cache pins."""
    from hf_prefix_cache import attach, detach

    expected = greedy(model, PREFIX)  # plain generate(), before attaching
    cache = attach(model, block_size=BLOCK, num_blocks=POOL, policy="lru")
    try:
        assert cache.stats.policy == "lru"
        detach(model)
        cache = attach(model, block_size=BLOCK, num_blocks=POOL)
        actual = greedy(model, PREFIX, priority=2)
        assert_same_output(expected, actual)
        assert {block.priority for block in cache.store.pool.table.values()} == {2}
        assert cache.pin(PREFIX) == 4 * BLOCK and cache.stats.pinned_blocks == 4
        assert cache.unpin(PREFIX) and cache.store.pool.num_referenced == 0
    finally:
        detach(model)
