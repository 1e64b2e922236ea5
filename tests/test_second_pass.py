"""The paths a block takes the second time: after clear(), after the server evicted it, on a refresh, on a
partial hit. Each test here kills a mutant of tests/mutants/area_second_pass.py that survived the rest of
the suite (the first pass through each path was tested, the second was not)."""

from __future__ import annotations

import os
import threading
import time
import warnings

import pytest
import torch
from support.models import random_ids, tiny_model
from support.redis_server import RedisServer
from support.tiers import (
    BLOCK,
    LAYOUT,
    NAMESPACE,
    make_store,
    match,
    slot_values,
    store_tokens,
    synthetic_chain,
    tier_ns,
)

from hf_prefix_cache import BlockStore, PrefixCache, hashing
from hf_prefix_cache.compat import CACHE_KWARG
from hf_prefix_cache.layers import PrefixFullLayer
from hf_prefix_cache.tiers import DiskTier, HostTier, TierWarning
from hf_prefix_cache.tiers import disk as disk_module
from hf_prefix_cache.tiers import remote as remote_module
from hf_prefix_cache.tiers.remote import RemoteTier

TOKENS = list(range(10, 10 + 3 * BLOCK))  # three full blocks
BLOCK_BYTES = sum(layout.block_bytes(BLOCK) for layout in LAYOUT)


# -- disk ------------------------------------------------------------------------------------------------
def test_a_disk_hit_refreshes_the_entry_so_the_size_sweep_deletes_it_last(tmp_path):
    requests, blocks = synthetic_chain(list(range(10, 10 + 5 * BLOCK)))
    ns = tier_ns()
    entry_bytes = len(disk_module.encode(ns, blocks[0]))
    tier = DiskTier(tmp_path, LAYOUT, size=3 * entry_bytes + 10, fsync=False)
    tier.put(ns, blocks[:3])
    assert tier.flush(10)
    old = time.time() - 100
    for index, block in enumerate(blocks[:3]):  # chain order: block 0 is the oldest, whatever its hash
        os.utime(tier.path(ns, block.block_hash), (old + index, old + index))
    assert len(tier.get(ns, requests[:1])) == 1  # the hit makes block 0 the most recently used
    tier.put(ns, blocks[3:5])
    assert tier.flush(10)
    assert tier.counters.evictions == 2
    left = [index for index, block in enumerate(blocks) if tier.path(ns, block.block_hash).exists()]
    assert left == [0, 3, 4], "the sweep must delete least recently used first (block 0 was just hit)"
    tier.close()


def test_after_clear_the_same_prompt_is_written_to_disk_again(tmp_path):
    store = make_store(16, disk=tmp_path)
    store_tokens(store, TOKENS)
    assert store.tiers.flush(10)
    assert len(list(tmp_path.rglob("*.kvb"))) == 3
    store.clear()
    assert store.tiers.clear(tier_ns())["disk"] == 3  # what PrefixCache.clear() does (the eval's warm-up)
    assert list(tmp_path.rglob("*.kvb")) == []
    store_tokens(store, TOKENS)
    assert store.tiers.flush(10)
    assert len(list(tmp_path.rglob("*.kvb"))) == 3, "the process still believed the entries were on disk"
    _, sources, _ = match(make_store(16, disk=tmp_path), TOKENS)
    assert sources == ["disk"] * 3


def test_blocks_another_process_deleted_from_disk_are_written_again(tmp_path):
    store = make_store(16, disk=tmp_path)
    store_tokens(store, TOKENS)
    assert store.tiers.flush(10)
    disk = store.tiers.tiers[0]
    _, blocks = synthetic_chain(TOKENS)
    for block in blocks[1:]:  # another process's size sweep deleted the tail of the chain
        disk.path(tier_ns(), block.block_hash).unlink()
    store.clear()
    _, sources, _ = match(store, TOKENS)
    assert sources == ["disk"]  # a partial hit: the lookup learns the rest is gone
    store_tokens(store, TOKENS)
    assert store.tiers.flush(10)
    assert all(disk.path(tier_ns(), block.block_hash).exists() for block in blocks), "never written again"
    assert match(make_store(16, disk=tmp_path), TOKENS)[1] == ["disk"] * 3


