"""Chained block hashes: a block's identity is its tokens plus everything before it.

Like vLLM's v1 prefix cache, a block hash covers (parent hash, block token ids, extra keys), so equal hashes
mean equal prefixes. The chain is rooted in a namespace (model fingerprint + ``cache_salt``) so that two
models or two tenants never share a block. MurmurHash3 x64 128-bit with a fixed seed is stable across
processes; hits are still verified against stored tokens (see ``block_pool``), so a collision can cost a
miss but never wrong K/V.
"""

from __future__ import annotations

from array import array
from collections.abc import Hashable, Sequence

import mmh3

HASH_SEED = 0x5EED_CAC4
BlockHash = bytes


def _digest(payload: bytes) -> BlockHash:
    return mmh3.hash_bytes(payload, HASH_SEED, x64arch=True)


def root_hash(namespace: str) -> BlockHash:
    """The parent hash of every first block in ``namespace`` (model fingerprint + salt)."""
    return _digest(b"hf_prefix_cache/root\x00" + namespace.encode())


def _extra_suffix(extra_keys: tuple[Hashable, ...]) -> bytes:
    return b"\x00extra\x00" + repr(extra_keys).encode() if extra_keys else b""


def hash_block(parent: BlockHash, tokens: Sequence[int], extra_keys: tuple[Hashable, ...] = ()) -> BlockHash:
    """Hash one full block, chained to its parent."""
    return _digest(parent + array("q", tokens).tobytes() + _extra_suffix(extra_keys))


def hash_blocks(
    root: BlockHash, tokens: Sequence[int], block_size: int, extra_keys: tuple[Hashable, ...] = ()
) -> list[BlockHash]:
    """Hashes of every FULL block of ``tokens``; a trailing partial block has none.

    Same digests as chaining ``hash_block``, but the tokens are packed to bytes once, not per block.
    """
    count = len(tokens) // block_size
    packed = array("q", tokens[: count * block_size]).tobytes()
    step, suffix, digest = 8 * block_size, _extra_suffix(extra_keys), _digest
    hashes = []
    parent = root
    for start in range(0, count * step, step):
        parent = digest(parent + packed[start : start + step] + suffix)
        hashes.append(parent)
    return hashes
