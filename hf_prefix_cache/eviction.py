"""Which unreferenced cached block the pool evicts next: the ``lru`` policy and the default ``retain``.

Both keep one queue per level and take from the lowest level first, so a block's ``priority`` (set by
``prepare(priority=...)``, see ``priorities.py``) decides before recency does. Every operation is O(1)
(an ``OrderedDict`` per level; the number of levels is the handful of priorities in use).

- ``lru``: within a level, the least recently released block. Chains are released tail first, so a
  chain's tail goes before its parents. In a round-robin replay of many conversations this evicts exactly
  the conversation that comes back next.
- ``retain`` (default): only *leaves* are candidates (cached blocks no other cached block continues), so a
  block shared by several conversations (a system prompt) stays while anything below it does, and no
  parent is evicted before the children it makes reachable. Within a level it evicts the leaf released
  most recently, and when that empties its parent, the parent goes next: the most recently finished
  conversation is eaten from its tail. A conversation that just had its turn is the one that comes back
  last when conversations take turns, which is what Belady's optimal policy evicts too. Blocks that were
  reused at least once sit a level above blocks never reused since stored, so one-off prompts go before
  a prefix with a history of hits (the case where recency is right).
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .block_pool import Block

POLICIES = ("retain", "lru")
DEFAULT_POLICY = "retain"


class Levels:
    """Queues of blocks by level, lowest level first; the levels in use stay sorted."""

    def __init__(self):
        self.queues: dict[tuple[int, int], OrderedDict[int, Block]] = {}
        self.order: list[tuple[int, int]] = []  # sorted keys of non-empty queues

    def __len__(self) -> int:
        return sum(len(queue) for queue in self.queues.values())

    def add(self, level: tuple[int, int], block: Block) -> None:
        queue = self.queues.get(level)
        if queue is None:
            queue = self.queues[level] = OrderedDict()
            bisect.insort(self.order, level)
        queue[block.block_id] = block

    def discard(self, level: tuple[int, int], block: Block) -> bool:
        queue = self.queues.get(level)
        if queue is None or queue.pop(block.block_id, None) is None:
            return False
        if not queue:
            del self.queues[level]
            self.order.remove(level)
        return True

    def pop(self, newest: bool) -> Block | None:
        """The oldest (or newest) block of the lowest non-empty level, removed."""
        if not self.order:
            return None
        level = self.order[0]
        queue = self.queues[level]
        _, block = queue.popitem(last=newest)
        if not queue:
            del self.queues[level]
            self.order.pop(0)
        return block

    def clear(self) -> None:
        self.queues.clear()
        self.order.clear()


class LRUPolicy:
    """Least recently released first, lowest priority first (tail first within a released chain)."""

    name = "lru"

    def __init__(self):
        self.levels = Levels()

    def level(self, block: Block) -> tuple[int, int]:
        return (block.priority, 0)

    def admit(self, block: Block) -> None:
        """``block`` (cached) lost its last reference."""
        self.levels.add(self.level(block), block)

    def discard(self, block: Block) -> None:
        """``block`` left the free set (referenced again, or forgotten)."""
        self.levels.discard(self.level(block), block)

    def victim(self) -> Block | None:
        return self.levels.pop(newest=False)

    def child_added(self, parent: Block) -> None:
        """A cached block now continues ``parent`` (the LRU ignores the tree)."""

    def child_removed(self, parent: Block) -> None:
        """The last or one of ``parent``'s cached continuations was forgotten."""

    def evicted(self, block: Block) -> None:
        """``block`` is about to be evicted (it still has its hash)."""

    def cached(self, block: Block) -> None:
        """``block`` was just stored under its hash."""

    def clear(self) -> None:
        self.levels.clear()


class RetainPolicy(LRUPolicy):
    """Leaves only; most recently released leaf first; never-reused before reused; lowest priority first."""

    name = "retain"

    def __init__(self, num_blocks: int = 1024, reused: int = 2):
        super().__init__()
        self.reused = reused  # hits that make a block "reused": it outlives blocks with fewer
        # hits of recently evicted blocks by hash, so a prefix that comes back keeps its history
        self.ghosts: OrderedDict[bytes, int] = OrderedDict()
        self.max_ghosts = num_blocks

    def level(self, block: Block) -> tuple[int, int]:
        return (block.priority, 1 if block.hits >= self.reused else 0)

    def evicted(self, block: Block) -> None:
        self.ghosts[block.block_hash] = block.hits
        self.ghosts.move_to_end(block.block_hash)
        if len(self.ghosts) > self.max_ghosts:
            self.ghosts.popitem(last=False)

    def cached(self, block: Block) -> None:
        hits = self.ghosts.pop(block.block_hash, None)
        if hits is not None:  # evicted, then wanted again: that was one more use
            block.hits = hits + 1

    def admit(self, block: Block) -> None:
        if block.children == 0:
            self.levels.add(self.level(block), block)

    def victim(self) -> Block | None:
        return self.levels.pop(newest=True)

    def child_added(self, parent: Block) -> None:
        self.levels.discard(self.level(parent), parent)

    def child_removed(self, parent: Block) -> None:
        if parent.children == 0:  # a leaf now: after its last child, it is the next to go
            self.levels.add(self.level(parent), parent)


def make_policy(policy: str, num_blocks: int = 1024):
    """The policy named ``policy`` (``"retain"``, the default, or ``"lru"``) for a pool of ``num_blocks``."""
    if policy == "retain":
        return RetainPolicy(num_blocks)
    if policy == "lru":
        return LRUPolicy()
    raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
