"""Eviction policies on the pool (``retain``, ``lru``, priorities), the trace simulator and Belady's oracle.

The simulator's hits are checked against a real ``PrefixCache`` on the same calls, and Belady's oracle
against a brute-force optimum, so the benchmark figures rest on tested code.
"""

from __future__ import annotations

import functools
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.models import VOCAB, tiny_model

from hf_prefix_cache import BlockStore, PrefixCache, hashing
from hf_prefix_cache.eviction import Levels, LRUPolicy, RetainPolicy
from hf_prefix_cache.layout import LayerLayout
from hf_prefix_cache_eval.retention_sim import Call, hashed, simulate, working_set

LAYOUT = [LayerLayout(1, 2, torch.float32, torch.device("cpu"))]
BLOCK = 4


def make_store(num_blocks: int, policy: str) -> BlockStore:
    return BlockStore(LAYOUT, block_size=BLOCK, num_blocks=num_blocks, policy=policy)


def store_tokens(store: BlockStore, tokens: list[int], priority: int | None = None) -> None:
    hashes = hashing.hash_blocks(hashing.root_hash("ns"), tokens, BLOCK)
    found = store.match("ns", tokens, hashes, len(hashes)).blocks
    chain = store.extend_chain("ns", tokens, hashes, found, lambda positions, ids: None)
    if priority is not None:
        store.prioritize(chain, [priority] * len(chain))
    store.release(chain)


def stored_blocks(store: BlockStore, tokens: list[int]) -> int:
    hashes = hashing.hash_blocks(hashing.root_hash("ns"), tokens, BLOCK)
    blocks = store.match("ns", tokens, hashes, len(hashes)).blocks
    store.release(blocks)
    return len(blocks)


def chain(start: int, blocks: int) -> list[int]:
    return list(range(start, start + blocks * BLOCK))


# -- the default policy on the pool ---------------------------------------------------------------------
@pytest.mark.parametrize(("policy", "kept_a", "kept_b"), [("retain", 3, 2), ("lru", 2, 3)])
def test_retain_takes_the_tail_of_the_chain_released_last_lru_of_the_one_released_first(
    policy, kept_a, kept_b
):
    """Conversation A, then B, then a new call: round-robin brings A back first, so retain keeps it."""
    store = make_store(7, policy)
    a, b = chain(100, 3), chain(200, 3)
    store_tokens(store, a)
    store_tokens(store, b)
    store_tokens(store, chain(300, 2))  # one block more than is free: one eviction
    assert store.pool.evictions == 1
    assert (stored_blocks(store, a), stored_blocks(store, b)) == (kept_a, kept_b)
    assert store.pool.num_referenced == 0


def test_retain_eats_one_conversation_from_its_tail_and_keeps_a_shared_prefix():
    """A parent goes only after its children; a prefix shared by two conversations outlives both tails."""
    store = make_store(8, "retain")
    system = chain(1, 2)
    a, b = system + chain(100, 3), system + chain(200, 3)
    store_tokens(store, a)
    store_tokens(store, b)  # 8 blocks: full
    store_tokens(store, chain(300, 4))  # 4 evictions: all of b's own blocks, then one of a's
    assert store.pool.evictions == 4
    assert stored_blocks(store, b) == 2  # only the shared prefix is left of b
    assert stored_blocks(store, a) == 4  # a lost its tail only
    assert stored_blocks(store, system) == 2


