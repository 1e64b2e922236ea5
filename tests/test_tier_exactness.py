"""Exactness with the host and disk tiers, each alone and together, on tiny models: every warm call's
prefix comes from a lower tier (the device pool is emptied between calls), its output equals generate()
without a cache, and its hit equals the oracle of what earlier calls stored."""

from __future__ import annotations

import pytest
import torch
from support.assertions import assert_exact
from support.models import model_for, random_ids
from support.oracle import StoredPrefixes
from support.scenarios import STRATEGIES, cat, check_call, conversation, left_pad, new_tokens, run_call

from hf_prefix_cache import PrefixCache

GREEDY = STRATEGIES["greedy"]
TIER_SETS = {
    "host": dict(host_memory="64MiB"),
    "disk": dict(disk=True),
    "host+disk": dict(host_memory="64MiB", disk=True),
}


def make_cache(model, tiers: str, folder, num_blocks: int = 64) -> PrefixCache:
    options = dict(TIER_SETS[tiers])
    if options.pop("disk", False):
        options["disk"] = folder
    return PrefixCache(model, block_size=4, num_blocks=num_blocks, **options)


def spill_device(cache: PrefixCache, drop_host: bool = False) -> None:
    """Empty the device pool the way memory pressure does: allocate every free block (evicting, so
    write-back to host happens), then give them back empty. Disk writes are flushed first."""
    assert cache.flush(30)
    store = cache.store
    with store.lock:
        taken = []
        while (block := store.pool.allocate()) is not None:
            taken.append(block)
        store.pool.release(taken)
    assert store.pool.num_cached == 0
    if drop_host and store.tiers.host is not None:
        store.tiers.host.clear()


def lower_tier_hit(cache: PrefixCache, batch: bool = False) -> dict:
    by_tier = cache.last_call.hit_tokens_by_tier
    if not batch:  # in a batch, a row may hit blocks that another row promoted a moment before
        assert by_tier.get("device", 0) == 0, f"the device pool was emptied, yet {by_tier}"
    assert sum(by_tier.values()) == cache.last_call.hit_tokens
    return by_tier


@pytest.mark.parametrize("tiers", list(TIER_SETS))
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_lower_tier_hits_are_exact_and_equal_the_oracle(family, tiers, tmp_path):
    model = model_for(family)
    cache = make_cache(model, tiers, tmp_path / "kv")
    oracle = StoredPrefixes(4)
    first = random_ids(30, 0)
    cold = run_call(model, cache, GREEDY, first)
    check_call(cold, oracle, GREEDY, torch.float32, "cold")
    spill_device(cache)

    shared = cat(first[:, :22], new_tokens(10, 1))
    warm = run_call(model, cache, GREEDY, shared)
    assert check_call(warm, oracle, GREEDY, torch.float32, "shared prefix") == 20
    expected_tier = "host" if "host" in tiers else "disk"
    assert lower_tier_hit(cache) == {expected_tier: 20}
    spill_device(cache, drop_host=tiers == "host+disk")  # host+disk: the next hits must come from disk

    history = conversation(warm.out.sequences, 0, 0, warm.width)
    rows = [history + new_tokens(6, 3), new_tokens(9, 4), first[0, :26].tolist() + new_tokens(3, 5)]
    ids, mask = left_pad(rows)
    batch = run_call(model, cache, GREEDY, ids, mask)
    assert check_call(batch, oracle, GREEDY, torch.float32, "batch") > 0
    by_tier = lower_tier_hit(cache, batch=True)
    assert by_tier.get("host", 0) + by_tier.get("disk", 0) > 0
    if tiers == "host+disk":
        assert by_tier.get("host", 0) == 0 and by_tier["disk"] > 0
    spill_device(cache)

    follow = cat(
        conversation(batch.out.sequences, 0, ids.shape[1] - len(rows[0]), batch.width), new_tokens(5, 6)
    )
    again = run_call(model, cache, GREEDY, follow)
    assert check_call(again, oracle, GREEDY, torch.float32, "follow-up") >= len(history) // 4 * 4
    lower_tier_hit(cache)
    assert cache.stats.tier_errors == 0
    assert cache.store.pool.num_referenced == 0


