"""Mutants of issue 21's fetch outside the lock: lower-tier reads do not hold the store's lock, and a
promotion that lost the race to another view takes that view's blocks (tests/test_tier_concurrency.py)."""

from __future__ import annotations

from mutants.base import mutant

CONCURRENCY = "tests/test_tier_concurrency.py"


@mutant(
    "tier_read_under_the_lock",
    breaks="lower-tier reads run outside the store's lock",
    tests=(f"{CONCURRENCY}::test_a_device_hit_completes_while_another_view_reads_a_tier",),
)
def tier_read_under_the_lock() -> None:
    """store.match holds the store's lock across the lower-tier read, as before issue 21."""
    from hf_prefix_cache.store import BlockStore

    match = BlockStore.match

    def locked(self, *args, **kwargs):
        with self.lock:
            return match(self, *args, **kwargs)

    BlockStore.match = locked


@mutant(
    "promotion_ignores_a_published_twin",
    breaks="a promotion that lost the race takes the blocks another view published",
    tests=(f"{CONCURRENCY}::test_two_views_promoting_one_chain_share_one_copy",),
)
def promotion_ignores_a_published_twin() -> None:
    """A promotion publishes its own copy even when another view published the same block meanwhile."""
    from hf_prefix_cache.tiering import TierStack

    publish = TierStack._publish_promoted

    def overwriting(self, namespace, digest, chain, taken, extra_keys, sources):
        pool = self.store.pool
        for _, data, _ in taken:
            occupant = pool.table.get(data.block_hash)
            if occupant is not None:
                occupant.key = ("stale",)  # no longer "the same block": ours goes in over it
        return publish(self, namespace, digest, chain, taken, extra_keys, sources)

    TierStack._publish_promoted = overwriting
