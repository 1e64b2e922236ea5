"""Who may write the shared tiers: with a ``tier_secret`` every disk and Redis entry carries a MAC, and an
entry forged by someone who can write the folder or the server (K/V replaced, checksum recomputed with
the library's own encoder) is a counted miss and is deleted; a correctly tagged entry hits exactly.
Entries of another secret, or of none, are never read as valid. The secret never shows."""

from __future__ import annotations

import pickle
import struct
import warnings

import pytest
import torch
from support.exact import assert_same_output, greedy, run
from support.models import random_ids
from support.tiers import BLOCK, LAYOUT, synthetic_chain, tier_ns

from hf_prefix_cache import PrefixCache
from hf_prefix_cache.tiers import BlockData, DiskTier, TierWarning, encode
from hf_prefix_cache.tiers import entry as entry_module
from hf_prefix_cache.tiers.entry import HEADER
from hf_prefix_cache.tiers.remote import RemoteTier

TierKey = getattr(entry_module, "TierKey", None)  # looked up so that older code fails test by test
SECRET = "trust-test-secret-0123456789abcdef"
OTHER = "another-secret-0123456789abcdef!"


def forge(data: bytes) -> bytes:
    """What anyone who can write the store can do without the secret: keep the identity (namespace, hash,
    parent, tokens, all in the header), replace the K/V, and encode with the library's own encoder."""
    fields = HEADER.unpack_from(data)
    n_tokens, n_layers, namespace, block_hash, parent = fields[3], fields[4], fields[5], fields[6], fields[7]
    tokens = struct.unpack_from(f"<{n_tokens}q", data, HEADER.size)
    table = entry_module.LAYER
    keys = []
    for layer in range(n_layers):
        heads, head_dim, dtype = table.unpack_from(data, HEADER.size + 8 * n_tokens + layer * table.size)
        dtype = getattr(torch, dtype.rstrip(b"\0").decode().removeprefix("torch."))
        keys.append(torch.full((heads, n_tokens, head_dim), 3.0, dtype=dtype))
    return encode(namespace, BlockData(block_hash, parent, tokens, keys, keys))


def disk_cache(model, folder, **options):
    return PrefixCache(model, block_size=BLOCK, num_blocks=64, disk=folder, **options)


def remote_cache(model, server, **options):
    return PrefixCache(
        model, block_size=BLOCK, num_blocks=64, remote=server.url, remote_min_tokens=0, **options
    )


# -- the disk tier, end to end -------------------------------------------------------------------------
def test_a_forged_disk_entry_is_a_counted_miss_with_a_secret_and_tagged_entries_hit_exactly(model, tmp_path):
    prompt = random_ids(30, seed=11)
    expected = greedy(model, prompt)
    writer = disk_cache(model, tmp_path, tier_secret=SECRET)
    assert_same_output(expected, run(model, writer, prompt))
    assert writer.flush(30)
    files = sorted(tmp_path.rglob("*.kvb"))
    assert len(files) == 9  # 30 prompt + 8 reply tokens: 9 full blocks

    reader = disk_cache(model, tmp_path, tier_secret=SECRET)  # a new process: its own empty pool
    assert_same_output(expected, run(model, reader, prompt))
    assert reader.last_call.hit_tokens_by_tier.get("disk", 0) == 28 and reader.stats.tier_errors == 0

    forged = {path: forge(path.read_bytes()) for path in files}  # forged K/V under valid checksums
    for path, data in forged.items():
        path.write_bytes(data)
    victim = disk_cache(model, tmp_path, tier_secret=SECRET)
    with pytest.warns(TierWarning, match="mac"):
        assert_same_output(expected, run(model, victim, prompt))
    assert victim.last_call.hit_tokens == 0
    assert victim.stats.tier_errors == 1 and victim.stats.tiers["disk"]["error_kinds"] == {"mac": 1}
    assert victim.flush(30)
    # The lookup stopped at the chain's first (forged) entry: it was deleted, so the victim's write-through
    # stored a real one there; the rest still exist (writes skip them) and fail the same way when read.
    assert sum(path.read_bytes() != data for path, data in forged.items()) == 1


def test_without_a_secret_a_forged_disk_entry_is_served(model, tmp_path):
    """The threat itself (why tier_secret exists): a recomputed checksum passes every check."""
    prompt = random_ids(30, seed=12)
    writer = disk_cache(model, tmp_path)
    run(model, writer, prompt)
    assert writer.flush(30)
    for path in tmp_path.rglob("*.kvb"):
        path.write_bytes(forge(path.read_bytes()))
    reader = disk_cache(model, tmp_path)
    run(model, reader, prompt)
    assert reader.last_call.hit_tokens == 28 and reader.stats.tier_errors == 0


# -- the remote tier, end to end -----------------------------------------------------------------------
def test_a_forged_redis_value_is_a_counted_miss_and_deleted_and_tagged_values_hit_exactly(model, server):
    prompt = random_ids(30, seed=13)
    expected = greedy(model, prompt)
    writer = remote_cache(model, server, tier_secret=SECRET)
    run(model, writer, prompt)
    assert writer.flush(30)
    client = server.client()
    keys = sorted(client.keys("hfpc:*"))
    assert len(keys) == 9

    reader = remote_cache(model, server, tier_secret=SECRET)
    assert_same_output(expected, run(model, reader, prompt))
    assert reader.last_call.hit_tokens_by_tier.get("remote", 0) == 28 and reader.stats.tier_errors == 0

    forged = {key: forge(client.get(key)) for key in keys}
    for key, value in forged.items():
        client.set(key, value)
    victim = remote_cache(model, server, tier_secret=SECRET)
    with pytest.warns(TierWarning, match="mac"):
        assert_same_output(expected, run(model, victim, prompt))
    assert victim.last_call.hit_tokens == 0
    assert victim.stats.tiers["remote"]["error_kinds"] == {"mac": 1} and victim.stats.tier_errors == 1
    assert victim.flush(30)
    assert sum(client.get(key) != value for key, value in forged.items()) == 1  # deleted, then stored anew


