"""The remote tier against a real redis-server, without a model: keys, entries, skips, partial chains,
bad values, the fetch threshold, a full write queue, and a dead, stalled or full server."""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch
from support.redis_server import RedisServer
from support.tiers import BLOCK, LAYOUT, match, store_tokens, synthetic_chain, tier_ns

from hf_prefix_cache import BlockStore
from hf_prefix_cache.tiers import TierWarning, decode, encode
from hf_prefix_cache.tiers.remote import RemoteTier

TOKENS = list(range(10, 10 + 3 * BLOCK))  # three full blocks


def remote(server: RedisServer, **options) -> RemoteTier:
    options.setdefault("min_tokens", 0)
    return RemoteTier(server.url, LAYOUT, **options)


def stored(server: RedisServer, tokens=TOKENS, **options) -> tuple[list, list]:
    """Write ``tokens``' blocks through one tier (then closed) and return (requests, blocks)."""
    requests, blocks = synthetic_chain(tokens)
    writer = remote(server, **options)
    writer.put(tier_ns(), blocks)
    assert writer.flush(30)
    assert writer.counters.puts == len(blocks) and writer.counters.errors == 0
    writer.close()
    return requests, blocks


def same_kv(got, expected) -> bool:
    return all(
        torch.equal(a, b) for x, y in zip(got, expected) for a, b in zip(x.keys + x.values, y.keys + y.values)
    )


def test_each_block_is_one_verified_entry_under_a_deterministic_key(server):
    requests, blocks = stored(server, key_prefix="deploy-a")
    client = server.client()
    expected = {f"deploy-a:{tier_ns().hex()}:{block.block_hash.hex()}".encode() for block in blocks}
    assert set(client.keys("*")) == expected
    for request, block in zip(requests, blocks):
        value = client.get(f"deploy-a:{tier_ns().hex()}:{block.block_hash.hex()}")
        assert value == encode(tier_ns(), block)  # the disk tier's entry, byte for byte
        assert same_kv([decode(value, tier_ns(), request, LAYOUT)], [block])
        assert client.pttl(f"deploy-a:{tier_ns().hex()}:{block.block_hash.hex()}") == -1  # no TTL asked

    reader = remote(server, key_prefix="deploy-a")  # another process: nothing known locally
    got = reader.get(tier_ns(), requests)
    assert same_kv(got, blocks) and len(got) == 3
    counters = reader.counters
    assert counters.hits == 3 and counters.misses == 0 and counters.round_trips == 2
    assert counters.bytes_read == sum(len(encode(tier_ns(), block)) for block in blocks)


def test_blocks_already_on_the_server_are_not_sent_again_and_ttl_is_set(server):
    _, blocks = stored(server, ttl=60)
    client = server.client()
    assert all(0 < client.pttl(key) <= 60_000 for key in client.keys("*"))
    second = remote(server, ttl=60)  # knows nothing locally: the writer asks the server
    second.put(tier_ns(), blocks)
    assert second.flush(30)
    assert second.counters.skipped == 3 and second.counters.puts == 0 and second.counters.bytes_written == 0
    second.put(tier_ns(), blocks)  # now known locally: not even queued
    assert second.counters.skipped == 6


def test_a_lookup_stops_at_the_first_block_the_server_lost(server):
    requests, blocks = stored(server)
    server.client().delete(f"hfpc:{tier_ns().hex()}:{blocks[1].block_hash.hex()}")  # evicted middle block
    reader = remote(server)
    got = reader.get(tier_ns(), requests)
    assert same_kv(got, blocks[:1]) and len(got) == 1
    assert reader.counters.misses == 1 and reader.counters.errors == 0

    store = BlockStore(LAYOUT, block_size=BLOCK, num_blocks=8)  # behind a block store: a shorter hit
    store.attach_tiers([remote(server)])
    _, sources, keys = match(store, [*TOKENS, 1])
    assert sources == ["remote"] and keys.shape[1] == BLOCK


