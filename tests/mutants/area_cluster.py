"""Mutants of the remote tier on a Redis Cluster (issue 24): keys spread over the masters, a failed node
costing only its own blocks with its own back-off, and redirects (MOVED/ASK) followed."""

from __future__ import annotations

from mutants.base import mutant

CLUSTER_TESTS = "tests/test_tier_cluster.py::"


@mutant(
    "cluster_one_hash_tag",
    breaks="keys spread over the cluster's slots (no single hash tag for a namespace)",
    tests=(
        CLUSTER_TESTS + "test_keys_spread_over_every_master_and_a_new_tier_reads_the_chain_in_order",
        CLUSTER_TESTS + "test_through_the_cluster_a_new_store_hits_exactly_as_the_oracle_says",
    ),
)
def cluster_one_hash_tag() -> None:
    """Every key wrapped in one ``{key_prefix}`` hash tag: it "works", on one shard."""
    from hf_prefix_cache.tiers.remote import RemoteTier

    original = RemoteTier.key

    def tagged(self, namespace, block_hash):
        return "{" + self.key_prefix + "}" + original(self, namespace, block_hash)[len(self.key_prefix) :]

    RemoteTier.key = tagged


@mutant(
    "cluster_dead_node_stops_all",
    breaks="a dead cluster node is a miss for its own blocks only; the other nodes keep serving",
    tests=(
        CLUSTER_TESTS + "test_a_dead_node_is_a_miss_for_its_blocks_only_and_the_others_keep_serving",
        CLUSTER_TESTS + "test_a_stalled_node_costs_one_timeout_not_a_hang",
    ),
)
def cluster_dead_node_stops_all() -> None:
    """A failed node fails the whole operation: the tier backs off as if every node were down."""
    import redis

    from hf_prefix_cache.tiers.cluster import ClusterClient

    original = ClusterClient._node_failed

    def stop_all(self, name, error, doing):
        original(self, name, error, doing)
        raise redis.exceptions.ConnectionError(f"node {name} failed")

    ClusterClient._node_failed = stop_all


@mutant(
    "cluster_dead_node_never_rests",
    breaks="a failed cluster node rests for a back-off instead of costing a failure on every lookup",
    tests=(CLUSTER_TESTS + "test_a_dead_node_is_a_miss_for_its_blocks_only_and_the_others_keep_serving",),
)
def cluster_dead_node_never_rests() -> None:
    from hf_prefix_cache.tiers.cluster import ClusterClient

    ClusterClient._resting = lambda self, name: False


@mutant(
    "cluster_redirects_ignored",
    breaks="MOVED and ASK replies (failover, slot migration) are followed to the node named",
    tests=(CLUSTER_TESTS + "test_slot_migration_during_a_run_is_exact_with_hits",),
)
def cluster_redirects_ignored() -> None:
    """One round only: a redirected key is a miss."""
    from hf_prefix_cache.tiers import cluster

    cluster.REDIRECTS = 1
