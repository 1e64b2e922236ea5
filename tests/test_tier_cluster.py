"""The remote tier on a real local Redis Cluster (3 masters, one replica each): keys spread over the
masters, exact hits, a dead or stalled node costing only its own blocks, failover, slot migration,
processes sharing the cluster, isolation, AUTH, and URLs of the wrong kind."""

from __future__ import annotations

import json
import threading
import time
import warnings

import pytest
import redis
import torch
from support.assertions import assert_exact
from support.models import model_for, random_ids
from support.oracle import StoredPrefixes
from support.redis_cluster import RedisClusterNodes
from support.scenarios import STRATEGIES, cat, check_call, conversation, new_tokens, run_call
from support.tiers import BLOCK, LAYOUT, synthetic_chain, tier_ns
from test_tier_remote_processes import result, start, stored_tokens

from hf_prefix_cache import PrefixCache
from hf_prefix_cache.tiers import TierWarning
from hf_prefix_cache.tiers.cluster import parse_cluster_url
from hf_prefix_cache.tiers.remote import RemoteTier

GREEDY = STRATEGIES["greedy"]
CHAIN = list(range(10, 10 + 24 * BLOCK))  # 24 blocks: keys on every master


@pytest.fixture(scope="module")
def module_cluster(tmp_path_factory):
    with RedisClusterNodes(tmp_path_factory.mktemp("cluster"), masters=3, replicas=1) as nodes:
        yield nodes


@pytest.fixture
def cluster(module_cluster):
    """The module's cluster with every node up, ready and empty (a killed node restarted)."""
    module_cluster.restore()
    return module_cluster


def tier(cluster: RedisClusterNodes, **options) -> RemoteTier:
    options.setdefault("min_tokens", 0)
    return RemoteTier(cluster.url, LAYOUT, **options)


def stored(cluster: RedisClusterNodes, tokens=CHAIN, **options):
    requests, blocks = synthetic_chain(tokens)
    writer = tier(cluster, **options)
    writer.put(tier_ns(), blocks)
    assert writer.flush(30) and writer.counters.puts == len(blocks) and writer.counters.errors == 0
    writer.close()
    return requests, blocks


def same_kv(got, expected) -> bool:
    return len(got) == len(expected) and all(
        torch.equal(a, b) for x, y in zip(got, expected) for a, b in zip(x.keys + x.values, y.keys + y.values)
    )


def block_key(block, prefix="hfpc") -> str:
    return f"{prefix}:{tier_ns().hex()}:{block.block_hash.hex()}"


def replicate(cluster: RedisClusterNodes) -> None:
    """Wait until every master's replica has its writes (before killing a master for a failover)."""
    for port in cluster.masters():
        assert cluster.client(port).execute_command("WAIT", 1, 5000) == 1


def remote_cache(model, cluster, **options) -> PrefixCache:
    options.setdefault("remote_min_tokens", 0)
    return PrefixCache(model, block_size=4, num_blocks=64, remote=cluster.url, **options)


def test_keys_spread_over_every_master_and_a_new_tier_reads_the_chain_in_order(cluster):
    requests, blocks = stored(cluster)
    by_master = cluster.keys_by_master()
    assert len(by_master) == 3
    assert all(keys for keys in by_master.values()), f"keys on one shard only: {by_master}"
    assert set().union(*by_master.values()) == {block_key(block).encode() for block in blocks}
    reader = tier(cluster)
    assert same_kv(reader.get(tier_ns(), requests), blocks)
    assert reader.counters.hits == 24 and reader.counters.errors == 0 and reader.counters.round_trips == 2


