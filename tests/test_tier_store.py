"""Host and disk tiers behind the block store, without a model: write-back, write-through, promotion,
LRU by bytes, size limits, the bounded writer queue, and every failure turned into a counted miss."""

from __future__ import annotations

import errno
import threading
import warnings

import pytest
import torch
from support.tiers import (
    BLOCK,
    LAYOUT,
    make_store,
    match,
    slot_values,
    store_tokens,
    synthetic_chain,
    tier_ns,
)

from hf_prefix_cache.tiers import DiskTier, HostTier, TierWarning
from hf_prefix_cache.tiers import disk as disk_module

TOKENS = list(range(10, 10 + 6 * BLOCK))  # 6 full blocks
BLOCK_BYTES = sum(layout.block_bytes(BLOCK) for layout in LAYOUT)


def expected_keys(tokens, blocks: int, value: float = 1.0) -> torch.Tensor:
    return slot_values(tokens, value)[:, : blocks * BLOCK]


# -- host tier -------------------------------------------------------------------------------------------
def test_device_evictions_are_written_back_to_host_and_promoted_exactly():
    store = make_store(2, host=100 * BLOCK_BYTES)
    store_tokens(store, TOKENS[: 2 * BLOCK])
    other = list(range(500, 500 + 2 * BLOCK))
    store_tokens(store, other, value=-1.0)  # the pool holds 2 blocks: the first chain goes to host
    assert len(store.tiers.host) == 2 and store.tiers.host.counters.puts == 2
    _, sources, keys = match(store, TOKENS[: 2 * BLOCK])
    assert sources == ["host", "host"]
    assert torch.equal(keys, expected_keys(TOKENS, 2))
    assert store.pool.num_referenced == 0
    _, sources, keys = match(store, other)  # and the promotion pushed the other chain down
    assert sources == ["host", "host"] and torch.equal(keys, expected_keys(other, 2, -1.0))


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "per_layer"])
def test_promotion_takes_whole_packed_blocks_or_per_layer_lists_exactly(packed):
    """A tier's block comes with the entry's packed tensor (one copy per block) or, from a tier that
    has only per-layer lists, goes in layer by layer: the same K/V either way."""
    store = make_store(2, host=100 * BLOCK_BYTES)
    store_tokens(store, TOKENS[: 2 * BLOCK])
    store_tokens(store, list(range(500, 500 + 2 * BLOCK)), value=-1.0)  # the first chain goes to host
    entries = list(store.tiers.host._entries.values())
    assert len(entries) == 2 and all(store.kv.fits_packed(entry.packed) for entry in entries)
    if not packed:
        for entry in entries:
            entry.keys, entry.values = list(entry.keys), list(entry.values)
            entry.packed = None
    _, sources, keys = match(store, TOKENS[: 2 * BLOCK])
    assert sources == ["host", "host"] and torch.equal(keys, expected_keys(TOKENS, 2))
    assert store.pool.num_referenced == 0


def test_a_chain_continues_from_device_into_host():
    store = make_store(4, host=100 * BLOCK_BYTES)
    store_tokens(store, TOKENS[: 4 * BLOCK])  # blocks 0-3 in the pool
    other = list(range(500, 500 + 2 * BLOCK))
    store_tokens(store, other)  # evicts blocks 3 and 2 (tail first) to host
    _blocks, sources, keys = match(store, TOKENS[: 4 * BLOCK])
    assert sources == ["device", "device", "host", "host"]
    assert torch.equal(keys, expected_keys(TOKENS, 4))


def test_promotion_respects_references_and_capacity():
    store = make_store(3, host=100 * BLOCK_BYTES)
    store_tokens(store, TOKENS[: 3 * BLOCK])
    held, _, _ = match(store, list(range(700, 700 + 3 * BLOCK)), keep=True)  # nothing: stores nothing
    assert held == []
    held = store.extend_chain(
        "model/salt",
        list(range(700, 700 + 3 * BLOCK)),
        _hashes(list(range(700, 700 + 3 * BLOCK))),
        [],
        _zeros,
    )  # three referenced blocks: the first chain went to host
    assert store.pool.num_referenced == 3 and len(store.tiers.host) == 3
    blocks, sources, _ = match(store, TOKENS[: 3 * BLOCK])
    assert blocks == [] and sources == []  # no free block to promote into: a miss, nothing overwritten
    store.release(held)
    assert store.pool.num_referenced == 0
    blocks, sources, keys = match(store, TOKENS[: 3 * BLOCK])
    assert sources == ["host"] * 3 and torch.equal(keys, expected_keys(TOKENS, 3))


