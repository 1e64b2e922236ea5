"""Mutants of the remote tier on a Redis Cluster (issue 24): keys spread over the masters, a failed node
costing only its own blocks with its own back-off, and redirects (MOVED/ASK) followed."""

from __future__ import annotations

from mutants.base import mutant, replace_function

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


@mutant(
    "cluster_map_never_refreshed",
    breaks="the slot map is read again after a node failed or a slot moved (failover, resharding)",
    tests=(
        CLUSTER_TESTS + "test_failover_to_a_replica_during_a_run_is_exact_and_hits_resume",
        CLUSTER_TESTS + "test_slot_migration_during_a_run_is_exact_with_hits",
    ),
)
def cluster_map_never_refreshed() -> None:
    """The slot map read at construction is kept for good."""
    from hf_prefix_cache.tiers.cluster import ClusterClient

    original = ClusterClient._topology

    def first_map(self):
        if self.cluster is None:
            return original(self)
        return self.cluster

    ClusterClient._topology = first_map


@mutant(
    "cluster_url_kind_unchecked",
    breaks="a plain URL at a cluster node is refused at construction, naming redis+cluster://",
    tests=(
        CLUSTER_TESTS + "test_a_cluster_url_at_one_server_and_a_plain_url_at_a_cluster_node_name_the_fix",
    ),
)
def cluster_url_kind_unchecked() -> None:
    from hf_prefix_cache.tiers.clients import ServerClient

    ServerClient._refuse_a_cluster_node = lambda self, url, redis: None


@mutant(
    "cluster_url_drops_password",
    breaks="a cluster URL's user:password@ reaches every node (AUTH as for one server)",
    tests=(
        CLUSTER_TESTS + "test_auth_on_a_cluster_takes_the_single_server_url_form",
        CLUSTER_TESTS + "test_cluster_urls_take_tls_auth_and_options_like_single_server_urls",
    ),
)
def cluster_url_drops_password() -> None:
    def make(original):
        def without_password(url, redis):
            nodes, options = original(url, redis)
            options.pop("password", None)
            return nodes, options

        return without_password

    replace_function("hf_prefix_cache.tiers.cluster", "parse_cluster_url", make)


@mutant(
    "cluster_keys_ignore_prefix",
    breaks="key_prefix keeps deployments apart on a shared cluster",
    tests=(CLUSTER_TESTS + "test_other_models_weights_salts_and_key_prefixes_never_hit",),
)
def cluster_keys_ignore_prefix() -> None:
    """Deployments with different key_prefix share keys."""
    from hf_prefix_cache.tiers.remote import RemoteTier

    RemoteTier.key = lambda self, namespace, block_hash: f"{namespace.hex()}:{block_hash.hex()}"