def test_a_prefix_reused_twice_outlives_blocks_used_once_even_after_an_eviction():
    """Frequency: a block hit at least twice sits a level above one-offs, and an evicted block that
    comes back gets its hits back (one more for the miss), so a hot prefix is not lost to one-offs."""
    store = make_store(6, "retain")
    hot = chain(1, 2)
    for _ in range(3):
        store_tokens(store, [*hot, 99])  # hit twice after the first store
    store_tokens(store, chain(100, 4))  # one-off: 6 blocks in use
    store_tokens(store, chain(200, 4))  # one-off: evicts the other one-off's blocks, not the hot prefix
    assert stored_blocks(store, hot) == 2
    policy = store.pool.policy
    store_tokens(store, chain(300, 6))  # a one-off as large as the pool: the hot prefix goes too
    assert stored_blocks(store, hot) == 0 and len(policy.ghosts) > 0
    store_tokens(store, [*hot, 99])  # stored again: the ghosts give its blocks their history back
    assert all(block.hits >= 2 for block in store.pool.table.values() if block.key[1][0] in (1, 5))


@pytest.mark.parametrize("policy", ["retain", "lru"])
def test_lower_priority_goes_first_whatever_its_recency(policy):
    store = make_store(6, policy)
    first, second = chain(100, 3), chain(200, 3)
    store_tokens(store, first, priority=0)
    store_tokens(store, second, priority=1)
    store_tokens(store, chain(300, 3))  # three evictions
    assert (stored_blocks(store, first), stored_blocks(store, second)) == (0, 3)
    store = make_store(6, policy)
    store_tokens(store, first, priority=1)
    store_tokens(store, second, priority=0)
    store_tokens(store, chain(300, 3))
    assert (stored_blocks(store, first), stored_blocks(store, second)) == (3, 0)


def test_a_block_keeps_the_highest_priority_it_was_given():
    store = make_store(4, "retain")
    tokens = chain(100, 2)
    store_tokens(store, tokens, priority=2)
    store_tokens(store, tokens, priority=0)  # a later call at a lower priority does not lower it
    assert {block.priority for block in store.pool.table.values()} == {2}


def test_levels_are_queues_by_level_so_every_operation_is_constant_time():
    """One OrderedDict per level in use: adding, discarding and taking a block touch one queue's ends."""
    levels = Levels()
    blocks = [type("B", (), {"block_id": i})() for i in range(1000)]
    for block in blocks:
        levels.add((block.block_id % 3, 0), block)
    assert levels.order == [(0, 0), (1, 0), (2, 0)] and len(levels) == 1000
    assert levels.pop(newest=True) is blocks[999] and levels.pop(newest=False) is blocks[0]
    assert levels.discard((0, 0), blocks[3]) and not levels.discard((0, 0), blocks[3])
    assert isinstance(RetainPolicy(8).levels, Levels) and isinstance(LRUPolicy().levels, Levels)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4), st.integers(0, 2)), min_size=1, max_size=30),
    st.sampled_from(["retain", "lru"]),
)
def test_references_balance_and_no_parent_goes_before_its_children(calls, policy):
    """Random calls on a small pool: nothing stays referenced, every free cached block is where the
    policy can find it, and (retain) no cached block outlives its parent."""
    store = make_store(6, policy)
    for family, length, priority in calls:
        tokens = [family * 10 + i % 7 for i in range(length * BLOCK + 1)]
        store_tokens(store, tokens, priority=priority)
        pool = store.pool
        assert pool.num_referenced == 0 and pool.num_cached <= 6
        for block in pool.table.values():
            assert block.children == sum(1 for child in pool.table.values() if pool.parent_of(child) is block)
            if policy == "retain" and block.key[0][0] == "block":
                assert pool.parent_of(block) is not None, "a child outlived its parent"
        queued = {i for queue in pool.policy.levels.queues.values() for i in queue}
        leaves = {b.block_id for b in pool.table.values() if policy == "lru" or b.children == 0}
        assert queued == leaves


# -- the simulator and Belady's oracle --------------------------------------------------------------------
def paging_trace(seed: int, calls: int = 9, pages: int = 4) -> list[Call]:
    """One-block prompts (plus a token, so the block is reusable): classic demand paging."""
    rng = random.Random(seed)
    trace = []
    for index in range(calls):
        page = rng.randrange(pages)
        prompt = [10 + page] * BLOCK + [50 + index]
        trace.append(Call(prompt, prompt))
    return hashed(trace, BLOCK)