def test_through_the_cluster_a_new_store_hits_exactly_as_the_oracle_says(cluster):
    model = model_for("llama")
    writer = remote_cache(model, cluster)
    oracle = StoredPrefixes(4)
    first = random_ids(30, 0)
    check_call(run_call(model, writer, GREEDY, first), oracle, GREEDY, torch.float32, "cold")
    turn = run_call(model, writer, GREEDY, cat(first[:, :22], new_tokens(10, 1)))
    check_call(turn, oracle, GREEDY, torch.float32, "second turn")
    assert writer.flush(30)
    assert sum(1 for keys in cluster.keys_by_master().values() if keys) > 1

    reader = remote_cache(model, cluster)  # its own empty pool: every hit comes from the cluster
    follow = cat(conversation(turn.out.sequences, 0, 0, turn.width), new_tokens(5, 2))
    outcome = run_call(model, reader, GREEDY, follow)
    hit = check_call(outcome, oracle, GREEDY, torch.float32, "from the cluster")
    assert hit >= 28 and reader.last_call.hit_tokens_by_tier == {"remote": hit}
    assert reader.stats.tier_errors == 0 and writer.stats.tier_errors == 0
    assert reader.store.pool.num_referenced == 0


def victim_and_cut(cluster: RedisClusterNodes, blocks) -> tuple[int, int]:
    """A master that owns none of the first two blocks, and the index of its first block in the chain."""
    owners = [cluster.owner(block_key(block)) for block in blocks]
    victim = next(port for port in cluster.masters() if port not in owners[:2])
    return victim, owners.index(victim)


def test_a_dead_node_is_a_miss_for_its_blocks_only_and_the_others_keep_serving(cluster):
    requests, blocks = stored(cluster)
    victim, cut = victim_and_cut(cluster, blocks)
    cluster.client(cluster.replica_of(victim)).config_set("cluster-replica-no-failover", "yes")
    reader = tier(cluster, backoff_s=30)
    cluster.node(victim).kill()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = reader.get(tier_ns(), requests)
        assert same_kv(got, blocks[:cut]), f"expected exactly the {cut} blocks before the dead node's first"
        again = reader.get(tier_ns(), requests)  # the dead node is resting: not tried, the rest still served
        assert same_kv(again, blocks[:cut])
        shorter = reader.get(tier_ns(), requests[: max(cut, 1)])
    assert len(shorter) == max(cut, 1) and reader.available()
    assert len([w for w in caught if issubclass(w.category, TierWarning)]) == 1, "warned once"
    assert reader.counters.error_kinds == {"connection": 1}, "one failure, then that node alone rests"
    assert reader.counters.hits == 2 * cut + max(cut, 1)


def test_a_stalled_node_costs_one_timeout_not_a_hang(cluster):
    requests, blocks = stored(cluster)
    victim, cut = victim_and_cut(cluster, blocks)
    reader = tier(cluster, timeout=0.3, backoff_s=30)
    cluster.node(victim).pause()
    resume = threading.Timer(10.0, cluster.node(victim).resume)
    resume.start()
    try:
        with pytest.warns(TierWarning, match="timeout"):
            got = reader.get(tier_ns(), requests)
        still_stalled = resume.is_alive()  # it returned while the node was still stopped: no hang
    finally:
        resume.cancel()
        cluster.node(victim).resume()
    assert still_stalled, "the lookup must give up on the stalled node, not wait for it"
    assert same_kv(got, blocks[:cut]) and reader.counters.error_kinds == {"timeout": 1}


