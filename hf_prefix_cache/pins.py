"""Pinned prefixes of one block store: each pin holds a reference on its blocks, so none is evicted.

A pin is a reference like a call's, kept until ``unpin``, its TTL or ``clear()``: the pool never evicts a
referenced block, so pinning needs no change to eviction, and releasing the pin is all it takes to leave
no reference behind. The bytes pinned are capped (``max_bytes``) so pins can never fill the pool. Every
method takes the store's lock: a pin made on one thread may be released on another.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .block_pool import Block
    from .store import BlockStore

logger = logging.getLogger(__name__)

DEFAULT_PIN_FRACTION = 0.5  # of the pool: the default cap on pinned bytes
PinKey = tuple[str, tuple[Hashable, ...], bytes]  # namespace, extra keys, hash of the last pinned block


@dataclass
class Pin:
    blocks: list[Block]
    deadline: float | None  # on the registry's clock; None: until unpinned


class Pins:
    """The pins of ``store``; ``clock`` (seconds, monotonic) may be replaced, e.g. by a test's fake clock."""

    def __init__(self, store: BlockStore, clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.clock = clock
        self.max_bytes: int | None = None  # None: DEFAULT_PIN_FRACTION of the pool
        self._pins: dict[PinKey, Pin] = {}
        self._holders: dict[int, int] = {}  # block id -> pins holding it (its keys: the pinned blocks)
        self._deadlines: list[tuple[float, int, PinKey]] = []  # a heap; stale items are skipped
        self._order = itertools.count()
        # hashes of the pinned blocks, replaced (never mutated) on every change: the disk tier's size sweep
        # reads it from its writer thread without the store's lock
        self.hashes: frozenset[bytes] = frozenset()

    # -- gauges ----------------------------------------------------------------------------------------
    @property
    def cap_blocks(self) -> int:
        block_bytes = self.store.kv.block_bytes()
        if self.max_bytes is None:
            return int(self.store.pool.num_blocks * DEFAULT_PIN_FRACTION)
        return self.max_bytes // block_bytes

    @property
    def num_blocks(self) -> int:
        """Distinct blocks pinned now (a block two pins share counts once)."""
        with self.store.lock:
            self.expire()
            return len(self._holders)

    def __len__(self) -> int:
        with self.store.lock:
            self.expire()
            return len(self._pins)

    def is_pinned(self, block: Block) -> bool:
        return block.block_id in self._holders and block.ref_count > 0

    # -- pin / unpin -------------------------------------------------------------------------------------
    def pin(self, key: PinKey, blocks: Sequence[Block], ttl: float | None) -> None:
        """Keep ``blocks`` (a chain the caller references; this takes the caller's references over) until
        unpinned or ``ttl`` seconds pass. Pinning a key again replaces its TTL (the blocks are the same)."""
        with self.store.lock:
            self.expire()
            deadline = None if ttl is None else self.clock() + ttl
            old = self._pins.get(key)
            if old is not None:  # already pinned: only the deadline changes
                self.store.pool.release(blocks)
                old.deadline = deadline
            else:
                added = sum(1 for block in blocks if block.block_id not in self._holders)
                cap = self.cap_blocks
                if len(self._holders) + added > cap:
                    self.store.pool.release(blocks)
                    block_bytes = self.store.kv.block_bytes()
                    raise ValueError(
                        f"pinning {added} more blocks ({added * block_bytes} bytes) would pin "
                        f"{len(self._holders) + added} blocks, over the cap of {cap} ({cap * block_bytes} bytes, "
                        "max_pinned=, by default half the pool): unpin something first, or pass a larger "
                        "PrefixCache(max_pinned=...)"
                    )
                self._pins[key] = Pin(list(blocks), deadline)
                for block in blocks:
                    self._holders[block.block_id] = self._holders.get(block.block_id, 0) + 1
                self._changed()
            if deadline is not None:
                heapq.heappush(self._deadlines, (deadline, next(self._order), key))

    def unpin(self, key: PinKey) -> bool:
        """Release the pin of ``key``; False (a no-op) when there is none (never pinned, expired, cleared)."""
        with self.store.lock:
            self.expire()
            pin = self._pins.pop(key, None)
            if pin is None:
                return False
            self._drop(pin)
            return True

    def _drop(self, pin: Pin) -> None:
        for block in pin.blocks:
            left = self._holders[block.block_id] - 1
            if left:
                self._holders[block.block_id] = left
            else:
                del self._holders[block.block_id]
        self.store.pool.release(pin.blocks)
        self._changed()

    def _changed(self) -> None:
        self.hashes = frozenset(
            block.block_hash for pin in self._pins.values() for block in pin.blocks if block.block_hash
        )

    def expire(self) -> int:
        """Release the pins whose TTL has passed; returns how many. O(1) when none is due."""
        if not self._deadlines:
            return 0
        with self.store.lock:
            now, expired = self.clock(), 0
            while self._deadlines and self._deadlines[0][0] <= now:
                deadline, _, key = heapq.heappop(self._deadlines)
                pin = self._pins.get(key)
                if pin is not None and pin.deadline == deadline:
                    del self._pins[key]
                    self._drop(pin)
                    expired += 1
            if expired:
                logger.info("pins: %d expired (TTL)", expired)
            return expired

    def clear(self) -> int:
        """Release every pin; returns how many there were (the store's ``clear()`` says so)."""
        with self.store.lock:
            pins, self._pins = list(self._pins.values()), {}
            self._deadlines.clear()
            for pin in pins:
                self._drop(pin)
            if pins:
                logger.warning("clear() released %d pins: pin the prefixes again to keep them", len(pins))
            return len(pins)