def optimal_hits(trace: list[Call], capacity: int) -> int:
    """The most hits any eviction choice gets on a paging trace (exhaustive search)."""
    pages = [call.hashes[0] for call in trace]

    @functools.cache
    def best(index: int, cached: frozenset) -> int:
        if index == len(pages):
            return 0
        page = pages[index]
        if page in cached:
            return 1 + best(index + 1, cached)
        if len(cached) < capacity:
            return best(index + 1, cached | {page})
        return max(best(index + 1, (cached - {old}) | {page}) for old in cached)

    return best(0, frozenset())


@pytest.mark.parametrize("seed", range(12))
def test_belady_is_optimal_on_paging_traces(seed):
    """Belady's furthest-next-use choice gets the brute-force optimum; a look at the past does not."""
    trace = paging_trace(seed)
    assert simulate(trace, 2, "belady", BLOCK).hit_tokens == optimal_hits(trace, 2) * BLOCK


def test_belady_needs_the_future_on_a_known_trace():
    """a b c a b: with two blocks, only an oracle of the future keeps a and b over c."""
    pages = [0, 1, 2, 0, 1, 0]
    trace = hashed(
        [Call([10 + p] * BLOCK + [50 + i], [10 + p] * BLOCK + [50 + i]) for i, p in enumerate(pages)], BLOCK
    )
    hits = {policy: simulate(trace, 2, policy, BLOCK).hit_tokens // BLOCK for policy in ("belady", "lru")}
    assert hits["belady"] == optimal_hits(trace, 2) == 2 and hits["lru"] < 2


def conversations_trace(conversations: int, turns: int, seed: int) -> list[Call]:
    """Round-robin turns of random-token conversations: each turn extends the last by a user message
    and a reply of a few blocks."""
    rng = random.Random(seed)
    history = [[] for _ in range(conversations)]
    trace = []
    for _ in range(turns):
        for index in range(conversations):
            user = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(5, 14))]
            reply = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(5, 14))]
            prompt = history[index] + user
            trace.append(Call(prompt, prompt + reply))
            history[index] = prompt + reply
    return hashed(trace, BLOCK)


def test_retain_beats_lru_on_round_robin_and_ties_on_one_conversation():
    """The replay the library exists for, at a quarter of the working set: retain close to Belady and far
    above LRU; on one long conversation (where recency is right) no worse than LRU."""
    trace = conversations_trace(12, 4, seed=3)
    blocks = working_set(trace) // 4
    rates = {p: simulate(trace, blocks, p, BLOCK).hit_rate for p in ("lru", "retain", "belady")}
    assert rates["retain"] >= 0.8 * rates["belady"] and rates["retain"] >= rates["lru"] + 0.15, rates
    single = conversations_trace(1, 30, seed=4)
    blocks = working_set(single) // 4
    rates = {p: simulate(single, blocks, p, BLOCK).hit_rate for p in ("lru", "retain")}
    assert rates["retain"] >= rates["lru"] - 0.01, rates


@pytest.mark.parametrize("policy", ["retain", "lru"])
def test_the_simulator_counts_the_hits_of_a_real_prefix_cache(policy):
    """The same calls through a PrefixCache of a tiny model (scoring the stored sequence, computing the
    prompt's last token on) hit exactly what the simulator says."""
    trace = conversations_trace(5, 3, seed=7)
    blocks = working_set(trace) // 3
    model = tiny_model("llama")
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=blocks, policy=policy)
    real = []
    for call in trace:
        ids = torch.tensor([call.stored])
        cache.score(ids, logits_to_keep=len(call.stored) - len(call.prompt) + 1)
        real.append(cache.last_call.hit_tokens)
    simulated = simulate(trace, blocks, policy, BLOCK)
    assert real == simulated.hits_by_call and sum(real) > 0
    assert cache.stats.evictions > 0 and cache.store.pool.num_referenced == 0
