"""The shared block store: a ``BlockPool`` (bookkeeping) plus a ``KVPool`` (tensors) behind one lock.

One store can back many ``PrefixCache`` views (threads, notebooks cells, tenants with their own salt);
what they share is only what hashes, namespaces and tokens prove identical.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .block_pool import Block, BlockPool, ascending
from .eviction import DEFAULT_POLICY
from .hashing import BlockHash
from .identity import root_ref
from .kv_pool import KVPool
from .layout import LayerLayout, probe_layout
from .memory import check_fits, parse_bytes
from .pins import Pins
from .snapshots import SnapshotStore
from .tiering import TierStack
from .validation import positive_int

if TYPE_CHECKING:
    from .tiers.base import Tier

logger = logging.getLogger(__name__)

DEFAULT_MAX_MEMORY = "1GiB"
# hybrid models: the share of the budget that recurrent-state snapshots may take (snapshots.py)
DEFAULT_SNAPSHOT_SHARE = 0.25
# (chain positions of the new blocks, their ids) -> copies their K/V into the pool
WriteBlocks = Callable[[list[int], list[int]], None]


def blocks_in(budget: int, layouts: list[LayerLayout], block_size: int) -> int:
    """How many whole blocks of ``layouts`` fit in ``budget`` bytes."""
    return budget // sum(layout.block_bytes(block_size) for layout in layouts)


@dataclass
class Match:
    """What ``BlockStore.match`` referenced: the chain's blocks in order, and the tier each came from."""

    blocks: list[Block] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # "device", or the name of the tier it was promoted from
    plans: list = field(default_factory=list)  # the cost model's FetchPlan when lower tiers held more


