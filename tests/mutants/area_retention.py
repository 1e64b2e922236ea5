"""Mutants of retention: pins, their TTL, priorities, the default eviction policy and Belady's oracle
(the benchmark's yardstick)."""

from __future__ import annotations

from mutants.base import mutant, replace_function

RETENTION = "tests/test_retention.py"
POLICY = "tests/test_eviction_policy.py"


@mutant(
    "pin_ignored",
    breaks="a pinned prefix is never evicted (and the disk sweep keeps its entries)",
    tests=(
        f"{RETENTION}::test_a_pinned_prefix_survives_heavy_traffic_and_stays_exact[True]",
        f"{RETENTION}::test_the_disk_size_sweep_keeps_the_entries_of_pinned_blocks",
        f"{RETENTION}::test_the_host_tier_never_evicts_the_entry_of_a_pinned_block",
    ),
)
def pin_ignored() -> None:
    """pin() lets go of the blocks at once, as if pinning were not there."""
    from hf_prefix_cache.pins import Pins

    def pin(self, key, blocks, ttl):
        with self.store.lock:
            self.store.pool.release(blocks)

    Pins.pin = pin


@mutant(
    "pin_ttl_never_expires",
    breaks="a pin ends when its TTL passes",
    tests=(f"{RETENTION}::test_a_pin_expires_after_its_ttl_and_then_holds_nothing",),
)
def pin_ttl_never_expires() -> None:
    from hf_prefix_cache.pins import Pins

    Pins.expire = lambda self: 0


@mutant(
    "priority_ignored",
    breaks="lower priorities are evicted first, on the device and in the host tier",
    tests=(
        f"{RETENTION}::test_a_higher_priority_prefix_goes_after_lower_ones[1]",
        f"{RETENTION}::test_an_attached_model_takes_priority_and_pins_through_its_cache",
        f"{RETENTION}::test_prepare_takes_a_priority_per_token_and_a_block_takes_its_highest",
        f"{RETENTION}::test_a_priority_travels_to_the_host_tier_and_back",
        f"{POLICY}::test_lower_priority_goes_first_whatever_its_recency[retain]",
        f"{POLICY}::test_lower_priority_goes_first_whatever_its_recency[lru]",
    ),
)
def priority_ignored() -> None:
    from hf_prefix_cache.block_pool import BlockPool

    BlockPool.raise_priority = lambda self, block, priority: None


@mutant(
    "new_policy_is_lru",
    breaks="the default policy keeps what round-robin replays need next (not LRU)",
    tests=(
        f"{POLICY}::test_retain_takes_the_tail_of_the_chain_released_last_lru_of_the_one_released_first[retain-3-2]",
        f"{POLICY}::test_retain_eats_one_conversation_from_its_tail_and_keeps_a_shared_prefix",
        f"{POLICY}::test_a_prefix_reused_twice_outlives_blocks_used_once_even_after_an_eviction",
        f"{POLICY}::test_retain_beats_lru_on_round_robin_and_ties_on_one_conversation",
    ),
)
def new_policy_is_lru() -> None:
    from hf_prefix_cache import eviction

    def make(original):
        def make_policy(policy, num_blocks=1024):
            return eviction.LRUPolicy() if policy == "retain" else original(policy, num_blocks)

        return make_policy

    replace_function("hf_prefix_cache.eviction", "make_policy", make)


@mutant(
    "belady_looks_at_the_past",
    breaks="Belady's oracle evicts by the next use in the FUTURE of the trace",
    tests=(
        f"{POLICY}::test_belady_needs_the_future_on_a_known_trace",
        f"{POLICY}::test_belady_is_optimal_on_paging_traces[2]",
    ),
)
def belady_looks_at_the_past() -> None:
    """The oracle ranks blocks by their last use up to now: what any online policy knows."""
    import bisect
    import math

    from hf_prefix_cache_eval.retention_sim import BeladyPolicy

    def last_use(self, block_hash):
        uses = self.uses.get(block_hash, [])
        index = bisect.bisect_right(uses, self.now) - 1
        return uses[index] if index >= 0 else -math.inf

    BeladyPolicy.next_use = last_use


@mutant(
    "retain_evicts_parents_first",
    breaks="retain evicts only leaves: a parent outlives the children it makes reachable",
    tests=(
        f"{POLICY}::test_retain_eats_one_conversation_from_its_tail_and_keeps_a_shared_prefix",
        f"{POLICY}::test_references_balance_and_no_parent_goes_before_its_children",
    ),
)
def retain_evicts_parents_first() -> None:
    from hf_prefix_cache.eviction import LRUPolicy, RetainPolicy

    RetainPolicy.admit = LRUPolicy.admit  # every free block a candidate, leaf or not
    RetainPolicy.child_added = LRUPolicy.child_added
    RetainPolicy.child_removed = LRUPolicy.child_removed


@mutant(
    "pool_fraction_ignored",
    breaks="the eval's --pool-fraction sizes the store from the replay's working set",
    tests=(
        "tests/test_eval_harness.py::test_pool_fraction_sizes_the_store_from_the_working_set_and_policy_reaches_the_cache[lru]",
    ),
)
def pool_fraction_ignored() -> None:
    """The store keeps --cache-memory's size, whatever the fraction."""
    import dataclasses

    replace_function(
        "hf_prefix_cache_eval.runner",
        "sized_by_fraction",
        lambda original: lambda config, *args: dataclasses.replace(config, pool_fraction=None),
    )


@mutant(
    "tiers_ignore_pins",
    breaks="the host tier and the disk sweep keep the entries of blocks pinned in this process",
    tests=(
        f"{RETENTION}::test_the_disk_size_sweep_keeps_the_entries_of_pinned_blocks",
        f"{RETENTION}::test_the_host_tier_never_evicts_the_entry_of_a_pinned_block",
    ),
)
def tiers_ignore_pins() -> None:
    from hf_prefix_cache.tiering import TierStack

    init = TierStack.__init__

    def forgetting(self, store, tiers):
        init(self, store, tiers)
        for tier in self.tiers:
            tier.kept = frozenset

    TierStack.__init__ = forgetting
