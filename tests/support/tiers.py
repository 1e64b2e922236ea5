"""Shared pieces of the tier tests: a small store layout, synthetic blocks, and entry files on disk."""

from __future__ import annotations

import torch

from hf_prefix_cache import BlockStore, hashing
from hf_prefix_cache.identity import tier_digest
from hf_prefix_cache.layout import LayerLayout
from hf_prefix_cache.tiers import BlockData, BlockRequest, DiskTier, HostTier
from hf_prefix_cache.tiers.entry import FORMAT_VERSION as _FORMAT_VERSION

LAYOUT = [LayerLayout(2, 4, torch.float32, torch.device("cpu")) for _ in range(2)]
BLOCK = 4
NAMESPACE = "model/salt"


def make_store(num_blocks: int, *, host=None, disk=None, disk_size=None, **disk_kw) -> BlockStore:
    store = BlockStore(LAYOUT, block_size=BLOCK, num_blocks=num_blocks)
    tiers = []
    if host is not None:
        tiers.append(HostTier(host))
    if disk is not None:
        tiers.append(DiskTier(disk, LAYOUT, size=disk_size, **disk_kw))
    if tiers:
        store.attach_tiers(tiers)
    return store


def slot_values(tokens: list[int], value: float) -> torch.Tensor:
    """K/V of slot i is ``value * (i + 1)`` (per head and dim), so a read can be checked exactly."""
    slots = (torch.arange(len(tokens), dtype=torch.float32) + 1) * value
    return slots.view(1, -1, 1).expand(2, -1, 4)


def store_tokens(store: BlockStore, tokens: list[int], value: float = 1.0, namespace: str = NAMESPACE):
    root = hashing.root_hash(namespace)
    hashes = hashing.hash_blocks(root, tokens, BLOCK)
    kv = slot_values(tokens, value)

    def write(positions, block_ids):
        index = torch.tensor([p * BLOCK + i for p in positions for i in range(BLOCK)])
        for layer in range(len(LAYOUT)):
            store.kv.write(layer, block_ids, kv[:, index], kv[:, index])

    chain = store.extend_chain(namespace, tokens, hashes, [], write)
    store.release(chain)
    return hashes


def match(store: BlockStore, tokens: list[int], namespace: str = NAMESPACE, keep: bool = False):
    """(blocks, sources, K of layer 0 for the chain); releases the blocks unless ``keep``."""
    hashes = hashing.hash_blocks(hashing.root_hash(namespace), tokens, BLOCK)
    found = store.match(namespace, tokens, hashes, len(hashes))
    blocks, sources = found.blocks, found.sources
    keys = store.read(0, blocks)[0] if blocks else None
    if not keep:
        store.release(blocks)
    return blocks, sources, keys


def tier_ns(namespace: str = NAMESPACE) -> bytes:
    return tier_digest(namespace, BLOCK, LAYOUT, format_version=_FORMAT_VERSION)


def synthetic_chain(tokens: list[int], value: float = 1.0, namespace: str = NAMESPACE):
    """(requests, blocks) for every full block of ``tokens``, K/V as in ``slot_values``."""
    root = hashing.root_hash(namespace)
    hashes = hashing.hash_blocks(root, tokens, BLOCK)
    kv = slot_values(tokens, value)
    requests, blocks = [], []
    for index, block_hash in enumerate(hashes):
        parent = hashes[index - 1] if index else root
        window = tuple(tokens[index * BLOCK : (index + 1) * BLOCK])
        part = kv[:, index * BLOCK : (index + 1) * BLOCK].contiguous()
        requests.append(BlockRequest(block_hash, parent, window))
        blocks.append(
            BlockData(block_hash, parent, window, [part.clone(), part.clone()], [part.clone(), part.clone()])
        )
    return requests, blocks