def test_a_new_cache_over_the_same_folder_hits_on_its_first_call(tmp_path):
    """A restart in one process: another PrefixCache (its own empty pool) over the same disk folder."""
    model = model_for("llama")
    first = make_cache(model, "disk", tmp_path)
    prompt = random_ids(41, 7)
    run_call(model, first, GREEDY, prompt)
    assert first.flush(30)
    second = make_cache(model, "disk", tmp_path)
    outcome = run_call(model, second, GREEDY, prompt)
    assert_exact(outcome.ref, outcome.out)
    assert outcome.hit_tokens == 40 and second.last_call.hit_tokens_by_tier == {"disk": 40}
    assert second.stats.hit_tokens_by_tier == {"device": 0, "disk": 40}


def test_negative_control_corrupted_host_kv_is_caught(tmp_path):
    """Exactness checks can fail: noise on the promoted K/V is detected."""
    model = model_for("llama")
    cache = make_cache(model, "host", tmp_path)
    prompt = random_ids(30, 8)
    run_call(model, cache, GREEDY, prompt)
    spill_device(cache)
    for block in cache.store.tiers.host._entries.values():
        for tensor in block.keys:
            tensor.add_(torch.randn_like(tensor))
    outcome = run_call(model, cache, GREEDY, prompt)
    assert outcome.hit_tokens == 28
    with pytest.raises(AssertionError):
        assert_exact(outcome.ref, outcome.out)


def test_tier_options_need_a_store_of_their_own(tmp_path):
    model = model_for("llama")
    cache = make_cache(model, "disk", tmp_path)
    shared = PrefixCache(model, store=cache.store)  # shares every tier
    assert shared.store.tiers is cache.store.tiers
    with pytest.raises(ValueError, match="tiers belong to the store"):
        PrefixCache(model, store=cache.store, host_memory="1GiB")
    with pytest.raises(ValueError, match="disk_size= needs disk="):
        PrefixCache(model, disk_size="1GiB")


def test_clear_empties_every_tier_of_the_namespace(tmp_path):
    model = model_for("llama")
    cache = make_cache(model, "host+disk", tmp_path, num_blocks=4)
    prompt = random_ids(41, 9)
    run_call(model, cache, GREEDY, prompt)
    spill_device(cache)
    assert list(tmp_path.rglob("*.kvb")) and len(cache.store.tiers.host) > 0
    cache.clear()
    assert list(tmp_path.rglob("*.kvb")) == [] and len(cache.store.tiers.host) == 0
    outcome = run_call(model, cache, GREEDY, prompt)
    assert outcome.hit_tokens == 0


def _multi_turn_workload(cache: PrefixCache, model, conversations: int = 8, turns: int = 3):
    """Round-robin turns of ``conversations`` chats sharing a system prompt; returns (hit rate, outputs)."""
    system = new_tokens(20, 100)
    histories = [system + new_tokens(10, 200 + c) for c in range(conversations)]
    outputs = []
    cache.reset_stats()
    for turn in range(turns):
        for index in range(conversations):
            ids = torch.tensor([histories[index]])
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6, cache=cache
            )
            outputs.append(out[0].tolist())
            histories[index] = out[0].tolist() + new_tokens(8, 300 + 10 * turn + index)
    return cache.stats.hit_rate, outputs


def test_a_small_device_pool_spilling_to_host_hits_like_a_pool_holding_everything():
    """Device = 25% of the working set, host = all of it: hit rate within 2 points of a full device."""
    model = model_for("llama")
    full = PrefixCache(model, block_size=4, num_blocks=1024)
    full_rate, full_out = _multi_turn_workload(full, model)
    working_set = full.store.pool.num_cached
    quarter = working_set // 4
    assert quarter >= max(len(tokens) for tokens in full_out) // 4, "a call must fit in the quarter pool"
    per_block = sum(layout.block_bytes(4) for layout in full.store.layouts)
    spilled = PrefixCache(model, block_size=4, num_blocks=quarter, host_memory=working_set * per_block)
    spill_rate, spill_out = _multi_turn_workload(spilled, model)
    small = PrefixCache(model, block_size=4, num_blocks=quarter)
    small_rate, _ = _multi_turn_workload(small, model)
    assert spill_out == full_out  # and each equals generate() without a cache (tested above)
    assert abs(full_rate - spill_rate) <= 0.02, (full_rate, spill_rate)
    assert full_rate - small_rate > 0.02, "negative control: without the host tier the quarter pool misses"
    assert spilled.stats.hit_tokens_by_tier["host"] > 0 and spilled.stats.tier_errors == 0
