"""Who stored K/V belong to: the namespace, its root hash, block hashes and tier digest, built only here.

The namespace string names the model exactly (a digest of every weight), its attention implementation,
``cache_salt`` and the active PEFT adapters; the root hash starts every chain of block hashes in it; the
tier digest adds what the lower tiers must also agree on (block size, K/V layout, extra keys, entry
format). Two caches share a block only if all of these are equal.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Hashable, Sequence

import mmh3
import torch

from .adapters import adapter_namespace
from .fingerprint import WeightsWatch, attention_namespace, model_fingerprint
from .hashing import HASH_SEED, BlockHash, hash_blocks, root_hash
from .layout import LayerLayout

logger = logging.getLogger(__name__)


class Identity:
    """The namespace of one cache's model, salt and extra keys; the fingerprint is recomputed when the
    weights were replaced, cast, moved or written."""

    def __init__(self, model: torch.nn.Module, cache_salt: str | None, extra_keys: tuple[Hashable, ...]):
        self.model = model
        self.cache_salt = cache_salt
        self.extra_keys = extra_keys
        self.watch = WeightsWatch(model)
        self._fingerprint = ""  # computed on the first call, not here: construction stays fast

    @property
    def namespace(self) -> str:
        self.watch.changed()
        weights = model_fingerprint(self.model, self.watch.state)  # kept per model: a lookup when unchanged
        if weights != self._fingerprint:
            if self._fingerprint:
                logger.info("model weights changed: earlier blocks will no longer match")
            self._fingerprint = weights
        attention = attention_namespace(self.model)
        return f"{self._fingerprint}/{attention}/{self.cache_salt or ''}{adapter_namespace(self.model)}"

    def block_hashes(self, namespace: str, tokens: Sequence[int], block_size: int) -> list[BlockHash]:
        """Chained hashes of the full blocks of ``tokens`` in ``namespace``."""
        return hash_blocks(root_of(namespace), tokens, block_size, self.extra_keys)


@functools.lru_cache(maxsize=256)
def root_of(namespace: str) -> BlockHash:
    """The parent hash of every first block in ``namespace`` (computed once per namespace)."""
    return root_hash(namespace)


def root_ref(namespace: str) -> tuple[str, str]:
    """The parent reference of every first block in ``namespace`` in the block pool's table."""
    return ("root", namespace)


def tier_digest(
    namespace: str,
    block_size: int,
    layouts: list[LayerLayout],
    extra_keys: tuple[Hashable, ...] = (),
    *,
    format_version: int,
) -> bytes:
    """16-byte digest that names ``namespace`` in the lower tiers, where block-pool references do not
    exist: namespace, block size, every layer's heads, head dim and dtype, extra keys, entry format."""
    description = {
        "namespace": namespace,
        "block_size": block_size,
        "layers": [[x.num_heads, x.head_dim, str(x.dtype)] for x in layouts],
        "extra_keys": repr(tuple(extra_keys)),
        "format_version": format_version,
    }
    return mmh3.hash_bytes(json.dumps(description, sort_keys=True).encode(), HASH_SEED, x64arch=True)