def test_failover_to_a_replica_during_a_run_is_exact_and_hits_resume(cluster):
    model = model_for("llama")
    prompts = [random_ids(40, 20 + i) for i in range(2)]
    writer = remote_cache(model, cluster)
    for prompt in prompts:
        run_call(model, writer, GREEDY, prompt)
    assert writer.flush(30)
    replicate(cluster)
    cache = remote_cache(model, cluster, remote_timeout=0.2)
    tier_ = cache.store.tiers.tiers[0]
    tier_.client.backoff_s = 0.2
    owners = {cluster.owner(key) for keys in cluster.keys_by_master().values() for key in keys}
    victim = sorted(owners)[0]
    replica = cluster.replica_of(victim)
    cluster.node(victim).kill()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TierWarning)
        during = []
        for prompt in prompts:  # during the failover: exact, hits only up to the dead master's blocks
            outcome = run_call(model, cache, GREEDY, prompt)
            assert_exact(outcome.ref, outcome.out)
            during.append(outcome.hit_tokens)
            cache.store.clear()
        assert min(during) < 36, "the dead master's blocks must be misses until its replica takes over"
        cluster.wait_promoted(replica)
        deadline = time.monotonic() + 15  # the slot map is read again within a back-off (0.2 s) of this
        while True:
            outcome = run_call(model, cache, GREEDY, prompts[0])
            assert_exact(outcome.ref, outcome.out)
            cache.store.clear()
            if outcome.hit_tokens == 36 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert outcome.hit_tokens == 36 and cache.last_call.hit_tokens_by_tier == {"remote": 36}
    assert cache.stats.tiers["remote"]["error_kinds"].get("connection", 0) >= 1


