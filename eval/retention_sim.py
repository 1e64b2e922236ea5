"""Eviction policies replayed on a block access trace: LRU, the default ``retain``, and Belady's optimum.

A trace is the calls of a round-robin replay, each the prompt it looks up and the sequence it stores
(prompt plus reply). ``simulate`` replays it through the library's own ``BlockStore`` (same match, same
extend, same pool and policy code; K/V of one 1-wide head, never written), so its hits are the ones a
``PrefixCache`` of that many blocks gets on the same calls. ``BeladyPolicy`` plugs into that pool as the
offline optimum: it evicts the cached block whose next use in the trace is furthest in the future.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from hf_prefix_cache import BlockStore, hashing
from hf_prefix_cache.layout import LayerLayout

NAMESPACE = "retention-sim"
TINY = [LayerLayout(1, 1, torch.float32, torch.device("cpu"))]


@dataclass
class Call:
    """One call of a trace: the prompt it looks up and the tokens it stores (prompt + reply)."""

    prompt: list[int]
    stored: list[int]
    hashes: list[bytes] = field(default_factory=list)  # of the full blocks of ``stored``

    def usable(self, block_size: int) -> int:
        """Blocks a lookup may return: the last prompt token is always computed."""
        return max(0, len(self.prompt) - 1) // block_size


def hashed(calls: Sequence[Call], block_size: int) -> list[Call]:
    root = hashing.root_hash(NAMESPACE)
    for call in calls:
        if call.stored[: len(call.prompt)] != call.prompt:
            raise ValueError("a call's stored tokens must start with its prompt")
        call.hashes = hashing.hash_blocks(root, call.stored, block_size)
    return list(calls)


def working_set(calls: Sequence[Call]) -> int:
    """Distinct blocks the trace stores: the pool that never has to evict."""
    return len({h for call in calls for h in call.hashes})


class BeladyPolicy:
    """Offline optimal eviction: the free block used again furthest in the future (never: first).

    ``now`` is the index of the call in progress, set by ``simulate``; a use counts only if it comes after
    it. Ties go to the deeper block, so a child always goes before its parent (a child is used only with
    its parent, so its next use is never sooner). Not O(1): an oracle for the benchmark, not a policy.
    """

    name = "belady"

    def __init__(self, calls: Sequence[Call], block_size: int):
        self.now = -1
        self.uses: dict[bytes, list[int]] = {}
        self.depth: dict[bytes, int] = {}
        for index, call in enumerate(calls):
            for block_hash in call.hashes[: call.usable(block_size)]:
                self.uses.setdefault(block_hash, []).append(index)
            for position, block_hash in enumerate(call.hashes):
                self.depth[block_hash] = position
        self.heap: list[tuple[float, int, int, int]] = []
        self.stamps: dict[int, int] = {}  # block id -> the heap entry that is current
        self._count = itertools.count()
        self._blocks: dict[int, object] = {}

    def next_use(self, block_hash: bytes) -> float:
        """The first call after ``now`` that can hit ``block_hash`` (inf: none)."""
        uses = self.uses.get(block_hash, [])
        index = bisect.bisect_right(uses, self.now)
        return uses[index] if index < len(uses) else math.inf

    def admit(self, block) -> None:
        stamp = next(self._count)
        self.stamps[block.block_id] = stamp
        key = (-self.next_use(block.block_hash), -self.depth.get(block.block_hash, 0), stamp, block.block_id)
        heapq.heappush(self.heap, key)
        self._blocks[block.block_id] = block

    def discard(self, block) -> None:
        self.stamps.pop(block.block_id, None)

    def victim(self):
        while self.heap:
            _, _, stamp, block_id = heapq.heappop(self.heap)
            if self.stamps.get(block_id) == stamp:
                del self.stamps[block_id]
                return self._blocks[block_id]
        return None

    def child_added(self, parent) -> None:
        pass

    def child_removed(self, parent) -> None:
        pass

    def evicted(self, block) -> None:
        pass

    def cached(self, block) -> None:
        pass

    def clear(self) -> None:
        self.heap.clear()
        self.stamps.clear()


@dataclass
class SimResult:
    policy: str
    num_blocks: int
    prompt_tokens: int = 0
    hit_tokens: int = 0
    hits_by_call: list[int] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def simulate(calls: Sequence[Call], num_blocks: int, policy: str, block_size: int) -> SimResult:
    """Replay ``calls`` through a ``BlockStore`` of ``num_blocks`` evicting by ``policy``
    (``"lru"``, ``"retain"`` or ``"belady"``); returns the hit tokens, as a ``PrefixCache`` counts them."""
    store = BlockStore(
        TINY, block_size=block_size, num_blocks=num_blocks, policy="lru" if policy == "belady" else policy
    )
    oracle = None
    if policy == "belady":
        oracle = store.pool.policy = BeladyPolicy(calls, block_size)
    result = SimResult(policy, num_blocks)

    def write(positions, block_ids):  # the simulator keeps no K/V
        pass

    for index, call in enumerate(calls):
        if oracle is not None:
            oracle.now = index
        found = store.match(NAMESPACE, call.stored, call.hashes, call.usable(block_size)).blocks
        chain = store.extend_chain(NAMESPACE, call.stored, call.hashes, found, write)
        store.release(chain)
        hit = len(found) * block_size
        result.hits_by_call.append(hit)
        result.hit_tokens += hit
        result.prompt_tokens += len(call.prompt)
    if store.pool.num_referenced:
        raise RuntimeError(f"the simulation leaked {store.pool.num_referenced} block references")
    return result


def blocks_for(calls: Sequence[Call], fraction: float) -> int:
    """The pool holding ``fraction`` of the trace's working set (at least one block)."""
    return max(1, round(fraction * working_set(calls)))