def test_a_failed_promotion_copy_is_a_counted_miss_and_the_next_call_is_exact(monkeypatch):
    """The copy into the pool fails halfway (one block written): nothing stays referenced or cached,
    and the next lookup promotes the same blocks again, exactly."""
    from hf_prefix_cache.kv_pool import KVPool

    store = make_store(2, host=100 * BLOCK_BYTES)
    store_tokens(store, TOKENS[: 2 * BLOCK])
    store_tokens(store, list(range(500, 500 + 2 * BLOCK)), value=-1.0)  # the first chain goes to host
    write_packed = KVPool.write_packed

    def fails_after_the_first_block(self, block_ids, blocks):
        write_packed(self, block_ids[:1], blocks[:1])
        raise RuntimeError("copy failed")

    monkeypatch.setattr(KVPool, "write_packed", fails_after_the_first_block)
    with pytest.warns(TierWarning, match="could not copy"):
        blocks, sources, _ = match(store, TOKENS[: 2 * BLOCK])
    assert blocks == [] and sources == [] and store.tiers.errors == 1
    assert store.pool.num_referenced == 0
    monkeypatch.undo()
    _, sources, keys = match(store, TOKENS[: 2 * BLOCK])
    assert sources == ["host", "host"] and torch.equal(keys, expected_keys(TOKENS, 2))
    assert store.pool.num_referenced == 0


def _hashes(tokens):
    from hf_prefix_cache import hashing

    return hashing.hash_blocks(hashing.root_hash("model/salt"), tokens, BLOCK)


def _zeros(positions, block_ids):
    return None


def test_host_tier_is_lru_by_bytes():
    tier = HostTier(2 * BLOCK_BYTES)
    requests, blocks = synthetic_chain(TOKENS[: 3 * BLOCK])
    ns = tier_ns()
    tier.put(ns, blocks[:2])
    assert tier.get(ns, requests[:1])  # block 0 is now the most recent
    tier.put(ns, blocks[2:])
    assert tier.used <= tier.capacity and tier.counters.evictions == 1
    assert tier.has(ns, blocks[0].block_hash) and not tier.has(ns, blocks[1].block_hash)
    assert tier.get(ns, requests) == blocks[:1]  # stops at the first missing block


def test_host_hits_are_verified_against_parent_and_tokens():
    tier = HostTier(10 * BLOCK_BYTES)
    requests, blocks = synthetic_chain(TOKENS[: 2 * BLOCK])
    ns = tier_ns()
    tier.put(ns, blocks)
    wrong = [type(requests[0])(requests[0].block_hash, requests[0].parent_hash, (1, 2, 3, 4))]
    assert tier.get(ns, wrong) == []
    assert tier.get(tier_ns("other/salt"), requests) == []
    assert len(tier.get(ns, requests)) == 2


# -- disk tier -------------------------------------------------------------------------------------------
def test_disk_write_through_survives_a_new_store(tmp_path):
    first = make_store(16, disk=tmp_path)
    store_tokens(first, TOKENS)
    assert first.tiers.flush(10)
    entries = sorted(tmp_path.rglob("*.kvb"))
    assert len(entries) == 6
    second = make_store(16, disk=tmp_path)  # a new store, as after a restart
    _blocks, sources, keys = match(second, TOKENS)
    assert sources == ["disk"] * 6 and torch.equal(keys, expected_keys(TOKENS, 6))
    # the paths are deterministic: namespace digest / hash
    assert entries[0].parent.parent.name == tier_ns().hex()


