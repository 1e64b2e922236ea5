"""The digest that names a namespace in the lower tiers, where block-pool references do not exist.

It covers everything that changes K/V bytes or their meaning: the model fingerprint and ``cache_salt``
(the store's namespace string), the extra keys, the block size, every layer's heads, head dim and dtype,
and the entry format version. Two caches share tier entries only if all of these are equal.
"""

from __future__ import annotations

import json
from collections.abc import Hashable

import mmh3

from ..hashing import HASH_SEED
from ..layout import LayerLayout
from .entry import FORMAT_VERSION


def tier_namespace(
    namespace: str, block_size: int, layouts: list[LayerLayout], extra_keys: tuple[Hashable, ...] = ()
) -> bytes:
    """16-byte digest of namespace, block size, K/V layout, extra keys and format version."""
    description = {
        "namespace": namespace,
        "block_size": block_size,
        "layers": [[x.num_heads, x.head_dim, str(x.dtype)] for x in layouts],
        "extra_keys": repr(tuple(extra_keys)),
        "format_version": FORMAT_VERSION,
    }
    return mmh3.hash_bytes(json.dumps(description, sort_keys=True).encode(), HASH_SEED, x64arch=True)