def test_entries_the_size_sweep_deleted_are_written_again(tmp_path):
    _, blocks = synthetic_chain(TOKENS)
    ns = tier_ns()
    entry_bytes = len(disk_module.encode(ns, blocks[0]))
    tier = DiskTier(tmp_path, LAYOUT, size=2 * entry_bytes + 10, fsync=False)
    tier.put(ns, blocks[:2])
    assert tier.flush(10)
    old = time.time() - 100
    os.utime(tier.path(ns, blocks[0].block_hash), (old, old))  # block 0 is the least recently used
    tier.put(ns, blocks[2:])
    assert tier.flush(10)
    assert tier.counters.evictions == 1 and not tier.path(ns, blocks[0].block_hash).exists()
    assert not tier.has(ns, blocks[0].block_hash)
    tier.put(ns, blocks[:1])  # block 0 is needed again
    assert tier.flush(10)
    assert tier.path(ns, blocks[0].block_hash).exists() and tier.counters.puts == 4
    tier.close()


def test_a_second_entry_in_the_same_subfolder_is_written(tmp_path):
    by_folder: dict[str, list] = {}
    start = 0
    while True:  # two one-block chains whose hashes share the first byte (the subfolder name)
        _, (block,) = synthetic_chain(list(range(start, start + BLOCK)))
        by_folder.setdefault(block.block_hash.hex()[:2], []).append(block)
        if len(by_folder[block.block_hash.hex()[:2]]) == 2:
            pair = by_folder[block.block_hash.hex()[:2]]
            break
        start += BLOCK
    tier = DiskTier(tmp_path, LAYOUT, fsync=False)
    tier.put(tier_ns(), pair[:1])
    assert tier.flush(10)
    tier.put(tier_ns(), pair[1:])  # its folder exists now
    assert tier.flush(10)
    assert tier.counters.errors == 0 and tier.counters.puts == 2
    assert all(tier.path(tier_ns(), block.block_hash).exists() for block in pair)
    tier.close()


# -- the stack -------------------------------------------------------------------------------------------
def test_clear_empties_the_host_tier_of_every_namespace(tmp_path):
    store = make_store(16, host=100 * BLOCK_BYTES)
    host = store.tiers.host
    host.put(tier_ns(), synthetic_chain(TOKENS[: 2 * BLOCK])[1])
    other_requests, other_blocks = synthetic_chain(TOKENS[: 2 * BLOCK], namespace="model/other-salt")
    host.put(tier_ns("model/other-salt"), other_blocks)
    assert len(host) == 4 and len(host.get(tier_ns("model/other-salt"), other_requests)) == 2
    store.tiers.clear(tier_ns())  # one view's clear()
    assert len(host) == 0 and host.used == 0  # README: clear() empties the host tier
    assert match(store, TOKENS[: 2 * BLOCK], namespace="model/other-salt")[0] == []


def test_a_promoted_block_is_a_device_hit_the_next_time(tmp_path):
    writer = make_store(16, disk=tmp_path)
    store_tokens(writer, TOKENS)
    assert writer.tiers.flush(10)
    store = make_store(16, disk=tmp_path)
    assert match(store, TOKENS)[1] == ["disk"] * 3
    _, sources, keys = match(store, TOKENS)
    assert sources == ["device"] * 3, "promoted blocks must be cached under their chain's keys"
    assert torch.equal(keys, slot_values(TOKENS, 1.0))


def test_a_promoted_block_evicted_again_is_written_back_to_host(tmp_path):
    first = make_store(16, disk=tmp_path)
    store_tokens(first, TOKENS)
    assert first.tiers.flush(10)
    store = make_store(16, host=100 * BLOCK_BYTES, disk=tmp_path)
    assert match(store, TOKENS)[1] == ["disk"] * 3  # promoted into the pool from disk
    assert store.tiers.spill_device() == 3  # the pool evicts them: write-back to host
    _, sources, keys = match(store, TOKENS)
    assert sources == ["host"] * 3 and torch.equal(keys, slot_values(TOKENS, 1.0))