class BlockStore:
    """Hashed, ref-counted, LRU-evicted K/V blocks, shared across ``generate()`` calls."""

    def __init__(
        self,
        layouts: list[LayerLayout],
        *,
        block_size: int = 16,
        num_blocks: int,
        confirmed: bool = True,
        max_memory: int | None = None,
        snapshot_memory: int = 0,
        policy: str = DEFAULT_POLICY,
    ):
        block_size = positive_int("block_size", block_size, "16")
        num_blocks = positive_int("num_blocks", num_blocks, "1024")
        self.block_size = block_size
        self.lock = threading.RLock()
        self.tiers: TierStack | None = None  # host / disk tiers below the pool, see ``attach_tiers``
        # False while ``layouts`` are a prediction from the config: then nothing is stored or matched
        # until a real forward confirms them (``confirm``)
        self.confirmed = confirmed
        self._max_memory = max_memory  # the budget the pool was sized from, to size it again on a correction
        self.policy = policy  # the eviction policy's name (eviction.py)
        self._build(layouts, num_blocks)
        # recurrent-state snapshots of hybrid models, beside the blocks (None: a model without such state)
        self.snapshots = SnapshotStore(snapshot_memory) if any(x.states for x in layouts) else None
        self.pins = Pins(self)  # pinned prefixes (pins.py): referenced until unpinned or expired

    @property
    def stateful(self) -> bool:
        """Whether the model keeps recurrent state that hits restore from snapshots (checkpoints.py)."""
        return self.snapshots is not None

    def _build(self, layouts: list[LayerLayout], num_blocks: int) -> None:
        needed: dict[torch.device, int] = {}
        for layout in layouts:
            needed[layout.device] = (
                needed.get(layout.device, 0) + layout.block_bytes(self.block_size) * num_blocks
            )
        check_fits(needed)  # before reserving memory the machine cannot hold
        self.layouts = layouts
        self.pool = BlockPool(num_blocks, self.policy)
        self.kv = KVPool(layouts, num_blocks, self.block_size)

    def confirm(self, layouts: list[LayerLayout]) -> str | None:
        """Take ``layouts``, found by a real forward pass, as this store's; or say why it cannot.

        An unconfirmed store is empty, so a wrong prediction is replaced (the pool sized again from the
        same budget) before any block is stored.
        """
        with self.lock:
            if self.confirmed:
                return None if layouts == self.layouts else "the shared store holds K/V of another layout"
            if layouts != self.layouts:
                num_blocks = self.pool.num_blocks
                if self._max_memory is not None:
                    num_blocks = blocks_in(self._max_memory, layouts, self.block_size)
                    if num_blocks < 1:
                        return f"max_memory={self._max_memory} holds no block of the model's K/V; give more"
                logger.info("block store: the K/V layout differs from the config's; the empty pool is remade")
                self._build(layouts, num_blocks)
            self.confirmed = True
            return None

    def attach_tiers(self, tiers: Sequence[Tier]) -> TierStack:
        """Put ``tiers`` (fastest first) below the pool: evictions write back, lookups continue there."""
        if not self.confirmed:
            raise ValueError("tiers need a store whose K/V layout a forward pass confirmed (probe_layout)")
        with self.lock:
            self.tiers = TierStack(self, tiers)
        return self.tiers

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        *,
        block_size: int = 16,
        max_memory: int | str | None = None,
        num_blocks: int | None = None,
    ) -> BlockStore:
        """A store sized for ``model`` from ``num_blocks`` or ``max_memory`` (default 1GiB)."""
        return cls.sized(
            probe_layout(model), block_size=block_size, max_memory=max_memory, num_blocks=num_blocks
        )

    @classmethod
    def sized(
        cls,
        layouts: list[LayerLayout],
        *,
        block_size: int = 16,
        max_memory: int | str | None = None,
        num_blocks: int | None = None,
        confirmed: bool = True,
        snapshot_memory: int | str | None = None,
        policy: str = DEFAULT_POLICY,
    ) -> BlockStore:
        """A store for ``layouts`` holding ``num_blocks`` blocks, or as many as fit in ``max_memory``;
        ``confirmed=False`` for layouts predicted from a config (see ``confirm``). For a hybrid model,
        ``snapshot_memory`` (default a quarter of the budget) goes to state snapshots, the rest to blocks."""
        if num_blocks is not None and max_memory is not None:
            raise ValueError("pass either num_blocks or max_memory, not both")
        block_size = positive_int("block_size", block_size, "16")
        stateful = any(layout.states for layout in layouts)
        snapshots = parse_bytes(snapshot_memory) if snapshot_memory is not None else None
        budget = None
        if num_blocks is None:
            budget = parse_bytes(max_memory if max_memory is not None else DEFAULT_MAX_MEMORY)
            if stateful:
                if snapshots is None:
                    snapshots = int(budget * DEFAULT_SNAPSHOT_SHARE)
                if snapshots >= budget:
                    raise ValueError(
                        f"snapshot_memory={snapshot_memory!r} leaves nothing of max_memory for K/V blocks"
                    )
                budget -= snapshots
            num_blocks = blocks_in(budget, layouts, block_size)
            if num_blocks < 1:
                per_block = sum(layout.block_bytes(block_size) for layout in layouts)
                raise ValueError(f"max_memory={max_memory!r} is smaller than one block ({per_block} bytes)")
        logger.info(
            "block store: %d blocks of %d tokens over %d layers", num_blocks, block_size, len(layouts)
        )
        if stateful and snapshots is None:  # sized by num_blocks: snapshots get a third of the blocks' bytes
            per_block = sum(layout.block_bytes(block_size) for layout in layouts)
            snapshots = int(num_blocks * per_block * DEFAULT_SNAPSHOT_SHARE / (1 - DEFAULT_SNAPSHOT_SHARE))
        return cls(
            layouts,
            block_size=block_size,
            num_blocks=num_blocks,
            confirmed=confirmed,
            max_memory=budget,
            snapshot_memory=snapshots or 0,
            policy=policy,
        )

    # -- lookups -----------------------------------------------------------------------------------
    def chain_key(
        self, parent: Block | None, namespace: str, tokens: Sequence[int], extra_keys: tuple[Hashable, ...]
    ):
        parent_ref = parent.ref if parent is not None else root_ref(namespace)
        return (parent_ref, tuple(tokens), extra_keys)

    def match(
        self,
        namespace: str,
        tokens: Sequence[int],
        hashes: Sequence[BlockHash],
        max_blocks: int,
        extra_keys: tuple[Hashable, ...] = (),
    ) -> Match:
        """Reference and return the longest verified chain of cached blocks for ``tokens``.

        Where the pool's chain stops, lower tiers continue it (promoting their blocks into the pool); the
        result names the tier of each returned block. Tier reads happen outside the lock (``TierStack.promote``):
        the blocks found so far are referenced, so nothing another view does meanwhile can take them.
        """
        size = self.block_size
        limit = min(max_blocks, len(hashes))
        found = Match()
        try:
            with self.lock:
                self.pins.expire()
                for index in range(limit):
                    window = tokens[index * size : (index + 1) * size]
                    parent = found.blocks[-1] if found.blocks else None
                    key = self.chain_key(parent, namespace, window, extra_keys)
                    block = self.pool.lookup(hashes[index], key)
                    if block is None:
                        break
                    self.pool.touch(block)
                    found.blocks.append(block)
                    found.sources.append("device")
            if self.tiers is not None and len(found.blocks) < limit:
                self.tiers.promote(
                    namespace, tokens, hashes, found.blocks, limit, extra_keys, found.sources, found.plans
                )
        except BaseException:
            self.release(found.blocks)  # whatever raised, the caller never saw these references
            raise
        return found

    def read(self, layer: int, blocks: Sequence[Block]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv.read(layer, [b.block_id for b in blocks])

    # -- stores ------------------------------------------------------------------------------------
    def extend_chain(
        self,
        namespace: str,
        tokens: Sequence[int],
        hashes: Sequence[BlockHash],
        held: list[Block],
        write: WriteBlocks,
        extra_keys: tuple[Hashable, ...] = (),
    ) -> list[Block]:
        """Store the blocks of ``tokens`` after the referenced prefix ``held``; returns the referenced chain.

        Existing identical blocks are reused (stored once). The chain stops early when the pool is full of
        referenced blocks or a colliding block is in use. The caller releases the returned chain.
        """
        chain = list(held)
        with self.lock:
            self.pins.expire()
            try:
                self._extend(namespace, tokens, hashes, chain, write, extra_keys)
            except BaseException:
                self.pool.release(chain[len(held) :])  # only what this call took: ``held`` is the caller's
                raise
        return chain

    def _extend(self, namespace, tokens, hashes, chain: list[Block], write: WriteBlocks, extra_keys) -> None:
        """``extend_chain``'s work, appending each block to ``chain`` as soon as it is referenced."""
        size = self.block_size
        new_positions: list[int] = []
        new_blocks: list[tuple[Block, BlockHash, tuple]] = []
        pending: set[BlockHash] = set()  # hashes of new blocks not yet published
        for index in range(len(chain), len(hashes)):
            window = tokens[index * size : (index + 1) * size]
            key = self.chain_key(chain[-1] if chain else None, namespace, window, extra_keys)
            block = self.pool.lookup(hashes[index], key)
            if block is not None:
                self.pool.touch(block)
            else:
                occupant = self.pool.table.get(hashes[index])
                if hashes[index] in pending or (occupant is not None and occupant.ref_count > 0):
                    break  # a collision with a block in use: stop rather than overwrite it
                block = self.pool.allocate()
                if block is None:
                    break
                new_positions.append(index)
                new_blocks.append((block, hashes[index], key))
                pending.add(hashes[index])
            chain.append(block)
        if new_blocks:
            # Fresh blocks in ascending id order along the chain: a run of consecutive ids is read back
            # as one view and written with one copy (the LRU queue hands evicted chains out tail first).
            # Keys name the parent block, so they are made again for the new assignment.
            ordered = ascending([block for block, _, _ in new_blocks])
            for index, block in zip(new_positions, ordered):
                chain[index] = block
            new_blocks = [
                (block, block_hash, self.chain_key(chain[index - 1] if index else None, namespace,
                                                   tokens[index * size : (index + 1) * size], extra_keys))
                for index, block, (_, block_hash, _) in zip(new_positions, ordered, new_blocks)
            ]  # fmt: skip
            write(new_positions, [block.block_id for block, _, _ in new_blocks])
            for block, block_hash, key in new_blocks:
                self.pool.cache(block, block_hash, key)
            if self.tiers is not None:
                blocks = [block for block, _, _ in new_blocks]
                self.tiers.published(namespace, tokens, hashes, new_positions, blocks, extra_keys)

    def __getstate__(self):
        raise TypeError(
            "a BlockStore is live memory shared by threads and cannot be pickled or copied; make one per "
            "process with PrefixCache(model, ...) and share it within the process with store=cache.store"
        )

    def release(self, blocks: Sequence[Block]) -> None:
        with self.lock:
            self.pool.release(blocks)

    def clear(self) -> int:
        """Drop every stored block and snapshot (e.g. after a weight update), pins included."""
        with self.lock:
            self.pins.clear()
            if self.snapshots is not None:
                self.snapshots.clear()
            return self.pool.clear()

    def prioritize(self, blocks: Sequence[Block], levels: Sequence[int]) -> None:
        """Raise each block of a chain the caller references to its level (``priorities.py``)."""
        with self.lock:
            for block, level in zip(blocks, levels):
                self.pool.raise_priority(block, level)

    # -- accounting --------------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self.kv.capacity_bytes

    @property
    def committed_bytes(self) -> int:
        return self.kv.committed_bytes

    @property
    def used_bytes(self) -> int:
        return self.pool.num_cached * self.kv.block_bytes()

    def compatible_with(self, layouts: list[LayerLayout]) -> bool:
        return [(x.num_heads, x.head_dim, x.dtype, x.states) for x in layouts] == [
            (x.num_heads, x.head_dim, x.dtype, x.states) for x in self.layouts
        ]