def test_blocks_already_on_disk_are_not_written_again(tmp_path):
    first = make_store(16, disk=tmp_path)
    store_tokens(first, TOKENS)
    first.tiers.flush(10)
    second = make_store(16, disk=tmp_path)
    store_tokens(second, TOKENS)
    second.tiers.flush(10)
    disk = second.tiers.tiers[0]
    assert disk.counters.puts == 0 and disk.counters.skipped + disk.counters.dropped == 0
    assert first.tiers.tiers[0].counters.puts == 6


def test_host_and_disk_together_continue_the_chain_in_order(tmp_path):
    store = make_store(16, disk=tmp_path)
    store_tokens(store, TOKENS)  # disk holds all 6 blocks
    store.tiers.flush(10)
    fresh = make_store(6, host=2 * BLOCK_BYTES, disk=tmp_path)
    fresh.tiers.tiers[0].put(tier_ns(), synthetic_chain(TOKENS)[1][:2])
    _blocks, sources, keys = match(fresh, TOKENS)
    assert sources == ["host", "host", "disk", "disk", "disk", "disk"]
    assert torch.equal(keys, expected_keys(TOKENS, 6))


def test_a_full_write_queue_drops_and_counts_without_blocking(tmp_path, monkeypatch):
    gate = threading.Event()
    real = disk_module.write_file

    def slow(path, data, fsync):
        gate.wait(10)
        real(path, data, fsync)

    monkeypatch.setattr(disk_module, "write_file", slow)
    tier = DiskTier(tmp_path, LAYOUT, max_queued_blocks=1)
    _, blocks = synthetic_chain(TOKENS)
    tier.put(tier_ns(), blocks)  # returns at once: 1 in the writer, 1 queued, 4 dropped
    assert tier.counters.dropped >= 4
    assert not tier.flush(0.05)
    gate.set()
    assert tier.flush(10)
    assert tier.counters.puts == 6 - tier.counters.dropped
    tier.close()


def test_disk_size_evicts_least_recently_used_entries(tmp_path):
    requests, blocks = synthetic_chain(TOKENS)
    entry_bytes = len(disk_module.encode(tier_ns(), blocks[0]))
    tier = DiskTier(tmp_path, LAYOUT, size=3 * entry_bytes + 10, fsync=False)
    ns = tier_ns()
    tier.put(ns, blocks[:3])
    tier.flush(10)
    import os
    import time

    old = time.time() - 100
    for index, path in enumerate(sorted(tier.path(ns, b.block_hash) for b in blocks[:3])):
        os.utime(path, (old + index, old + index))
    assert len(tier.get(ns, requests[:1])) == 1  # a hit touches block 0: now the most recent
    tier.put(ns, blocks[3:5])
    tier.flush(10)
    assert tier.used_bytes() <= tier.size
    assert tier.counters.evictions >= 2
    assert tier.path(ns, blocks[0].block_hash).exists()  # recently used survives
    assert tier.path(ns, blocks[4].block_hash).exists()
    tier.close()


# -- failures: every one a counted miss, never an exception ------------------------------------------------
def _filled(tmp_path):
    first = make_store(16, disk=tmp_path)
    store_tokens(first, TOKENS)
    first.tiers.flush(10)
    return sorted(tmp_path.rglob("*.kvb"), key=lambda p: _position(p))


def _position(path):
    return [h.hex() for h in _hashes(TOKENS)].index(path.stem)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "foreign_namespace", "future_version"])