def test_extra_keys_reach_the_disk_under_their_own_namespace(tmp_path):
    extra = ("adapter-a",)
    root = hashing.root_hash(NAMESPACE)
    hashes = hashing.hash_blocks(root, TOKENS, BLOCK, extra)
    kv = slot_values(TOKENS, 1.0)

    def write_kv(positions, block_ids):
        index = torch.tensor([p * BLOCK + i for p in positions for i in range(BLOCK)])
        for layer in range(len(LAYOUT)):
            writer.kv.write(layer, block_ids, kv[:, index], kv[:, index])

    writer = make_store(16, disk=tmp_path)
    writer.release(writer.extend_chain(NAMESPACE, TOKENS, hashes, [], write_kv, extra))
    assert writer.tiers.flush(10)
    assert writer.tiers.namespace(NAMESPACE, extra) != writer.tiers.namespace(NAMESPACE)
    assert {p.parent.parent.name for p in tmp_path.rglob("*.kvb")} == {
        writer.tiers.namespace(NAMESPACE, extra).hex()
    }
    reader = make_store(16, disk=tmp_path)
    found = reader.match(NAMESPACE, TOKENS, hashes, len(hashes), extra)
    blocks = found.blocks
    assert found.sources == ["disk"] * 3
    assert torch.equal(reader.read(0, blocks)[0], kv)
    reader.release(blocks)


def test_a_chain_the_host_holds_whole_is_served_with_disk_below(tmp_path):
    store = make_store(16, host=100 * BLOCK_BYTES, disk=tmp_path)
    store.tiers.host.put(tier_ns(), synthetic_chain(TOKENS)[1])
    _, sources, keys = match(store, TOKENS)
    assert sources == ["host"] * 3 and torch.equal(keys, slot_values(TOKENS, 1.0))


def test_a_promotion_cut_short_by_a_full_pool_leaves_no_reference():
    store = make_store(3, host=100 * BLOCK_BYTES)
    store.tiers.host.put(tier_ns(), synthetic_chain(TOKENS)[1])
    other = list(range(700, 700 + 2 * BLOCK))
    held = store.extend_chain(
        NAMESPACE,
        other,
        hashing.hash_blocks(hashing.root_hash(NAMESPACE), other, BLOCK),
        [],
        lambda p, b: None,
    )
    assert store.pool.num_referenced == 2
    blocks, sources, _ = match(store, TOKENS, keep=True)
    assert sources == ["host"] and len(blocks) == 1  # one free block: a one-block hit
    assert store.pool.num_referenced == 3
    store.release(blocks)
    store.release(held)
    assert store.pool.num_referenced == 0


def test_evictions_without_a_host_tier_and_of_blocks_stored_before_the_tiers(tmp_path):
    store = make_store(2)
    store_tokens(store, TOKENS[: 2 * BLOCK])  # stored before any tier was attached: no origin known
    store.attach_tiers([HostTier(100 * BLOCK_BYTES)])
    store_tokens(store, list(range(500, 500 + 2 * BLOCK)))  # evicts both
    assert len(store.tiers.host) == 0  # nothing to write back: their identity is unknown
    disk_only = make_store(2, disk=tmp_path)
    store_tokens(disk_only, TOKENS[: 2 * BLOCK])
    store_tokens(disk_only, list(range(500, 500 + 2 * BLOCK)))  # evicts both: no host tier to write to
    assert disk_only.tiers.flush(10) and len(list(tmp_path.rglob("*.kvb"))) == 4
    assert disk_only.pool.evictions == 2 and disk_only.tiers.errors == 0