# -- wrong secret, no secret, and the tier level -------------------------------------------------------
def _stored(tier, blocks):
    tier.put(tier_ns(), blocks)
    assert tier.flush(30) and tier.counters.errors == 0


@pytest.mark.parametrize(
    "written, read",
    [(SECRET, OTHER), (SECRET, None), (None, SECRET)],
    ids=["another-secret", "reader-without-secret", "unkeyed-entry-read-with-secret"],
)
def test_an_entry_of_another_secret_or_none_is_a_counted_miss_and_deleted_on_disk(tmp_path, written, read):
    requests, blocks = synthetic_chain(list(range(10, 10 + 2 * BLOCK)))
    key_of = {None: None, SECRET: TierKey(SECRET), OTHER: TierKey(OTHER)}
    _stored(DiskTier(tmp_path, LAYOUT, key=key_of[written]), blocks)
    reader = DiskTier(tmp_path, LAYOUT, key=key_of[read])
    with pytest.warns(TierWarning, match="mac"):
        assert reader.get(tier_ns(), requests) == []
    assert reader.counters.error_kinds == {"mac": 1} and reader.counters.misses == 1
    assert not reader.path(tier_ns(), blocks[0].block_hash).exists(), "the bad entry is deleted"
    same = DiskTier(tmp_path, LAYOUT, key=key_of[written])
    assert len(same.get(tier_ns(), requests[1:])) == 1  # the next block, untouched, still verifies


@pytest.mark.parametrize("forged", ["recomputed-checksum", "mac-flag-with-checksum", "flipped-kv"])
def test_a_forged_value_on_redis_is_a_miss_for_a_reader_with_the_secret(server, forged):
    requests, blocks = synthetic_chain(list(range(10, 10 + 2 * BLOCK)))
    _stored(RemoteTier(server.url, LAYOUT, min_tokens=0, key=TierKey(SECRET)), blocks)
    client = server.client()
    name = f"hfpc:{tier_ns().hex()}:{blocks[0].block_hash.hex()}"
    value = bytearray(client.get(name))
    if forged == "recomputed-checksum":
        value = bytearray(forge(bytes(value)))
    elif forged == "mac-flag-with-checksum":  # claims a MAC, carries only a checksum
        value = bytearray(forge(bytes(value)))
        struct.pack_into("<H", value, 10, entry_module.FLAG_MAC)
    else:
        value[-3] ^= 0x10
    client.set(name, bytes(value))
    reader = RemoteTier(server.url, LAYOUT, min_tokens=0, key=TierKey(SECRET))
    with pytest.warns(TierWarning, match="mac"):
        assert reader.get(tier_ns(), requests) == []
    assert reader.counters.error_kinds == {"mac": 1}
    assert client.exists(name) == 0, "the forged value is deleted"
    reader.close()


def test_keyed_entries_round_trip_and_differ_from_unkeyed_ones():
    _, blocks = synthetic_chain(list(range(10, 10 + BLOCK)))
    keyed = encode(tier_ns(), blocks[0], TierKey(SECRET))
    plain = encode(tier_ns(), blocks[0])
    assert len(keyed) == len(plain) and keyed != plain
    assert keyed != encode(tier_ns(), blocks[0], TierKey(OTHER))
    assert entry_module.FORMAT_VERSION == 4  # a new version: version-3 readers miss, never misread


# -- the secret itself ---------------------------------------------------------------------------------
def test_the_secret_never_shows_and_comes_from_the_environment(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_PREFIX_CACHE_TIER_SECRET", SECRET)
    cache = disk_cache(model, tmp_path)
    disk = cache.store.tiers.tiers[0]
    assert isinstance(disk.mac_key, TierKey)
    run(model, cache, random_ids(20, seed=14))
    assert cache.flush(30)
    shown = [repr(disk.mac_key), str(disk.mac_key), repr(cache.stats), str(cache.stats.tiers), repr(disk)]
    assert not any(SECRET in text for text in shown)
    with pytest.raises(TypeError):
        pickle.dumps(disk.mac_key)
    monkeypatch.delenv("HF_PREFIX_CACHE_TIER_SECRET")
    reader = disk_cache(model, tmp_path)  # no secret now: the keyed entries are misses
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TierWarning)
        run(model, reader, random_ids(20, seed=14))
    assert reader.last_call.hit_tokens == 0 and reader.stats.tiers["disk"]["error_kinds"] == {"mac": 1}


def test_a_bad_secret_or_one_without_a_shared_tier_is_refused_without_showing_it(model, tmp_path):
    with pytest.raises(ValueError, match="at least 16") as error:
        disk_cache(model, tmp_path, tier_secret="short-secret")
    assert "short-secret" not in str(error.value)
    with pytest.raises(ValueError, match="also pass disk="):
        PrefixCache(model, block_size=BLOCK, num_blocks=64, tier_secret=SECRET)
    with pytest.raises(ValueError, match="also pass disk="):
        PrefixCache(model, block_size=BLOCK, num_blocks=64, host_memory="1MiB", tier_secret=SECRET)
    with pytest.raises(TypeError, match="str or bytes"):
        disk_cache(model, tmp_path, tier_secret=12345678901234567890)