def test_damaged_entries_are_a_counted_miss_and_deleted(tmp_path, damage):
    entries = _filled(tmp_path)
    bad = entries[3]
    data = bytearray(bad.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0x10
    elif damage == "empty":
        data = bytearray()
    elif damage == "foreign_namespace":
        other = make_store(16, disk=tmp_path / "other")
        store_tokens(other, TOKENS, namespace="other-model/salt")
        other.tiers.flush(10)
        foreign = [p for p in (tmp_path / "other").rglob("*.kvb")]
        data = bytearray(foreign[0].read_bytes())
    elif damage == "future_version":
        data[8:10] = (99).to_bytes(2, "little")
    bad.write_bytes(bytes(data))
    store = make_store(16, disk=tmp_path)
    with pytest.warns(TierWarning):
        _blocks, sources, keys = match(store, TOKENS)
    assert sources == ["disk"] * 3  # a shorter hit, never a wrong one
    assert torch.equal(keys, expected_keys(TOKENS, 3))
    assert store.tiers.errors == 1 and not bad.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shown once: a second bad entry of the same kind is silent
        entries[4].write_bytes(bytes(data))
        match(store, TOKENS)


def test_a_folder_that_cannot_be_made_turns_the_tier_off(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.warns(TierWarning, match="cannot use the folder"):
        store = make_store(16, disk=blocker / "kv")  # a path under a file: mkdir fails, even as root
    store_tokens(store, TOKENS)
    assert store.tiers.flush(1)
    _blocks, _sources, _ = match(make_store(16), TOKENS)
    assert store.tiers.errors == 1 and store.tiers.tiers[0].counters.dropped == 6


def test_a_missing_folder_is_created(tmp_path):
    store = make_store(16, disk=tmp_path / "new" / "kv")
    store_tokens(store, TOKENS)
    assert store.tiers.flush(10) and len(list((tmp_path / "new" / "kv").rglob("*.kvb"))) == 6


@pytest.mark.parametrize(
    "code, kind", [(errno.ENOSPC, "disk full"), (errno.EROFS, "read-only"), (errno.EACCES, "read-only")]
)
def test_write_failures_are_counted_and_leave_no_entry(tmp_path, monkeypatch, code, kind):
    """A full disk or read-only folder, simulated (as root, chmod does not stop writes)."""
    real = disk_module.write_file

    def failing(path, data, fsync):
        with open(path, "xb") as handle:
            handle.write(data[: len(data) // 2])  # a partial temp file, then the error
        raise OSError(code, "simulated")

    monkeypatch.setattr(disk_module, "write_file", failing)
    store = make_store(16, disk=tmp_path)
    with pytest.warns(TierWarning, match=kind):
        store_tokens(store, TOKENS)
        store.tiers.flush(10)
    disk = store.tiers.tiers[0]
    assert disk.counters.errors == 6 and disk.counters.error_kinds == {kind: 6}
    assert list(tmp_path.rglob("*.kvb")) == [] and list(tmp_path.rglob("*.tmp")) == []
    monkeypatch.setattr(disk_module, "write_file", real)
    store_tokens(store, list(range(300, 300 + 2 * BLOCK)))  # the writer lives on
    assert store.tiers.flush(10) and disk.counters.puts == 2


def test_the_writer_survives_unexpected_exceptions(tmp_path, monkeypatch):
    calls = []

    def broken(namespace, block):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(namespace, block)

    real = disk_module.encode
    monkeypatch.setattr(disk_module, "encode", broken)
    tier = DiskTier(tmp_path, LAYOUT)
    _, blocks = synthetic_chain(TOKENS[: 2 * BLOCK])
    with pytest.warns(TierWarning, match="write failed"):
        tier.put(tier_ns(), blocks)
        assert tier.flush(10)
    assert tier.counters.errors == 1 and tier.counters.puts == 1
    tier.close()


def test_a_read_error_is_a_counted_miss(tmp_path):
    entries = _filled(tmp_path)
    entries[2].unlink()
    entries[2].mkdir()  # opening a folder as a file: IsADirectoryError, an OSError
    store = make_store(16, disk=tmp_path)
    with pytest.warns(TierWarning, match="cannot read"):
        _blocks, sources, _ = match(store, TOKENS)
    assert sources == ["disk", "disk"] and store.tiers.errors == 1


def test_clear_removes_this_namespace_from_every_tier(tmp_path):
    store = make_store(16, host=100 * BLOCK_BYTES, disk=tmp_path)
    store_tokens(store, TOKENS)
    store_tokens(store, TOKENS, namespace="other/salt")
    store.tiers.host.put(tier_ns(), synthetic_chain(TOKENS)[1])
    store.tiers.flush(10)
    removed = store.tiers.clear(tier_ns())
    assert removed == {"host": 6, "disk": 6}
    assert len(store.tiers.host) == 0
    assert len(list(tmp_path.rglob("*.kvb"))) == 6  # the other namespace stays on disk
    store.clear()
    assert match(store, TOKENS)[0] == []