def test_flush_reports_done_with_a_host_tier_and_keeps_its_timeout(tmp_path, monkeypatch):
    assert make_store(4, host=10 * BLOCK_BYTES).tiers.flush(1)
    gate = threading.Event()
    real = disk_module.write_file

    def stuck(path, data, fsync):
        if not gate.wait(3):  # under a flush without its timeout: let the rest through
            gate.set()
        real(path, data, fsync)

    monkeypatch.setattr(disk_module, "write_file", stuck)
    store = make_store(16, disk=tmp_path)
    store_tokens(store, TOKENS)
    started = time.monotonic()
    assert not store.tiers.flush(0.1)  # the writer is stuck: flush gives up after its timeout
    assert time.monotonic() - started < 5
    gate.set()
    assert store.tiers.flush(10)


def test_host_counters_accumulate_across_calls():
    tier = HostTier(2 * BLOCK_BYTES)
    requests, blocks = synthetic_chain(TOKENS)
    ns = tier_ns()
    tier.put(ns, blocks[:1])
    tier.put(ns, blocks[:2])  # block 0 again: skipped, block 1 still stored
    assert len(tier) == 2
    tier.put(ns, blocks[2:])  # evicts one
    tier.put(ns, blocks[2:])
    assert len(tier.get(ns, requests[2:])) == 1
    assert len(tier.get(ns, requests[1:])) == 2
    tier.get(ns, requests[:1])
    tier.get(ns, requests[:1])
    big = synthetic_chain(list(range(BLOCK * 3)))[1]
    too_big = type(big[0])(
        big[0].block_hash, big[0].parent_hash, big[0].tokens, big[0].keys * 3, big[0].values * 3
    )
    tier.put(ns, [too_big, too_big])
    c = tier.counters
    assert (c.puts, c.skipped, c.evictions, c.dropped) == (3, 2, 1, 2)
    assert (c.hits, c.misses) == (3, 2)
    assert c.bytes_read == 3 * BLOCK_BYTES and c.bytes_written == 3 * BLOCK_BYTES


# -- remote ----------------------------------------------------------------------------------------------


def remote(server: RedisServer, **options) -> RemoteTier:
    options.setdefault("min_tokens", 0)
    return RemoteTier(server.url, LAYOUT, **options)


def key(block) -> str:
    return f"hfpc:{tier_ns().hex()}:{block.block_hash.hex()}"


def write(server: RedisServer, blocks, **options) -> None:
    writer = remote(server, **options)
    writer.put(tier_ns(), blocks)
    assert writer.flush(30) and writer.counters.errors == 0
    writer.close()


def test_remote_min_tokens_applies_to_the_hit_not_to_the_request(server):
    requests, blocks = synthetic_chain(TOKENS)
    write(server, blocks[:1])  # the server holds 1 of the 3 requested blocks: a 4-token hit
    short = remote(server, min_tokens=2 * BLOCK)
    assert short.get(tier_ns(), requests) == []
    assert short.counters.below_threshold == 1 and short.counters.bytes_read == 0
    assert short.counters.round_trips == 1  # the EXISTS only, no MGET
    assert len(remote(server, min_tokens=BLOCK).get(tier_ns(), requests)) == 1  # positive control


def test_re_putting_blocks_refreshes_their_ttl(server):
    _, blocks = synthetic_chain(TOKENS)
    write(server, blocks)  # no TTL
    client = server.client()
    assert all(client.pttl(key(block)) == -1 for block in blocks)
    write(server, blocks, ttl=60)  # another process, with a TTL: the blocks are in use, keep them 60 s
    assert all(0 < client.pttl(key(block)) <= 60_000 for block in blocks)
    again = remote(server)  # and one without a TTL re-puts them: no error, the TTL stays
    again.put(tier_ns(), blocks)
    assert again.flush(30) and again.counters.errors == 0 and again.counters.skipped == 3
    assert all(0 < client.pttl(key(block)) <= 60_000 for block in blocks)


