"""Recurrent-state snapshots: the state of every linear-attention / SSM / short-conv layer after a prefix,
kept beside the K/V blocks of hybrid models, within a byte budget, least recently used first out.

A recurrent layer cannot rebuild its state from token blocks, so a hit on a hybrid model needs the state
after exactly the hit's last token. A snapshot is keyed by the chain hash of the block that ends its
prefix (so it is valid for that prefix, namespace, adapters and salt only) and checked against that block's
identity in the pool (``Block.ref``: id and generation): once the block is evicted and reused, the snapshot
never matches again and is dropped when next looked up or when the budget needs its bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from .block_pool import Block
from .hashing import BlockHash
from .state_layers import LayerState


@dataclass(eq=False)
class Snapshot:
    block_ref: tuple[Hashable, ...]  # the block that ends the prefix, as it was when the state was taken
    tokens: int  # the prefix length
    layers: list[LayerState | None]  # per cache layer (None: a layer without recurrent state)
    nbytes: int


def state_bytes(layers: list[LayerState | None]) -> int:
    return sum(
        tensor.nbytes
        for layer in layers
        if layer
        for pair in layer.values()
        for tensor in pair
        if tensor is not None
    )


class SnapshotStore:
    """Snapshots by the hash of the block ending their prefix; LRU within ``budget`` bytes. Callers hold
    the block store's lock."""

    def __init__(self, budget: int):
        self.budget = budget
        self.entries: OrderedDict[BlockHash, Snapshot] = OrderedDict()
        self.used_bytes = 0
        self.stored = 0  # snapshots taken into the store
        self.evictions = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, block: Block) -> Snapshot | None:
        """The snapshot taken at the end of ``block``'s chain, while that block still holds it."""
        if block.block_hash is None:
            return None
        snapshot = self.entries.get(block.block_hash)
        if snapshot is None:
            return None
        if snapshot.block_ref != block.ref:  # the block was evicted: the snapshot belongs to nothing now
            self._drop(block.block_hash)
            return None
        self.entries.move_to_end(block.block_hash)
        return snapshot

    def peek(self, block: Block) -> bool:
        """Whether ``get(block)`` would find a snapshot; changes nothing (for ``explain``)."""
        snapshot = self.entries.get(block.block_hash) if block.block_hash is not None else None
        return snapshot is not None and snapshot.block_ref == block.ref

    def put(self, block: Block, tokens: int, layers: list[LayerState | None]) -> bool:
        """Keep the state after ``tokens`` tokens, ending with ``block``; False when it cannot fit."""
        if block.block_hash is None:
            return False
        nbytes = state_bytes(layers)
        if nbytes > self.budget:
            return False
        if block.block_hash in self.entries:
            self._drop(block.block_hash)
        while self.used_bytes + nbytes > self.budget and self.entries:
            self._drop(next(iter(self.entries)))
            self.evictions += 1
        self.entries[block.block_hash] = Snapshot(block.ref, tokens, layers, nbytes)
        self.used_bytes += nbytes
        self.stored += 1
        return True

    def _drop(self, key: BlockHash) -> None:
        self.used_bytes -= self.entries.pop(key).nbytes

    def clear(self) -> None:
        self.entries.clear()
        self.used_bytes = 0
