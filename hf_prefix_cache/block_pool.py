"""Block bookkeeping without tensors: ids, ref counts, the hash table and LRU eviction.

Modelled on vLLM v1's ``block_pool.py``: a referenced block is never evicted, unreferenced blocks wait
in an LRU queue (an ``OrderedDict``, so removal from the middle, append and pop are O(1)) and keep their
hash until they are reused. A chain is released tail first, so the tail of a chain is evicted before its
parents.

Blocks are made on first use, not up front (an 8 GiB pool has ~10^4 blocks: making them all cost
milliseconds per construction). The order blocks are handed out in is that of a queue holding every
block from the start: empty released blocks first, then never-used ids lowest first (so the K/V pages
the pool touches stay packed, see ``kv_pool.py``), and only then the least recently used cached block.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

from .hashing import BlockHash

# What a cached block must match besides its hash: (parent reference, token ids, extra keys). The parent
# reference is ("block", id, generation) or ("root", namespace), so a hit implies the whole prefix matches.
BlockKey = tuple[tuple[Hashable, ...], tuple[int, ...], tuple[Hashable, ...]]


@dataclass(eq=False, slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    generation: int = 0  # bumped on reuse, so stale parent references never verify
    block_hash: BlockHash | None = None
    key: BlockKey | None = None

    @property
    def ref(self) -> tuple[Hashable, ...]:
        """How a child block names this block as its parent."""
        return ("block", self.block_id, self.generation)


class BlockPool:
    """Fixed set of blocks with ref counts, a verified hash table and an LRU queue of free blocks.

    ``blocks`` holds the blocks used so far (ids ``0..len(blocks) - 1``); ``free`` the unreferenced ones
    among them, empty ones in front. Ids from ``len(blocks)`` on were never used and are free too.
    """

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got num_blocks={num_blocks}")
        self._num_blocks = num_blocks
        self.blocks: list[Block] = []
        self.free: OrderedDict[int, Block] = OrderedDict()
        self.table: dict[BlockHash, Block] = {}
        self.evictions = 0
        # called with a cached block just before allocate() reuses it (lets a lower tier keep a copy)
        self.on_evict: Callable[[Block], None] | None = None

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free(self) -> int:
        """Unreferenced blocks, cached or not, never-used ones included."""
        return len(self.free) + self._num_blocks - len(self.blocks)

    @property
    def num_cached(self) -> int:
        return len(self.table)

    @property
    def num_referenced(self) -> int:
        return len(self.blocks) - len(self.free)

    def lookup(self, block_hash: BlockHash, key: BlockKey) -> Block | None:
        """The cached block for ``block_hash`` if its stored key matches; no ref-count change."""
        block = self.table.get(block_hash)
        if block is None or block.key != key:
            return None
        return block

    def touch(self, block: Block) -> None:
        """Take a reference; a block in use leaves the eviction queue."""
        if block.ref_count == 0:
            del self.free[block.block_id]
        block.ref_count += 1

    def allocate(self) -> Block | None:
        """A referenced, empty block: the least recently used free one, evicted if cached. None if all are in use."""
        block = self._take_free()
        if block is None:
            return None
        if block.block_hash is not None:
            if self.on_evict is not None:
                self.on_evict(block)
            self._uncache(block)
            self.evictions += 1
        block.ref_count = 1
        return block

    def _take_free(self) -> Block | None:
        """The next free block: an empty released one, else a never-used one, else the LRU cached one."""
        if self.free:
            first = self.free[next(iter(self.free))]
            if first.block_hash is None or len(self.blocks) == self._num_blocks:
                return self.free.pop(first.block_id)
        if len(self.blocks) < self._num_blocks:
            block = Block(len(self.blocks))
            self.blocks.append(block)
            return block
        return None

    def cache(self, block: Block, block_hash: BlockHash, key: BlockKey) -> None:
        """Publish ``block`` under ``block_hash``; an unreferenced stale or colliding entry is dropped first."""
        old = self.table.get(block_hash)
        if old is not None:
            if old.ref_count > 0:
                raise RuntimeError("cannot replace a referenced block; check pool.table before caching")
            self._uncache(old)
            self.free.move_to_end(old.block_id, last=False)  # empty now: reuse it first
        block.block_hash = block_hash
        block.key = key
        self.table[block_hash] = block

    def release(self, blocks: Iterable[Block]) -> None:
        """Drop one reference from each block; give chains in order, they are freed tail first."""
        for block in reversed(list(blocks)):
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block.block_id} released more often than it was referenced")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block.block_id] = block
                if block.block_hash is None:  # holds nothing: hand it out before any cached block
                    self.free.move_to_end(block.block_id, last=False)

    def clear(self) -> int:
        """Forget every cached block (blocks still referenced are freed empty later); returns how many."""
        dropped = list(self.table.values())
        for block in dropped:
            self._uncache(block)
            if block.ref_count == 0:
                self.free.move_to_end(block.block_id, last=False)
        return len(dropped)

    def _uncache(self, block: Block) -> None:
        del self.table[block.block_hash]
        block.block_hash = None
        block.key = None
        block.generation += 1


def ascending(blocks: list[Block]) -> list[Block]:
    """``blocks`` by id: fresh blocks laid out along a chain in this order read back as one view."""
    return sorted(blocks, key=lambda block: block.block_id)