def test_blocks_the_server_evicted_are_sent_again(server):
    store = BlockStore(LAYOUT, block_size=BLOCK, num_blocks=8)
    store.attach_tiers([remote(server)])
    store_tokens(store, TOKENS)
    assert store.tiers.flush(30)
    _, blocks = synthetic_chain(TOKENS)
    client = server.client()
    client.delete(key(blocks[1]), key(blocks[2]))  # the server's LRU evicted the tail of the chain
    store.clear()  # the device pool forgets; this process still remembers writing all three
    _, sources, _ = match(store, TOKENS)
    assert sources == ["remote"]  # a partial hit: the lookup learns the rest is gone
    store_tokens(store, TOKENS)
    assert store.tiers.flush(30)
    assert client.exists(key(blocks[1]), key(blocks[2])) == 2, "an evicted block was never sent again"
    store.clear()
    assert match(store, TOKENS)[1] == ["remote"] * 3


def test_after_a_remote_clear_the_same_blocks_are_sent_again(server):
    _, blocks = synthetic_chain(TOKENS)
    tier = remote(server)
    tier.put(tier_ns(), blocks)
    assert tier.flush(30)
    assert tier.clear(tier_ns()) == 3
    tier.put(tier_ns(), blocks)
    assert tier.flush(30)
    assert server.client().exists(*(key(block) for block in blocks)) == 3
    assert tier.counters.puts == 6
    tier.close()


def test_after_a_connection_failure_blocks_are_sent_again_to_a_restarted_server(server):
    _, blocks = synthetic_chain(TOKENS)
    other_requests, _ = synthetic_chain(list(range(70, 70 + 2 * BLOCK)))
    tier = remote(server, backoff_s=0.1)
    tier.put(tier_ns(), blocks)
    assert tier.flush(30) and tier.counters.puts == 3
    server.kill()
    with pytest.warns(TierWarning, match="connection"):
        assert tier.get(tier_ns(), other_requests) == []  # another prompt's lookup meets the dead server
    server.start()  # same port, empty: it lost every block this process wrote
    deadline = time.monotonic() + 30
    while not tier.available():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    tier.put(tier_ns(), blocks)
    assert tier.flush(30)
    assert server.client().exists(*(key(block) for block in blocks)) == 3, "never sent again"
    tier.close()


def test_a_remote_clear_of_one_namespace_keeps_the_others(server):
    requests, blocks = synthetic_chain(TOKENS)
    other_requests, other_blocks = synthetic_chain(TOKENS, namespace="model/other-salt")
    tier = remote(server)
    tier.put(tier_ns(), blocks)
    tier.put(tier_ns("model/other-salt"), other_blocks)
    assert tier.flush(30)
    assert tier.clear(tier_ns()) == 3
    assert tier.get(tier_ns(), requests) == []
    assert len(tier.get(tier_ns("model/other-salt"), other_requests)) == 3
    tier.close()


def test_a_long_remote_chain_is_fetched_in_several_batches(server, monkeypatch):
    requests, blocks = synthetic_chain(TOKENS)
    write(server, blocks)
    monkeypatch.setattr(remote_module, "FETCH_BATCH", 1)  # one MGET per block
    reader = remote(server)
    assert len(reader.get(tier_ns(), requests)) == 3
    assert reader.counters.round_trips == 1 + 3


def test_a_bad_value_deleted_on_read_is_sent_again_by_the_next_store(server):
    requests, blocks = synthetic_chain(TOKENS)
    tier = remote(server)
    tier.put(tier_ns(), blocks)
    assert tier.flush(30)
    client = server.client()
    client.set(key(blocks[1]), b"not an entry")  # damaged on the server
    with pytest.warns(TierWarning):
        assert len(tier.get(tier_ns(), requests)) == 1
    assert client.exists(key(blocks[1])) == 0
    tier.put(tier_ns(), blocks)
    assert tier.flush(30)
    assert client.get(key(blocks[1])) == remote_module.encode(tier_ns(), blocks[1])
    tier.close()


