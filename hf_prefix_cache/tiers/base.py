"""The tier boundary: what every storage tier below the device pool (host RAM, disk, a remote server)
offers the block store, and the counters it keeps.

A tier stores whole blocks (every layer's K and V of ``block_size`` tokens) under
``(namespace digest, block hash)``. Lookups go down a chain and stop at the first missing or invalid
block; every failure inside a tier is a miss, counted in ``counters`` and warned about once, never an
exception to the caller. A remote tier (Redis) is one more subclass.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch

logger = logging.getLogger(__name__)


class TierWarning(UserWarning):
    """A storage tier failed (bad entry, full disk, unreachable folder); the cache recomputes instead."""


@dataclass(frozen=True)
class BlockRequest:
    """What the caller expects of one block: its hash, its parent's hash and its token ids."""

    block_hash: bytes
    parent_hash: bytes
    tokens: tuple[int, ...]


@dataclass
class BlockData:
    """One block's K/V across all layers, each ``[heads, block_size, head_dim]``, plus its identity."""

    block_hash: bytes
    parent_hash: bytes
    tokens: tuple[int, ...]
    keys: Sequence[torch.Tensor]  # a list, or lazily made views of ``packed``
    values: Sequence[torch.Tensor]
    priority: int = 0  # the pool block's retention priority: the host tier evicts lower ones first
    # The same K/V as one tensor per layer group (``tiers.entry.pack``'s layout), which ``keys``/``values``
    # are views of, when the block came that way (a decoded entry, a pool block copied down): the pool
    # then takes it with one copy per group instead of one per layer. None: only the per-layer lists.
    packed: dict[str, torch.Tensor] | None = field(default=None, compare=False, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))

    def matches(self, request: BlockRequest) -> bool:
        return (
            self.block_hash == request.block_hash
            and self.parent_hash == request.parent_hash
            and tuple(self.tokens) == tuple(request.tokens)
        )


@dataclass
class TierCounters:
    """Per-tier counters since the tier was made (blocks, bytes, failures)."""

    hits: int = 0  # blocks returned by get
    misses: int = 0  # lookups that stopped at a block the tier did not have
    puts: int = 0  # blocks stored
    skipped: int = 0  # puts of blocks the tier already had
    dropped: int = 0  # puts given up because the write queue was full
    evictions: int = 0  # blocks removed to stay within the size limit
    errors: int = 0  # bad entries, failed reads or writes (each also a miss or a dropped write)
    bytes_read: int = 0
    bytes_written: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


class Tier(ABC):
    """A store of blocks below the device pool. Subclasses implement the five operations below."""

    name: str = "tier"
    # True: the tier receives the blocks the pool evicts (write-back; the host tier). False: it receives
    # every block the pool publishes, in the background (write-through; disk, remote).
    write_back: bool = False
    # True: the cost model (``hf_prefix_cache.cost_model``) decides per call whether fetching this tier's
    # blocks beats recomputing them; False: whatever the tier holds is used (host RAM, a local folder).
    cost_decided: bool = False
    # A fixed threshold that overrides the cost model for this tier: fetch only hits of at least this many
    # tokens (``remote_min_tokens=``); None lets the cost model decide.
    min_tokens: int | None = None

    def __init__(self) -> None:
        self.counters = TierCounters()
        self.kept: Callable[[], frozenset[bytes]] = frozenset  # block hashes its size limit must not evict
        self._warned: set[str] = set()
        self._count_lock = threading.Lock()
        _TIERS.add(self)

    def _after_fork(self) -> None:
        """In a forked child: new locks (a parent thread may have held one at the fork, and it never
        releases it here). Subclasses renew their own locks too."""
        self._count_lock = threading.Lock()

    @abstractmethod
    def get(self, namespace: bytes, requests: Sequence[BlockRequest]) -> list[BlockData]:
        """The verified blocks for the leading ``requests``, stopping at the first miss or bad entry."""

    def stream(
        self, namespace: bytes, requests: Sequence[BlockRequest], batch: int
    ) -> Iterator[list[BlockData]]:
        """The verified blocks for the leading ``requests`` (which ``contains`` found), ``batch`` at a time,
        so the caller places one batch while the next is read; ends at the first miss or bad entry.
        Runs on a prefetch thread: a tier that overrides it must be safe to call from one."""
        yield self.get(namespace, requests)

    def lookup(self, namespace: bytes, requests: Sequence[BlockRequest]) -> int:
        """How many leading ``requests`` the tier holds, before any is fetched (unverified: ``stream``
        verifies). A network tier answers in one round trip; the cost model times it."""
        return self.contains(namespace, [request.block_hash for request in requests])

    def contains(self, namespace: bytes, block_hashes: Sequence[bytes]) -> int:
        """How many leading ``block_hashes`` the tier holds (unverified; ``get`` verifies)."""
        count = 0
        for block_hash in block_hashes:
            if not self.has(namespace, block_hash):
                break
            count += 1
        return count

    @abstractmethod
    def has(self, namespace: bytes, block_hash: bytes) -> bool:
        """Whether an entry exists for ``block_hash`` (cheap; unverified)."""

    @abstractmethod
    def put(self, namespace: bytes, blocks: Sequence[BlockData]) -> None:
        """Store ``blocks`` (tensors on CPU, owned by the tier from now on); may return before they land."""

    @abstractmethod
    def delete(self, namespace: bytes, block_hash: bytes) -> None:
        """Remove one entry if present."""

    @abstractmethod
    def clear(self, namespace: bytes | None = None) -> int:
        """Remove every entry of ``namespace`` (all namespaces with None); returns how many."""

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued writes have landed; False if ``timeout`` ran out first."""
        return True

    # -- recurrent-state snapshots of hybrid models (``state_entry``) ---------------------------------
    def put_state(self, namespace: bytes, block_hash: bytes, tokens: int, layers: list) -> None:
        """Keep the snapshot taken after ``tokens`` tokens, ending with the block ``block_hash``
        (``layers``: per layer ``{state index: (conv, recurrent)}`` or None). Default: not kept."""
        return None

    def get_state(self, namespace: bytes, block_hash: bytes, layouts: list) -> tuple[int, list] | None:
        """The verified snapshot ending with ``block_hash`` as (tokens, layers), or None."""
        return None

    def close(self) -> None:
        """Flush (bounded) and release resources; the tier serves nothing afterwards."""
        self.flush(10.0)

    # -- shared helpers ------------------------------------------------------------------------------
    def count(self, **amounts: int) -> None:
        with self._count_lock:
            for name, amount in amounts.items():
                setattr(self.counters, name, getattr(self.counters, name) + amount)

    def error(self, kind: str, message: str) -> None:
        """Count a failure and warn once per kind; the operation that hit it becomes a miss or a drop."""
        with self._count_lock:
            self.counters.errors += 1
            self.counters.error_kinds[kind] = self.counters.error_kinds.get(kind, 0) + 1
            first = kind not in self._warned
            self._warned.add(kind)
        logger.debug("%s tier: %s: %s", self.name, kind, message)
        if first:
            warnings.warn(
                f"hf_prefix_cache {self.name} tier ({kind}): {message}; treated as a miss (counted in "
                f"cache.stats.tier_errors, shown once)",
                TierWarning,
                stacklevel=2,
            )


_TIERS: weakref.WeakSet[Tier] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for tier in list(_TIERS):
        tier._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
