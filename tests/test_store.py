"""Hashing, verification, ref counts and eviction of the block store, without a model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_prefix_cache import BlockStore, hashing, parse_bytes
from hf_prefix_cache.block_pool import BlockPool
from hf_prefix_cache.layout import LayerLayout

LAYOUT = [LayerLayout(2, 4, torch.float32, torch.device("cpu")) for _ in range(2)]
BLOCK = 4


def make_store(num_blocks: int) -> BlockStore:
    return BlockStore(LAYOUT, block_size=BLOCK, num_blocks=num_blocks)


def store_tokens(store: BlockStore, tokens: list[int], namespace: str = "ns", value: float = 1.0):
    """Store all full blocks of ``tokens``; K/V of slot i are ``value * i`` so reads can be checked."""
    root = hashing.root_hash(namespace)
    hashes = hashing.hash_blocks(root, tokens, BLOCK)
    slots = torch.arange(len(tokens), dtype=torch.float32) * value
    kv = slots.view(1, -1, 1).expand(2, -1, 4)

    def write(positions, block_ids):
        index = torch.tensor([p * BLOCK + i for p in positions for i in range(BLOCK)])
        for layer in range(len(LAYOUT)):
            store.kv.write(layer, block_ids, kv[:, index], kv[:, index])

    chain = store.extend_chain(namespace, tokens, hashes, [], write)
    store.release(chain)
    return hashes


def match(store: BlockStore, tokens: list[int], namespace: str = "ns"):
    hashes = hashing.hash_blocks(hashing.root_hash(namespace), tokens, BLOCK)
    blocks = store.match(namespace, tokens, hashes, len(hashes)).blocks
    store.release(blocks)
    return blocks


def test_hash_chain_depends_on_everything_before():
    root = hashing.root_hash("model/salt")
    a = hashing.hash_blocks(root, list(range(12)), BLOCK)
    b = hashing.hash_blocks(root, [99, *range(1, 12)], BLOCK)
    assert len(a) == 3 and len(hashing.hash_blocks(root, list(range(11)), BLOCK)) == 2
    assert all(x != y for x, y in zip(a, b))  # one changed token changes every later hash
    assert hashing.hash_blocks(hashing.root_hash("model/other"), list(range(12)), BLOCK)[0] != a[0]
    assert hashing.hash_blocks(root, list(range(12)), BLOCK, extra_keys=("lora",))[0] != a[0]


def test_hashes_are_stable_across_processes():
    code = "from hf_prefix_cache import hashing as h; print(h.hash_blocks(h.root_hash('m'), list(range(8)), 4)[1].hex())"
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert other == hashing.hash_blocks(hashing.root_hash("m"), list(range(8)), 4)[1].hex()


def test_stored_kv_read_back_in_order():
    store = make_store(8)
    tokens = list(range(10, 22))
    store_tokens(store, tokens)
    blocks = match(store, tokens)
    keys, _ = store.read(1, blocks)
    assert keys.shape == (2, 12, 4)
    assert torch.equal(keys[0, :, 0], torch.arange(12, dtype=torch.float32))


def test_forced_hash_collision_never_returns_wrong_blocks(monkeypatch):
    monkeypatch.setattr(hashing, "_digest", lambda payload: b"\x00" * 16)  # every block collides
    store = make_store(8)
    store_tokens(store, [1, 2, 3, 4, 5, 6, 7, 8])
    assert match(store, [9, 9, 9, 9, 5, 6, 7, 8]) == []  # same hash, other tokens: a miss
    assert match(store, [1, 2, 3, 4], namespace="other") == []  # same hash, other namespace
    assert len(match(store, [1, 2, 3, 4, 0])) == 1


def test_identical_blocks_are_stored_once():
    store = make_store(8)
    store_tokens(store, list(range(8)))
    store_tokens(store, [*range(8), 50, 51, 52, 53])
    assert store.pool.num_cached == 3


def test_lru_evicts_the_tail_of_a_chain_before_its_parents():
    store = BlockStore(LAYOUT, block_size=BLOCK, num_blocks=4, policy="lru")
    store_tokens(store, list(range(12)))  # chain of 3 blocks
    store_tokens(store, [40, 41, 42, 43])  # 1 block: the pool is full
    store_tokens(store, [60, 61, 62, 63])  # evicts one block: the tail of the older chain
    assert store.pool.evictions == 1
    assert len(match(store, list(range(12)))) == 2  # parents survive, tail gone
    assert len(match(store, [40, 41, 42, 43])) == 1


def test_referenced_blocks_are_never_evicted():
    store = make_store(2)
    store_tokens(store, list(range(8)))
    tokens = list(range(8))
    hashes = hashing.hash_blocks(hashing.root_hash("ns"), tokens, BLOCK)
    pinned = store.match("ns", tokens, hashes, 2).blocks
    store_tokens(store, [70, 71, 72, 73])  # no free block: nothing stored, nothing evicted
    assert store.pool.evictions == 0 and len(pinned) == 2
    assert store.pool.num_cached == 2 and match(store, [70, 71, 72, 73]) == []
    assert len(match(store, tokens)) == 2  # the pinned chain is intact
    store.release(pinned)
    store_tokens(store, [70, 71, 72, 73])
    assert store.pool.evictions == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=14), min_size=1, max_size=25))
def test_capacity_is_never_exceeded_and_references_balance(prompts):
    store = make_store(5)
    for tokens in prompts:
        store_tokens(store, tokens)
        assert store.pool.num_cached <= 5
        assert store.pool.num_referenced == 0
        assert store.pool.num_free == 5
        blocks = match(store, tokens)
        # 5 blocks always hold the (at most 3-block) chain just stored: all of it matches, block for block
        assert len(blocks) == len(tokens) // BLOCK
        assert all(b.key[1] == tuple(tokens[i * BLOCK : (i + 1) * BLOCK]) for i, b in enumerate(blocks))


def test_blocks_go_out_empty_first_then_never_used_lowest_first_then_least_recently_used():
    """Blocks are made on first use; the order is still that of one queue holding them all from the start,
    so no cached block is evicted while a never-used one is left, and touched K/V pages stay packed."""
    pool = BlockPool(4)
    assert pool.blocks == [] and pool.num_free == 4  # nothing made up front
    first, second = pool.allocate(), pool.allocate()
    assert (first.block_id, second.block_id) == (0, 1)
    pool.cache(first, b"first", (("root", "ns"), (1,), ()))
    pool.release([first])  # cached: waits at the back of the queue
    pool.release([second])  # empty: handed out before anything else
    assert pool.num_free == 4 and pool.num_referenced == 0
    assert pool.allocate() is second
    assert [pool.allocate().block_id for _ in range(2)] == [2, 3] and pool.evictions == 0
    assert pool.allocate() is first and pool.evictions == 1 and pool.num_cached == 0
    assert pool.allocate() is None and pool.num_free == 0 and pool.num_referenced == 4


def test_release_more_than_referenced_is_an_error():
    pool = BlockPool(2)
    block = pool.allocate()
    pool.release([block])
    with pytest.raises(RuntimeError):
        pool.release([block])


def test_a_failed_write_leaves_no_reference():
    store = make_store(4)
    tokens = list(range(8))
    hashes = hashing.hash_blocks(hashing.root_hash("ns"), tokens, BLOCK)

    def broken(positions, block_ids):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.extend_chain("ns", tokens, hashes, [], broken)
    assert store.pool.num_referenced == 0 and store.pool.num_cached == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30), ("1.5 GB", 1_500_000_000), (4096, 4096)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["lots", "12 parsecs", -5, 0])
def test_parse_bytes_rejects_nonsense_with_a_hint(bad):
    with pytest.raises(ValueError, match=r"512MiB|positive"):
        parse_bytes(bad)


@pytest.mark.parametrize(
    "block_ids",
    [[3, 4, 5], [6, 2, 9], [9, 1, 7, 3, 5, 0, 8, 2, 6, 4]],
    ids=["consecutive", "three_runs", "gathered"],
)
def test_write_blocks_stores_each_block_where_read_finds_it(block_ids):
    """The promotion path (one K/V per block, stacked straight into the pool) against read()."""
    from hf_prefix_cache.kv_pool import KVPool

    layouts = [LayerLayout(2, 4, torch.float32, torch.device("cpu"))]
    pool = KVPool(layouts, num_blocks=10, block_size=3)
    keys = [torch.randn(2, 3, 4) for _ in block_ids]
    values = [torch.randn(2, 3, 4) for _ in block_ids]
    pool.write_blocks(0, block_ids, keys, values)
    for block_id, k, v in zip(block_ids, keys, values):
        got_k, got_v = pool.read(0, [block_id])
        assert torch.equal(got_k, k) and torch.equal(got_v, v)
    assert pool.committed_bytes == len(block_ids) * pool.block_bytes()


@pytest.mark.parametrize("count", [3, 12], ids=["one_thread", "two_threads"])
def test_whole_blocks_written_packed_read_back_per_layer_and_packed(count):
    """A tier hit's path: whole blocks in the entry's packed layout (one tensor per group of layers
    of one shape) written with one copy per block and group, read back per layer and packed again."""
    from hf_prefix_cache.kv_pool import KVPool, layer_groups
    from hf_prefix_cache.tiers.entry import pack, unpack

    cpu = torch.device("cpu")
    layouts = [LayerLayout(2, 4, torch.float32, cpu)] * 2 + [LayerLayout(1, 8, torch.float32, cpu)]
    layouts += [LayerLayout(2, 4, torch.float32, cpu)]
    assert layer_groups(layouts) == [(0, 2), (2, 1), (3, 1)]
    pool = KVPool(layouts, num_blocks=16, block_size=3)
    block_ids = [9, 1, 7, 3, 5, 0, 8, 2, 6, 4, 11, 15][:count]
    blocks = []
    for _ in block_ids:
        keys = [torch.randn(x.num_heads, 3, x.head_dim) for x in layouts]
        blocks.append((keys, [torch.randn_like(k) for k in keys]))
    packed = [pack(keys, values) for keys, values in blocks]
    assert all(pool.fits_packed(p) for p in packed)
    pool.write_packed(block_ids, packed)
    for block_id, (keys, values), expected in zip(block_ids, blocks, packed):
        for layer in range(len(layouts)):
            got_k, got_v = pool.read(layer, [block_id])
            assert torch.equal(got_k, keys[layer]) and torch.equal(got_v, values[layer])
        again = pool.read_packed(block_id)
        assert again.keys() == expected.keys()
        assert all(torch.equal(again[name], expected[name]) for name in expected)
        assert [torch.equal(a, b) for a, b in zip(unpack(again, len(layouts))[0], keys)] == [True] * 4
    assert pool.committed_bytes == len(block_ids) * pool.block_bytes()
    assert not pool.fits_packed({name: t[:, :, :2] for name, t in packed[0].items()})  # another block size
    assert not pool.fits_packed(None)


def test_a_chain_stored_over_evicted_blocks_gets_ascending_ids_and_reads_back_exactly():
    """The LRU queue hands out an evicted chain tail first (descending ids); the new chain is laid out
    in ascending order so that it reads back as one view, and its keys still chain correctly."""
    store = make_store(4)
    store_tokens(store, list(range(16)))  # ids 0..3, released tail first
    tokens = [100 + t for t in range(16)]
    store_tokens(store, tokens, value=2.0)  # evicts the whole first chain
    blocks = match(store, tokens)
    assert [block.block_id for block in blocks] == [0, 1, 2, 3]
    keys, _ = store.read(0, blocks)
    assert torch.equal(keys[0, :, 0], torch.arange(16, dtype=torch.float32) * 2.0)