def test_a_block_evicted_between_the_lookup_and_the_fetch_is_forgotten(server, monkeypatch):
    requests, blocks = synthetic_chain(TOKENS)
    tier = remote(server)
    tier.put(tier_ns(), blocks)
    assert tier.flush(30)
    server.client().delete(key(blocks[1]))
    # the EXISTS still saw all three (the server evicted block 1 just after it)
    monkeypatch.setattr(RemoteTier, "contains", lambda self, namespace, hashes: len(hashes))
    assert len(tier.get(tier_ns(), requests)) == 1
    assert not tier.has(tier_ns(), blocks[1].block_hash)  # a later store sends it again
    tier.close()


def test_a_batch_whose_first_block_the_server_holds_sends_the_rest(server):
    _, blocks = synthetic_chain(TOKENS)
    write(server, blocks[:1])  # another process stored block 0
    tier = remote(server)
    tier.put(tier_ns(), blocks)
    assert tier.flush(30)
    assert tier.counters.skipped == 1 and tier.counters.puts == 2
    assert server.client().exists(*(key(block) for block in blocks)) == 3
    tier.close()


def test_a_full_server_is_a_counted_server_error_and_reads_go_on(server):
    requests, blocks = synthetic_chain(TOKENS)
    write(server, blocks[:1])
    client = server.client()
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1")  # every write is refused: OOM
    try:
        tier = remote(server)
        with pytest.warns(TierWarning, match="server"):
            tier.put(tier_ns(), blocks[1:])
            assert tier.flush(30)
        assert tier.counters.error_kinds == {"server": 1} and tier.counters.dropped == 2
        assert tier.available()  # not a connection failure: no back-off
        assert len(tier.get(tier_ns(), requests)) == 1
    finally:
        client.config_set("maxmemory-policy", "allkeys-lru")
        client.config_set("maxmemory", server.maxmemory)


def test_the_back_off_starts_again_after_a_recovery(server):
    requests, blocks = synthetic_chain(TOKENS)
    write(server, blocks)
    tier = remote(server, backoff_s=0.1)
    for round_ in range(2):  # fail, recover; fail again, recover again
        server.kill()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TierWarning)
            assert tier.get(tier_ns(), requests) == []
        assert tier._delay == 0.2  # doubled for the next failure
        server.start()
        write(server, blocks)
        deadline = time.monotonic() + 30
        while not tier.available():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert len(tier.get(tier_ns(), requests)) == 3
        assert tier._delay == 0.1, "a success resets the back-off"
        assert tier.counters.error_kinds == {"connection": round_ + 1}
    tier.close()


def test_an_unexpected_writer_failure_is_counted_and_the_next_put_goes_through(server, monkeypatch):
    _, blocks = synthetic_chain(TOKENS)
    tier = remote(server)

    def broken(namespace, block):
        raise RuntimeError("encoder bug")

    monkeypatch.setattr(remote_module, "encode", broken)
    with pytest.warns(TierWarning, match="writer"):
        tier.put(tier_ns(), blocks)
        assert tier.flush(30)
    assert tier.counters.error_kinds == {"writer": 1} and tier.counters.puts == 0
    monkeypatch.undo()
    tier.put(tier_ns(), blocks)  # the retry: nothing was remembered as sent
    assert tier.flush(30) and tier.counters.puts == 3
    assert server.client().exists(*(key(block) for block in blocks)) == 3
    tier.close()


# -- the store -------------------------------------------------------------------------------------------
def _write_recording(store, tokens, positions_seen):
    kv = slot_values(tokens, 1.0)

    def write(positions, block_ids):
        positions_seen.append(list(positions))
        index = torch.tensor([p * BLOCK + i for p in positions for i in range(BLOCK)])
        for layer in range(len(LAYOUT)):
            store.kv.write(layer, block_ids, kv[:, index], kv[:, index])

    return write