def test_slot_migration_during_a_run_is_exact_with_hits(cluster):
    """A slot half-way through a migration (ASK for the keys already moved), then moved for good
    (MOVED): every call exact, every block a hit, no error."""
    model = model_for("llama")
    prompt = random_ids(41, 7)
    writer = remote_cache(model, cluster)
    run_call(model, writer, GREEDY, prompt)
    assert writer.flush(30)
    source = next(port for port, keys in cluster.keys_by_master().items() if keys)
    key = sorted(cluster.keys_by_master()[source])[0]
    target = next(port for port in cluster.masters() if port != source)
    slot = cluster.client(source).cluster("keyslot", key)
    ids = {port: cluster.client(port).cluster("myid") for port in (source, target)}
    ids = {port: value.decode() if isinstance(value, bytes) else value for port, value in ids.items()}
    cluster.client(target).execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
    cluster.client(source).execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
    cluster.client(source).execute_command("MIGRATE", "127.0.0.1", target, key, 0, 5000)

    with pytest.raises(redis.exceptions.AskError):  # the state a client must follow
        cluster.client(source).get(key)
    cache = remote_cache(model, cluster)
    half = run_call(model, cache, GREEDY, prompt)  # the key is on the target: ASK
    assert_exact(half.ref, half.out)
    assert half.hit_tokens == 40 and cache.last_call.hit_tokens_by_tier == {"remote": 40}

    for port in cluster.masters():
        cluster.client(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
    with pytest.raises(redis.exceptions.MovedError):
        cluster.client(source).get(key)
    cache.store.clear()
    moved = run_call(model, cache, GREEDY, prompt)  # the slot map is stale: MOVED, read again
    assert_exact(moved.ref, moved.out)
    assert moved.hit_tokens == 40 and cache.stats.tier_errors == 0
    assert cluster.owner(key) == target


def test_processes_share_the_cluster_and_a_new_one_hits_on_its_first_call(cluster, tmp_path):
    a, b = start("chat", cluster.url, 1, 3), start("chat", cluster.url, 2, 3)
    runs = [result(a), result(b)]
    files = []
    for index, run in enumerate(runs):
        assert all(call["equal"] for call in run["calls"]), run["calls"]
        assert run["tier_errors"] == 0 and run["remote"]["puts"] + run["remote"]["skipped"] > 0
        files.append(tmp_path / f"history{index}.json")
        files[-1].write_text(json.dumps(run["history"]))
    c = result(start("continue", cluster.url, *files))
    first, second = c["calls"]
    assert first["equal"] and second["equal"]
    assert first["hit_tokens"] == stored_tokens(runs[0]["history"])
    assert first["by_tier"] == {"remote": first["hit_tokens"]}
    assert second["hit_tokens"] == stored_tokens(runs[1]["history"])
    assert c["tier_errors"] == 0


def test_other_models_weights_salts_and_key_prefixes_never_hit(cluster):
    prompt = random_ids(41, 5)
    model = model_for("llama", seed=0)
    writer = remote_cache(model, cluster)
    run_call(model, writer, GREEDY, prompt)
    assert writer.flush(30)
    control = run_call(model, remote_cache(model, cluster), GREEDY, prompt)
    assert control.hit_tokens == 40, "positive control: the same set-up does hit"
    others = {
        "other model": (model_for("qwen2"), {}),
        "other weights": (model_for("llama", seed=1), {}),
        "other salt": (model, {"cache_salt": "tenant-b"}),
        "other key_prefix": (model, {"key_prefix": "deployment-b"}),
    }
    for label, (other, options) in others.items():
        reader = remote_cache(other, cluster, **options)
        outcome = run_call(other, reader, GREEDY, prompt)
        assert_exact(outcome.ref, outcome.out, label=label)
        assert outcome.hit_tokens == 0 and reader.stats.tier_errors == 0, label


def test_a_cluster_that_cannot_be_reached_constructs_and_every_lookup_is_a_counted_miss(cluster):
    requests, blocks = stored(cluster)
    dead = RemoteTier("redis+cluster://127.0.0.1:1,127.0.0.1:2", LAYOUT, min_tokens=0, backoff_s=30)
    with pytest.warns(TierWarning, match="connection"):
        assert dead.get(tier_ns(), requests) == [] and dead.get(tier_ns(), requests) == []
    assert dead.counters.error_kinds == {"connection": 1} and dead.counters.unavailable == 1
    assert len(tier(cluster).get(tier_ns(), requests)) == len(blocks)  # positive control


def test_auth_on_a_cluster_takes_the_single_server_url_form(cluster):
    requests, blocks = stored(cluster)
    clients = [cluster.client(node.port) for node in cluster.nodes]
    for client in clients:
        client.config_set("masterauth", "s3cret")
        client.config_set("requirepass", "s3cret")
    try:
        with_password = RemoteTier(cluster.url.replace("//", "//:s3cret@"), LAYOUT, min_tokens=0)
        assert same_kv(with_password.get(tier_ns(), requests), blocks)
        with pytest.warns(TierWarning, match="connection"):
            assert RemoteTier(cluster.url, LAYOUT, min_tokens=0).get(tier_ns(), requests) == []
    finally:
        for node in cluster.nodes:
            authed = redis.Redis(host="127.0.0.1", port=node.port, password="s3cret", socket_timeout=5)
            authed.config_set("requirepass", "")
            authed.config_set("masterauth", "")


def test_a_cluster_url_at_one_server_and_a_plain_url_at_a_cluster_node_name_the_fix(cluster, server):
    plain_port = server.port
    with pytest.raises(ValueError, match=r"not a Redis Cluster node: use remote='redis://"):
        RemoteTier(f"redis+cluster://127.0.0.1:{plain_port}", LAYOUT)
    with pytest.raises(ValueError, match=r"is a Redis Cluster node: use remote='redis\+cluster://"):
        RemoteTier(f"redis://127.0.0.1:{cluster.masters()[0]}/0", LAYOUT)
    RemoteTier(server.url, LAYOUT).close()  # positive controls: the right kinds construct
    RemoteTier(cluster.url, LAYOUT).close()


def test_cluster_urls_take_tls_auth_and_options_like_single_server_urls():
    nodes, options = parse_cluster_url(
        "rediss+cluster://user:p%40ss@h1:7000,h2:7001?ssl_cert_reqs=none", redis
    )
    assert nodes == [("h1", 7000), ("h2", 7001)]
    assert options["username"] == "user" and options["password"] == "p@ss"
    assert (
        options["connection_class"] is redis.connection.SSLConnection and options["ssl_cert_reqs"] == "none"
    )
    nodes, options = parse_cluster_url("redis+cluster://h1:7000", redis)
    assert nodes == [("h1", 7000)] and "connection_class" not in options and "password" not in options
    for bad, fix in [("redis+cluster://h1", "host:port"), ("redis+cluster://h1:7000/2", "database 0")]:
        with pytest.raises(ValueError, match=fix):
            parse_cluster_url(bad, redis)
