"""The policy between the device pool and the tiers below it.

- **Write-back to host**: a block the pool evicts is copied to the host tier first (if not there).
- **Write-through to disk/remote**: a block the store publishes is copied off the device and queued for
  every write-through tier that does not have it yet; those tiers write it in the background.
- **Lookup**: where the pool's chain stops, the chain continues in the host tier, then the next tier,
  stopping at the first block no tier has. Each hit is promoted into the pool like a new block
  (``allocate``: ref counts and capacity respected, the LRU victim written back), so it is then placed
  exactly as a pool hit is.

The pool names parents by block reference, which dies with the process; the lower tiers name them by
hash. ``TierStack`` remembers, per published pool block, the (tier namespace, parent hash, tokens) that
an entry needs, checked against the block's hash and generation so a reused block is never written back
under an old identity.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .block_pool import ascending
from .cost_model import CostModel, FetchPlan, Segment, layout_costs
from .hashing import BlockHash
from .identity import root_of, tier_digest
from .tiers.base import BlockData, BlockRequest, Tier
from .tiers.entry import FORMAT_VERSION, unpack

if TYPE_CHECKING:
    from .block_pool import Block
    from .store import BlockStore

logger = logging.getLogger(__name__)

PIPELINE_BATCH = 16  # blocks per fetch batch (where reads overlap, the next is read while this one is placed)


@dataclass(frozen=True, slots=True)
class _Origin:
    namespace: bytes
    block_hash: bytes
    parent_hash: bytes
    tokens: tuple[int, ...]
    generation: int


class TierStack:
    """The tiers of one block store, fastest first (``host`` before ``disk``/``remote``)."""

    def __init__(self, store: BlockStore, tiers: Sequence[Tier]):
        if not tiers:
            raise ValueError("a TierStack needs at least one tier")
        self.store = store
        self.tiers = list(tiers)
        self.host = next((tier for tier in self.tiers if tier.write_back), None)  # the write-back target
        self.write_through = [tier for tier in self.tiers if tier is not self.host]
        self._origins: dict[int, _Origin] = {}
        self._namespaces: dict[tuple[str, tuple], bytes] = {}
        self.cost = CostModel(*layout_costs(store.layouts))  # PrefixCache gives it the model's prior
        self.batch_blocks = PIPELINE_BATCH
        # Whether a prefetch thread reads batch k+1 while this thread places batch k: None decides by the
        # machine (``overlaps``), True / False force it.
        self.overlap: bool | None = None
        store.pool.on_evict = self.evicting
        for tier in self.tiers:  # size sweeps skip the entries of blocks pinned in this process
            tier.kept = lambda pins=store.pins: pins.hashes

    def namespace(self, namespace: str, extra_keys: tuple[Hashable, ...] = ()) -> bytes:
        key = (namespace, tuple(extra_keys))
        digest = self._namespaces.get(key)
        if digest is None:
            digest = tier_digest(
                namespace,
                self.store.block_size,
                self.store.layouts,
                extra_keys,
                format_version=FORMAT_VERSION,
            )
            self._namespaces[key] = digest
        return digest

    # -- block data ----------------------------------------------------------------------------------
    def _read_block(self, block: Block, origin: _Origin) -> BlockData:
        """A CPU copy of one pool block's K/V across all layers: one contiguous tensor per layer run
        (the entry format's packing), so a tier keeps one allocation per block, not two per layer."""
        kv = self.store.kv
        packed = kv.read_packed(block.block_id)
        keys, values = unpack(packed, len(kv.keys))
        return BlockData(origin.block_hash, origin.parent_hash, origin.tokens, keys, values, packed=packed)

    # -- store hooks (called with the store's lock held) -----------------------------------------------
    def published(
        self,
        namespace: str,
        tokens: Sequence[int],
        hashes: Sequence[BlockHash],
        positions: Sequence[int],
        blocks: Sequence[Block],
        extra_keys: tuple[Hashable, ...] = (),
    ) -> None:
        """Remember the identity of newly cached pool blocks and write them through to disk/remote."""
        try:
            self._publish(namespace, tokens, hashes, positions, blocks, extra_keys)
        except Exception as error:  # the blocks stay in the pool; only the lower copies are missing
            (self.write_through or self.tiers)[0].error(
                "publish", f"could not copy new blocks down ({error!r})"
            )

    def _publish(self, namespace, tokens, hashes, positions, blocks, extra_keys) -> None:
        digest = self.namespace(namespace, extra_keys)
        root = root_of(namespace)
        size = self.store.block_size
        outgoing: dict[int, list[BlockData]] = {}
        for position, block in zip(positions, blocks):
            parent = hashes[position - 1] if position else root
            window = tuple(tokens[position * size : (position + 1) * size])
            origin = _Origin(digest, hashes[position], parent, window, block.generation)
            self._origins[block.block_id] = origin
            targets = [
                i for i, tier in enumerate(self.write_through) if not self._safe_has(tier, digest, origin)
            ]
            if targets:
                data = self._read_block(block, origin)
                for index in targets:
                    outgoing.setdefault(index, []).append(data)
        for index, data in outgoing.items():
            tier = self.write_through[index]
            try:
                tier.put(digest, data)
            except Exception as error:
                tier.error("put", f"write-through failed ({error!r})")

    def _safe_has(self, tier: Tier, digest: bytes, origin: _Origin) -> bool:
        try:
            return tier.has(digest, origin.block_hash)
        except Exception:
            return False

    def evicting(self, block: Block) -> None:
        """The pool is about to reuse ``block``: copy it to the host tier first (write-back)."""
        origin = self._origins.pop(block.block_id, None)
        if self.host is None or origin is None:
            return
        if origin.block_hash != block.block_hash or origin.generation != block.generation:
            return  # republished through a path that did not tell us: its identity is unknown
        try:
            if not self.host.has(origin.namespace, origin.block_hash):
                data = self._read_block(block, origin)
                data.priority = block.priority  # the priority travels with the block (and comes back)
                self.host.put(origin.namespace, [data])
        except Exception as error:
            self.host.error("write-back", f"could not keep an evicted block ({error!r})")

    def promote(
        self,
        namespace: str,
        tokens: Sequence[int],
        hashes: Sequence[BlockHash],
        chain: list[Block],
        limit: int,
        extra_keys: tuple[Hashable, ...],
        sources: list[str] | None,
        plans: list[FetchPlan] | None = None,
    ) -> list[Block]:
        """Continue ``chain`` (pool blocks the caller references) from the tiers up to ``limit`` blocks;
        returns the newly referenced blocks (promoted into the pool), stopping at the first block no tier has.

        First each tier says how many blocks it holds (``_plan``); the cost model decides how many of them
        to fetch (``plans`` receives its ``FetchPlan``); then they are fetched, verified and placed batch
        by batch (``_stream_in``), and a skipped tier the plan probes is timed on one block (``_probe``).

        Called WITHOUT the store's lock: the tier reads (a disk read, a Redis round trip) and the copy into
        the pool run unlocked, so other views keep using the store meanwhile; only the bookkeeping before
        and after takes the lock (vLLM's ``prepare_load`` / ``complete_load``).
        """
        start = len(chain)
        if start >= limit:
            return []
        digest = self.namespace(namespace, extra_keys)
        root = root_of(namespace)
        size = self.store.block_size
        requests = [
            BlockRequest(hashes[i], hashes[i - 1] if i else root, tuple(tokens[i * size : (i + 1) * size]))
            for i in range(start, limit)
        ]
        try:
            segments = self._plan(digest, requests)
        except Exception as error:
            self.tiers[0].error("lookup", f"lookup failed ({error!r})")
            return []
        if not segments:
            return []
        blocks, plan = self.cost.choose(
            start, len(tokens), [s for s, _ in segments], size, self.store.kv.block_bytes(), self.batch_blocks
        )
        if plans is not None:
            plans.append(plan)
        for segment, tier in segments:
            below = segment.min_tokens is not None and segment.blocks * size < segment.min_tokens
            if below and hasattr(tier.counters, "below_threshold"):
                tier.count(below_threshold=1)
        promoted = []
        if blocks:
            promoted = self._stream_in(
                namespace, digest, chain, requests[:blocks], segments, extra_keys, sources
            )
        if plan.probe is not None and len(promoted) == blocks < len(requests):
            self._probe(digest, requests[blocks], segments, plan.probe)
        return promoted

    def _probe(self, digest: bytes, request: BlockRequest, segments, tier_name: str) -> None:
        """Fetch, verify and time one block of a skipped tier, so that a link that got faster is noticed;
        the block is dropped (the call recomputes it, see ``cost_model``)."""
        tier = next((tier for segment, tier in segments if tier.name == tier_name), None)
        if tier is None:
            return
        started = time.perf_counter()
        try:
            found = [data for batch in tier.stream(digest, [request], 1) for data in batch]
        except Exception as error:
            tier.error("get", f"probe failed ({error!r})")
            return
        if found and found[0].matches(request):
            self.cost.observe_transfer(
                tier.name, self.store.kv.block_bytes(), time.perf_counter() - started, 1
            )

    def _plan(self, digest: bytes, requests: list[BlockRequest]) -> list[tuple[Segment, Tier]]:
        """Which tier holds which run of ``requests``: each tier continues where the one above stops (its
        lookup timed: the round trip the cost model charges per fetch)."""
        segments: list[tuple[Segment, Tier]] = []
        position = 0
        for tier in self.tiers:
            if position == len(requests):
                break
            started = time.perf_counter()
            try:
                count = tier.lookup(digest, requests[position:])
            except Exception as error:
                tier.error("get", f"lookup failed ({error!r})")
                count = 0
            self.cost.observe_lookup(tier.name, time.perf_counter() - started)
            if count:
                segment = Segment(tier.name, position, count, tier.cost_decided, tier.min_tokens)
                segments.append((segment, tier))
                position += count
        return segments

    def _stream_in(self, namespace, digest, chain, requests, segments, extra_keys, sources) -> list[Block]:
        """Fetch ``requests`` from their tiers and place them, batch by batch; where ``overlaps()``, a
        prefetch thread reads and verifies the next batch while this thread copies the current one into the
        pool. The chain stops exactly at the first block that is missing, bad, or fails to place."""
        with self.store.lock:  # the whole run at once: consecutive ids, read back as one view per layer
            reserved = self._reserve_for(requests)
        requests = requests[: len(reserved)]
        feed = _Prefetch(
            self._batches(digest, requests, segments),
            parallel=len(requests) > self.batch_blocks and self.overlaps(),
        )
        promoted: list[Block] = []
        spans: dict[str, list] = {}
        used = 0
        started = time.perf_counter()
        try:
            for tier_name, found in feed:
                blocks, used = reserved[used : used + len(found)], used + len(found)  # now _place's to free
                placed = self._place(namespace, digest, chain, found, extra_keys, sources, blocks)
                promoted.extend(placed)
                now = time.perf_counter()
                span = spans.setdefault(tier_name, [started, now, 0, 0])
                span[1:] = [now, span[2] + len(placed), span[3] + 1]
                started = now
                if len(placed) < len(found):
                    break
        finally:
            feed.close()
            with self.store.lock:
                self.store.pool.release(reserved[used:])  # reserved for blocks that never came
        block_bytes = self.store.kv.block_bytes()
        for tier_name, (begin, end, count, batches) in spans.items():
            self.cost.observe_transfer(tier_name, count * block_bytes, end - begin, batches)
        return promoted

    def overlaps(self) -> bool:
        """Overlap the reads with the placement only where they do not fight over the same cores: a pool
        off the CPU (the copies are the device's work), or a core left beside torch's intra-op threads.
        On a CPU pool using every core, a second thread's reads (page faults, checksums, socket copies)
        stall torch's thread team mid-copy: measured on 2 cores, 2 threads, 2000 cached tokens, the
        overlapped disk promotion took 60-100 ms against 55 ms in turn, a Redis hit 1.83x device warm
        against 1.52x."""
        if self.overlap is not None:
            return self.overlap
        if any(layout.device.type != "cpu" for layout in self.store.layouts):
            return True
        return torch.get_num_threads() < (os.cpu_count() or 1)

    def _reserve_for(self, requests: list[BlockRequest]) -> list[Block]:
        """Referenced empty pool blocks for ``requests``, in ascending id order (see ``BlockStore._extend``);
        fewer when the pool is full of referenced blocks or a block in use has a requested hash."""
        pool = self.store.pool
        taken: list[Block] = []
        for request in requests:
            occupant = pool.table.get(request.block_hash)
            if occupant is not None and occupant.ref_count > 0:
                break  # a colliding block in use: stop rather than overwrite it
            block = pool.allocate()
            if block is None:
                break  # every block is referenced: a shorter hit
            taken.append(block)
        ordered = ascending(taken)
        self.store.kv.mark_written([block.block_id for block in ordered])  # the copies then only read marks
        return ordered

    def _batches(self, digest, requests, segments):
        """(tier name, verified blocks) per batch, in chain order, ending at the first block not served."""
        for segment, tier in segments:
            if segment.start >= len(requests):
                return
            wanted = requests[segment.start : segment.start + segment.blocks]
            served = 0
            try:
                for blocks in tier.stream(digest, wanted, self.batch_blocks):
                    found = []
                    for data in blocks:
                        if served >= len(wanted) or not data.matches(wanted[served]):
                            break
                        found.append((data, tier.name))
                        served += 1
                    if found:
                        yield tier.name, found
                    if len(found) < len(blocks):
                        return
            except Exception as error:
                tier.error("get", f"lookup failed ({error!r})")
                return
            if served < len(wanted):
                return

    def _place(self, namespace, digest, chain, found, extra_keys, sources, reserved) -> list[Block]:
        """Admit ``found`` into the pool as new blocks are admitted: copy the K/V into the ``reserved``
        blocks (unlocked: they are referenced by this call alone and not published yet; from here on
        this method frees them on failure), then publish them (locked), appending each to ``chain``."""
        taken = [(block, data, name) for block, (data, name) in zip(reserved, found)]
        if not taken:
            return []
        try:
            self._copy_in(taken)
        except BaseException as error:  # an interrupt too: the reserved blocks are nobody else's
            with self.store.lock:
                self.store.pool.release([block for block, _, _ in taken])
            if not isinstance(error, Exception):
                raise
            self.tiers[0].error("promote", f"could not copy blocks into the pool ({error!r})")
            return []
        with self.store.lock:
            return self._publish_promoted(namespace, digest, chain, taken, extra_keys, sources)

    def _copy_in(self, taken: list[tuple[Block, BlockData, str]]) -> None:
        kv = self.store.kv
        ids = [block.block_id for block, _, _ in taken]
        if all(kv.fits_packed(data.packed) for _, data, _ in taken):  # one copy per block and layer group
            kv.write_packed(ids, [data.packed for _, data, _ in taken])
            return

        for layer in range(len(kv.keys)):  # blocks without a packed tensor (another tier's own): per layer
            keys = [data.keys[layer] for _, data, _ in taken]
            values = [data.values[layer] for _, data, _ in taken]
            kv.write_blocks(layer, ids, keys, values)

    def _publish_promoted(self, namespace, digest, chain, taken, extra_keys, sources) -> list[Block]:
        """Cache the copied blocks under their chain keys. A block another view published meanwhile (same
        parent and tokens) is taken instead of ours; one in use under another key ends the chain there."""
        pool = self.store.pool
        promoted: list[Block] = []
        for index, (block, data, tier_name) in enumerate(taken):
            parent = chain[-1] if chain else None
            key = self.store.chain_key(parent, namespace, data.tokens, extra_keys)
            occupant = pool.table.get(data.block_hash)
            if occupant is not None and occupant.key == key:
                pool.touch(occupant)  # the same block, published by another view while we copied
                pool.release([block])
                block = occupant
            elif occupant is not None and occupant.ref_count > 0:
                pool.release([b for b, _, _ in taken[index:]])
                break
            else:
                pool.cache(block, data.block_hash, key)
                block.priority = data.priority
                self._origins[block.block_id] = _Origin(
                    digest, data.block_hash, data.parent_hash, tuple(data.tokens), block.generation
                )
            chain.append(block)
            promoted.append(block)
            if sources is not None:
                sources.append(tier_name)
        return promoted

    # -- maintenance ---------------------------------------------------------------------------------
    # -- recurrent-state snapshots (hybrid models) ---------------------------------------------------
    def put_state(self, namespace: str, extra_keys, block_hash: bytes, tokens: int, layers: list) -> None:
        """Give a snapshot the device store took to every tier (written through, like its blocks)."""
        digest = self.namespace(namespace, extra_keys)
        for tier in self.tiers:
            try:
                tier.put_state(digest, block_hash, tokens, layers)
            except Exception as error:  # a tier failure is a dropped write, never the caller's exception
                tier.error("state", f"storing a state failed ({error!r})")

    def get_state(self, namespace: str, extra_keys, block_hash: bytes) -> tuple[int, list, str] | None:
        """(tokens, layers, tier name) of the snapshot ending with ``block_hash`` in the fastest tier
        holding a valid one; None if none does."""
        digest = self.namespace(namespace, extra_keys)
        for tier in self.tiers:
            try:
                found = tier.get_state(digest, block_hash, self.store.layouts)
            except Exception as error:
                tier.error("state", f"reading a state failed ({error!r})")
                continue
            if found is not None:
                return found[0], found[1], tier.name
        return None

    def spill_device(self) -> int:
        """Evict every unreferenced device block as memory pressure would (host write-back included);
        for benchmarks and demos of a cold device pool over warm lower tiers. Returns how many."""
        pool = self.store.pool
        with self.store.lock:
            cached = pool.num_cached
            taken = []
            while (block := pool.allocate()) is not None:
                taken.append(block)
            pool.release(taken)
            return cached - pool.num_cached

    def clear(self, namespace: bytes | None) -> dict[str, int]:
        """Empty the host tier and the ``namespace`` entries of the other tiers; returns counts by tier."""
        self._origins.clear()
        removed = {}
        for tier in self.tiers:
            try:
                removed[tier.name] = tier.clear(None if tier is self.host else namespace)
            except Exception as error:
                tier.error("clear", f"clear failed ({error!r})")
                removed[tier.name] = 0
        return removed

    def flush(self, timeout: float | None = None) -> bool:
        return all([tier.flush(timeout) for tier in self.tiers])

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()

    def counters(self) -> dict[str, dict]:
        return {tier.name: tier.counters.as_dict() for tier in self.tiers}

    @property
    def errors(self) -> int:
        return sum(tier.counters.errors for tier in self.tiers)


class _Prefetch:
    """Runs a generator of batches one step ahead on a thread of its own (when ``parallel``), so its
    reads overlap the consumer's placement. ``close`` stops it and waits for it: nothing it produced is
    referenced by the pool, so stopping early leaks nothing."""

    _END = object()

    def __init__(self, batches, parallel: bool):
        self._batches = batches
        self._thread = None
        if parallel:
            self._queue: queue.Queue = queue.Queue(maxsize=1)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, name="hf_prefix_cache-prefetch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._batches:
                if not self._put(item):
                    return
        except BaseException as error:  # the generator reports tier errors itself; anything else ends it
            logger.debug("prefetch ended by %r", error)
        finally:
            self._batches.close()
            self._put(self._END)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        if self._thread is None:
            yield from self._batches
            return
        while (item := self._queue.get()) is not self._END:
            yield item

    def close(self) -> None:
        if self._thread is None:
            self._batches.close()
            return
        self._stop.set()
        self._thread.join()