def test_storing_a_prefix_again_writes_only_its_new_blocks():
    store = make_store(8)
    tokens = list(range(10, 10 + 3 * BLOCK))
    hashes = hashing.hash_blocks(hashing.root_hash(NAMESPACE), tokens, BLOCK)
    seen: list[list[int]] = []
    store.release(
        store.extend_chain(
            NAMESPACE, tokens[: 2 * BLOCK], hashes[:2], [], _write_recording(store, tokens, seen)
        )
    )
    chain = store.extend_chain(NAMESPACE, tokens, hashes, [], _write_recording(store, tokens, seen))
    assert seen == [[0, 1], [2]], "blocks already stored must be reused, not written again"
    assert len(chain) == 3 and store.pool.num_cached == 3
    store.release(chain)
    held, _, _ = match(store, tokens[: 2 * BLOCK], keep=True)  # a partial hit, then the rest of the prompt
    chain = store.extend_chain(NAMESPACE, tokens, hashes, held, _write_recording(store, tokens, seen))
    assert chain[:2] == held and len(chain) == 3 and seen[-1] == [2]
    store.release(chain)
    assert store.pool.num_referenced == 0


def test_a_store_cut_short_by_a_full_pool_keeps_what_fit():
    store = make_store(2)
    tokens = list(range(10, 10 + 3 * BLOCK))
    store_tokens(store, tokens)  # 3 blocks, room for 2
    assert store.pool.num_cached == 2 and store.pool.num_referenced == 0
    _, _, keys = match(store, tokens)
    assert torch.equal(keys, slot_values(tokens, 1.0)[:, : 2 * BLOCK])


def test_an_interrupt_during_a_tier_lookup_leaves_no_reference(monkeypatch):
    store = make_store(8, host=100 * BLOCK_BYTES)
    store_tokens(store, TOKENS[: 2 * BLOCK])
    store.tiers.host.put(tier_ns(), synthetic_chain(TOKENS)[1])

    def interrupted(namespace, requests):
        raise KeyboardInterrupt

    monkeypatch.setattr(store.tiers.host, "get", interrupted)
    with pytest.raises(KeyboardInterrupt):
        match(store, TOKENS)  # two device hits, then the host lookup is interrupted
    assert store.pool.num_referenced == 0
    monkeypatch.undo()
    assert match(store, TOKENS)[1] == ["device", "device", "host"]  # the retry


# -- the cache -------------------------------------------------------------------------------------------
def test_clear_releases_the_per_call_layer_buffers():
    model = tiny_model("llama")
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    model.generate(random_ids(30, seed=3), max_new_tokens=3, do_sample=False, **{CACHE_KWARG: cache})
    full = [layer for layer in cache.layers if isinstance(layer, PrefixFullLayer)]
    assert full and all(layer._key_buffer is not None for layer in full)  # kept for the next call
    cache.clear()
    assert all(layer._key_buffer is None and layer._value_buffer is None for layer in full)


def test_reset_stats_zeroes_the_hits_by_tier():
    model = tiny_model("llama")
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    prompt = random_ids(30, seed=4)
    for _ in range(2):
        model.generate(prompt, max_new_tokens=2, do_sample=False, **{CACHE_KWARG: cache})
    assert cache.stats.hit_tokens_by_tier == {"device": 28}
    cache.reset_stats()
    assert cache.stats.hit_tokens_by_tier == {"device": 0} and cache.stats.hit_tokens == 0


def test_storing_again_after_clear_commits_no_new_memory():
    store = make_store(16)
    store_tokens(store, TOKENS)
    committed = store.committed_bytes
    assert committed == 3 * store.kv.block_bytes()
    store.clear()
    store_tokens(store, TOKENS)  # the same blocks' pages, written a second time
    assert store.committed_bytes == committed


def test_clear_of_a_stack_without_a_host_tier(tmp_path):
    store = make_store(8, disk=tmp_path)  # a stack without a host tier
    store_tokens(store, TOKENS)
    assert store.tiers.flush(10)
    assert store.tiers.clear(tier_ns()) == {"disk": 3}
    assert HostTier(BLOCK_BYTES).clear() == 0
