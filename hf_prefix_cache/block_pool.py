"""Block bookkeeping without tensors: ids, ref counts, the hash table and the eviction policy's hooks.

Modelled on vLLM v1's ``block_pool.py``: a referenced block is never evicted, unreferenced blocks wait
in ``free`` (an ``OrderedDict``, so removal from the middle, append and pop are O(1)) and keep their
hash until they are reused. Which cached free block goes first is the policy's choice (``eviction.py``:
``retain`` by default, ``lru``); the pool tells it when blocks come and go, and counts each block's
cached children so the policy can keep parents until their children are gone.

Blocks are made on first use, not up front (an 8 GiB pool has ~10^4 blocks: making them all cost
milliseconds per construction). The order blocks are handed out in is that of a queue holding every
block from the start: empty released blocks first, then never-used ids lowest first (so the K/V pages
the pool touches stay packed, see ``kv_pool.py``), and only then the least recently used cached block.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

from .eviction import DEFAULT_POLICY, make_policy
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
    priority: int = 0  # retention priority: lower levels are evicted first (eviction.py)
    children: int = 0  # cached blocks whose key names this one as parent
    hits: int = 0  # references taken since it was stored (a reused block outlives a one-off)

    @property
    def ref(self) -> tuple[Hashable, ...]:
        """How a child block names this block as its parent."""
        return ("block", self.block_id, self.generation)


class BlockPool:
    """Fixed set of blocks with ref counts, a verified hash table and an LRU queue of free blocks.

    ``blocks`` holds the blocks used so far (ids ``0..len(blocks) - 1``); ``free`` the unreferenced ones
    among them, empty ones in front. Ids from ``len(blocks)`` on were never used and are free too.
    """

    def __init__(self, num_blocks: int, policy=DEFAULT_POLICY):
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got num_blocks={num_blocks}")
        self._num_blocks = num_blocks
        self.policy = make_policy(policy, num_blocks) if isinstance(policy, str) else policy
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
            if block.block_hash is not None:
                self.policy.discard(block)
        block.ref_count += 1
        block.hits += 1

    def allocate(self) -> Block | None:
        """A referenced, empty block: the least recently used free one, evicted if cached. None if all are in use."""
        block = self._take_free()
        if block is None:
            return None
        if block.block_hash is not None:
            if self.on_evict is not None:
                self.on_evict(block)
            self.policy.evicted(block)
            self._uncache(block)
            self.evictions += 1
        block.ref_count = 1
        block.priority = block.hits = 0
        return block

    def _take_free(self) -> Block | None:
        """The next free block: an empty released one, else a never-used one, else the policy's victim."""
        if self.free:
            first = self.free[next(iter(self.free))]
            if first.block_hash is None:
                return self.free.pop(first.block_id)
        if len(self.blocks) < self._num_blocks:
            block = Block(len(self.blocks))
            self.blocks.append(block)
            return block
        if not self.free:
            return None
        victim = self.policy.victim()
        if victim is None:  # the policy lost track of a block: never strand it, take the oldest
            victim = self.free[next(iter(self.free))]
            self.policy.discard(victim)
        return self.free.pop(victim.block_id)

    def cache(self, block: Block, block_hash: BlockHash, key: BlockKey) -> None:
        """Publish ``block`` under ``block_hash``; an unreferenced stale or colliding entry is dropped first."""
        old = self.table.get(block_hash)
        if old is not None:
            if old.ref_count > 0:
                raise RuntimeError("cannot replace a referenced block; check pool.table before caching")
            self.policy.discard(old)
            self._uncache(old)
            self.free.move_to_end(old.block_id, last=False)  # empty now: reuse it first
        block.block_hash = block_hash
        block.key = key
        self.table[block_hash] = block
        self.policy.cached(block)
        parent = self.parent_of(block)
        if parent is not None:
            parent.children += 1
            if parent.ref_count == 0:
                self.policy.child_added(parent)

    def parent_of(self, block: Block) -> Block | None:
        """The cached block ``block``'s key names as parent (None: a root block, or the parent is gone)."""
        ref = block.key[0] if block.key is not None else ()
        if len(ref) != 3 or ref[0] != "block" or not 0 <= ref[1] < len(self.blocks):
            return None
        parent = self.blocks[ref[1]]
        return parent if parent.generation == ref[2] and parent.block_hash is not None else None

    def raise_priority(self, block: Block, priority: int) -> None:
        """Give ``block`` at least ``priority`` (a block keeps the highest it was given until evicted)."""
        if priority <= block.priority:
            return
        waiting = block.ref_count == 0 and block.block_hash is not None
        if waiting:
            self.policy.discard(block)
        block.priority = priority
        if waiting:
            self.policy.admit(block)

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
                else:
                    self.policy.admit(block)

    def clear(self) -> int:
        """Forget every cached block (blocks still referenced are freed empty later); returns how many."""
        dropped = list(self.table.values())
        for block in dropped:
            self._uncache(block)
            if block.ref_count == 0:
                self.free.move_to_end(block.block_id, last=False)
        self.policy.clear()
        return len(dropped)

    def _uncache(self, block: Block) -> None:
        parent = self.parent_of(block)
        del self.table[block.block_hash]
        block.block_hash = None
        block.key = None
        block.generation += 1
        block.children = 0  # cached children, if any, name the old generation: orphans, evicted as leaves
        if parent is not None:
            parent.children -= 1
            if parent.ref_count == 0:
                self.policy.child_removed(parent)


def ascending(blocks: list[Block]) -> list[Block]:
    """``blocks`` by id: fresh blocks laid out along a chain in this order read back as one view."""
    return sorted(blocks, key=lambda block: block.block_id)