def corrupt_values(blocks):
    """Values that must never be served under block 1's key: garbage, a cut entry, another block's."""
    real = encode(tier_ns(), blocks[1])
    flipped = bytearray(real)
    flipped[-5] ^= 0xFF
    _, other = synthetic_chain(TOKENS, value=7.0, namespace="another/model")
    return {
        "garbage": (b"not an entry at all", "truncated"),
        "cut": (real[: len(real) // 2], "truncated"),
        "flipped byte": (bytes(flipped), "checksum"),
        "other block": (encode(tier_ns(), blocks[2]), "hash"),
        "other model": (encode(tier_ns("another/model"), other[1]), "namespace"),
    }


@pytest.mark.parametrize("case", ["garbage", "cut", "flipped byte", "other block", "other model"])
def test_a_bad_value_under_a_real_key_is_a_miss_and_the_key_is_deleted(server, case):
    requests, blocks = stored(server)
    value, kind = corrupt_values(blocks)[case]
    key = f"hfpc:{tier_ns().hex()}:{blocks[1].block_hash.hex()}"
    client = server.client()
    client.set(key, value)
    reader = remote(server)
    with pytest.warns(TierWarning, match=kind):
        got = reader.get(tier_ns(), requests)
    assert same_kv(got, blocks[:1]) and len(got) == 1  # the good block before it still hits
    assert reader.counters.error_kinds == {kind: 1}
    assert client.exists(key) == 0, "the bad value must be deleted"
    assert client.exists(f"hfpc:{tier_ns().hex()}:{blocks[2].block_hash.hex()}") == 1


def test_a_remote_hit_shorter_than_min_tokens_is_not_fetched(server):
    requests, _ = stored(server)
    short = remote(server, min_tokens=3 * BLOCK + 1)
    assert short.get(tier_ns(), requests) == []
    assert short.counters.below_threshold == 1 and short.counters.bytes_read == 0
    assert len(remote(server, min_tokens=3 * BLOCK).get(tier_ns(), requests)) == 3


def test_a_full_write_queue_drops_and_counts_instead_of_waiting(server, monkeypatch):
    tier = remote(server, max_queued_blocks=2)
    gate = threading.Event()
    original = tier._write

    def held_write(batch):
        gate.wait(30)
        original(batch)

    monkeypatch.setattr(tier, "_write", held_write)
    _, blocks = synthetic_chain(list(range(100, 100 + 8 * BLOCK)))
    tier.put(tier_ns(), blocks[:1])
    deadline = time.monotonic() + 10
    while (
        tier.writer.queue.qsize() and time.monotonic() < deadline
    ):  # the writer took it and waits at the gate
        time.sleep(0.01)
    tier.put(tier_ns(), blocks[1:])  # 7 more: 1 fits beside the one at the gate
    assert tier.counters.dropped == 6
    gate.set()
    assert tier.flush(30)
    assert tier.counters.puts == 2 and len(server.client().keys("*")) == 2

    server.client().flushall()
    small = remote(server, max_queued_bytes=2 * blocks[0].nbytes)  # a byte bound too
    small_gate = threading.Event()
    small_write = small._write

    def held_small_write(batch):
        small_gate.wait(30)
        small_write(batch)

    monkeypatch.setattr(small, "_write", held_small_write)
    small.put(tier_ns(), blocks)  # at most two blocks' bytes wait, wherever the writer is
    assert small.counters.dropped == 6
    small_gate.set()
    assert small.flush(30) and small.counters.puts == 2


def test_a_dead_server_is_a_counted_miss_with_one_warning_and_back_off_then_hits_resume(server):
    requests, blocks = stored(server)
    tier = remote(server, backoff_s=0.3)
    server.kill()
    with pytest.warns(TierWarning, match="connection") as caught:
        assert tier.get(tier_ns(), requests) == []
        assert tier.get(tier_ns(), requests) == []  # within the back-off: not even tried
        tier.put(tier_ns(), blocks)
    assert len([w for w in caught if issubclass(w.category, TierWarning)]) == 1
    assert tier.counters.error_kinds == {"connection": 1}
    assert tier.counters.unavailable == 2 and tier.counters.dropped == 3

    server.start()  # same port, empty (no persistence)
    wait_until_available(tier)
    tier.put(tier_ns(), blocks)
    assert tier.flush(30) and tier.counters.puts == 3
    reader = remote(server)
    assert len(reader.get(tier_ns(), requests)) == 3 and reader.counters.errors == 0


def wait_until_available(tier: RemoteTier) -> None:
    deadline = time.monotonic() + 30
    while not tier.available():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_stalled_server_times_out_instead_of_hanging(server):
    """SIGSTOP: the kernel accepts connections, nobody answers. The lookup gives up after ``timeout``
    (here: a miss while the server is still stopped) and the tier recovers once it answers again."""
    requests, _ = stored(server)
    tier = remote(server, timeout=0.2, backoff_s=0.2)
    server.pause()
    resume = threading.Timer(3.0, server.resume)
    resume.start()
    try:
        with pytest.warns(TierWarning, match="timeout"):
            got = tier.get(tier_ns(), requests)
        stalled = server.process.poll() is None and resume.is_alive()  # still stopped when it returned
    finally:
        resume.join()
    assert stalled and got == []
    assert tier.counters.error_kinds == {"timeout": 1}
    wait_until_available(tier)
    assert len(tier.get(tier_ns(), requests)) == 3


def test_filling_the_server_past_maxmemory_gives_shorter_hits_only(server):
    """allkeys-lru evicts any block, a middle one included: every lookup returns exactly the leading
    blocks still on the server, each verified, never a wrong one."""
    client = server.client()
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + 400_000)
    chains = [[1000 + c, *range(1, 3 * BLOCK)] for c in range(600)]
    writer = remote(server, max_queued_blocks=4096)
    expected = []
    for index, tokens in enumerate(chains):
        requests, blocks = synthetic_chain(tokens, value=float(index + 1))
        writer.put(tier_ns(), blocks)
        expected.append((requests, blocks))
    assert writer.flush(60) and writer.counters.errors == 0
    assert client.info("stats")["evicted_keys"] > 0, "the server should have run out of memory"
    reader = remote(server)
    lengths = []
    for requests, blocks in expected:
        present = 0
        for block in blocks:
            if not client.exists(f"hfpc:{tier_ns().hex()}:{block.block_hash.hex()}"):
                break
            present += 1
        got = reader.get(tier_ns(), requests)
        assert len(got) == present and same_kv(got, blocks[:present])
        lengths.append(present)
    assert min(lengths) == 0 and max(lengths) == 3 and sum(lengths) < 3 * len(chains)
    assert reader.counters.errors == 0


def test_key_prefix_and_namespace_keep_deployments_apart_and_clear_removes_only_its_own(server):
    requests, _ = stored(server, key_prefix="a")
    stored(server, key_prefix="b")
    other_requests, _ = stored(server, key_prefix="a", tokens=list(range(50, 50 + 2 * BLOCK)))
    assert len(remote(server, key_prefix="a").get(tier_ns(), requests)) == 3  # positive control
    assert remote(server, key_prefix="c").get(tier_ns(), requests) == []
    assert remote(server, key_prefix="a").get(tier_ns("another/model"), requests) == []
    assert remote(server, key_prefix="a").clear(tier_ns()) == 5
    assert remote(server, key_prefix="a").get(tier_ns(), other_requests) == []
    assert len(remote(server, key_prefix="b").get(tier_ns(), requests)) == 3
    with pytest.raises(ValueError, match="key_prefix"):
        remote(server, key_prefix="a b*")


def test_behind_a_block_store_a_new_pool_hits_what_another_store_wrote(server):
    first = BlockStore(LAYOUT, block_size=BLOCK, num_blocks=8)
    first.attach_tiers([remote(server)])
    store_tokens(first, TOKENS)
    assert first.tiers.flush(30)
    second = BlockStore(LAYOUT, block_size=BLOCK, num_blocks=8)
    second.attach_tiers([remote(server)])
    _, sources, keys = match(second, [*TOKENS, 1])
    expected = torch.arange(1, 3 * BLOCK + 1, dtype=torch.float32).view(1, -1, 1).expand(2, -1, 4)
    assert sources == ["remote"] * 3 and torch.equal(keys, expected)
    assert second.pool.num_referenced == 0


def forget_new_modules(before: set[str]) -> None:
    for name in [name for name in sys.modules if name.split(".")[0] == "hf_prefix_cache"]:
        if name not in before:
            del sys.modules[name]


def test_without_redis_py_the_library_imports_works_and_remote_names_the_extra(monkeypatch, request):
    """A fresh import of the package (its modules dropped, restored afterwards) with redis-py blocked."""
    import importlib

    ours = [name for name in sys.modules if name.split(".")[0] == "hf_prefix_cache"]
    for name in ours:
        monkeypatch.delitem(sys.modules, name)
    request.addfinalizer(lambda: forget_new_modules(set(ours)))
    monkeypatch.setitem(sys.modules, "redis", None)  # as if redis-py were not installed
    fresh = importlib.import_module("hf_prefix_cache")
    kwarg = importlib.import_module("hf_prefix_cache.compat").CACHE_KWARG
    from support.models import random_ids, tiny_model

    model = tiny_model("llama")
    cache = fresh.PrefixCache(model, block_size=4, num_blocks=16, install=False)
    ids = random_ids(9, 0)
    for _ in range(2):
        cache.prepare(ids)
        cache.commit(model.generate(ids, max_new_tokens=2, do_sample=False, **{kwarg: cache}))
    assert cache.last_call.hit_tokens == 8
    with pytest.raises(ImportError, match=r"pip install hf_prefix_cache\[redis\]"):
        fresh.PrefixCache(model, block_size=4, num_blocks=8, install=False, remote="redis://127.0.0.1:1/0")


def test_a_unix_socket_url_works(tmp_path):
    with RedisServer(tmp_path / "redis", unix_socket=True) as server:
        assert server.url.startswith("unix://")
        requests, blocks = stored(server)
        assert same_kv(remote(server).get(tier_ns(), requests), blocks)


def test_remote_options_need_remote():
    from support.models import tiny_model

    from hf_prefix_cache import PrefixCache

    with pytest.raises(ValueError, match=r"remote_min_tokens= .*also pass remote="):
        PrefixCache(tiny_model("llama"), block_size=4, num_blocks=8, install=False, remote_min_tokens=64)
