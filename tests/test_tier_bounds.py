"""Bounded verification: an entry whose size is not this layout's entry size is rejected before any
checksum or MAC work, so a huge or sparse file (or value) with a consistent header costs a ``stat`` or a
length check, not a pass over its bytes. Checked by counting calls, never by timing."""

from __future__ import annotations

import mmap
import struct

import pytest
from support.redis_server import RedisServer
from support.tiers import BLOCK, LAYOUT, synthetic_chain, tier_ns

from hf_prefix_cache.tiers import DiskTier, EntryError, TierWarning, decode, encode
from hf_prefix_cache.tiers import entry as entry_module
from hf_prefix_cache.tiers.entry import HEADER
from hf_prefix_cache.tiers.remote import RemoteTier

HUGE = 8 << 30  # 8 GiB, sparse: no disk space is used
PAYLOAD_LEN_AT = HEADER.size - 16 - 8


@pytest.fixture
def hashing_calls(monkeypatch):
    """Counts every checksum and MAC computation (without doing the work); clear it after the set-up."""
    calls = []
    monkeypatch.setattr(entry_module, "_checksum", lambda parts: calls.append("checksum") or bytes(16))
    monkeypatch.setattr(
        entry_module, "_mac", lambda key, parts: calls.append("mac") or bytes(16), raising=False
    )
    return calls


def consistent_huge(entry: bytes, total: int) -> bytes:
    """The header of ``entry`` with its payload length stretched so the header agrees with ``total``."""
    header = bytearray(entry[: len(entry) - struct.unpack_from("<Q", entry, PAYLOAD_LEN_AT)[0]])
    struct.pack_into("<Q", header, PAYLOAD_LEN_AT, total - len(header))
    return bytes(header)


def sparse_file(path, entry: bytes, total: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(consistent_huge(entry, total))
        handle.truncate(total)


def test_the_exact_sizes_of_real_entries_lie_within_the_bounds():
    _, blocks = synthetic_chain(list(range(10, 10 + BLOCK)))
    low, high = entry_module.size_bounds(BLOCK, LAYOUT)
    for key in (None, entry_module.TierKey("a-secret-of-sixteen-bytes")):
        assert low < len(encode(tier_ns(), blocks[0], key)) <= high
    assert high - low < 8192  # only the safetensors header's length may vary


@pytest.mark.parametrize("keyed", [False, True], ids=["checksum", "mac"])
def test_a_huge_sparse_entry_file_is_rejected_from_its_size_without_checksum_work(
    tmp_path, hashing_calls, keyed
):
    requests, blocks = synthetic_chain(list(range(10, 10 + 2 * BLOCK)))
    options = {"key": entry_module.TierKey("a-secret-of-sixteen-bytes")} if keyed else {}
    tier = DiskTier(tmp_path, LAYOUT, **options)
    path = tier.path(tier_ns(), blocks[0].block_hash)
    sparse_file(path, encode(tier_ns(), blocks[0]), HUGE)
    assert path.stat().st_size == HUGE
    hashing_calls.clear()  # count from here: the set-up encoded an entry
    with pytest.warns(TierWarning, match="size"):
        assert tier.get(tier_ns(), requests) == []
    assert hashing_calls == []
    assert tier.counters.error_kinds == {"size": 1} and tier.counters.misses == 1
    assert not path.exists(), "the bad entry is deleted"


def test_decode_rejects_a_huge_consistent_entry_before_any_checksum_work(tmp_path, hashing_calls):
    """What the remote tier's values and a mapped file meet: the check is in decode itself."""
    requests, blocks = synthetic_chain(list(range(10, 10 + BLOCK)))
    path = tmp_path / "huge.kvb"
    sparse_file(path, encode(tier_ns(), blocks[0]), HUGE)
    hashing_calls.clear()
    with (
        open(path, "rb") as handle,
        mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data,
        pytest.raises(EntryError) as error,
    ):
        decode(data, tier_ns(), requests[0], LAYOUT)
    assert error.value.kind == "size" and hashing_calls == []


def test_a_big_consistent_value_on_redis_is_rejected_without_checksum_work(tmp_path, hashing_calls):
    requests, blocks = synthetic_chain(list(range(10, 10 + 2 * BLOCK)))
    with RedisServer(tmp_path / "redis") as server:
        name = f"hfpc:{tier_ns().hex()}:{blocks[0].block_hash.hex()}"
        client = server.client()
        header = consistent_huge(encode(tier_ns(), blocks[0]), 8 << 20)
        client.set(name, header + bytes((8 << 20) - len(header)))
        reader = RemoteTier(server.url, LAYOUT, min_tokens=0, timeout=5)
        hashing_calls.clear()
        with pytest.warns(TierWarning, match="size"):
            assert reader.get(tier_ns(), requests) == []
        assert hashing_calls == [] and reader.counters.error_kinds == {"size": 1}
        assert client.exists(name) == 0
        reader.close()
