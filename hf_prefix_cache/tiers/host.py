"""The host tier: blocks in CPU RAM, LRU by bytes within a priority (the lowest goes first), never a
pinned block's entry; pinned memory when the device pool is on CUDA.

It receives the device pool's evictions (write-back), so a pool that is too small spills here instead
of losing blocks. Entries are tensors, not encoded bytes: nothing leaves the process, and a hit is
verified against the hash, parent and tokens like a pool hit.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from ..layout import LayerLayout
from ..memory import available_bytes, format_bytes, parse_bytes, suggested_size
from .base import BlockData, BlockRequest, Tier
from .entry import unpack
from .kind import TierKind

STATE_SHARE = 4  # snapshots may take 1/STATE_SHARE of the host tier's capacity, beside its blocks


class HostTier(Tier):
    name = "host"
    write_back = True

    def __init__(self, capacity: int | str, *, pin_memory: bool = False):
        super().__init__()
        self.capacity = parse_bytes(capacity, "host_memory")
        self.pin_memory = pin_memory
        self.used = 0
        self._entries: OrderedDict[tuple[bytes, bytes], BlockData] = OrderedDict()
        # the same keys by the entry's priority, each in LRU order (the lowest priority is evicted first)
        self._levels: dict[int, OrderedDict[tuple[bytes, bytes], None]] = {}
        # recurrent-state snapshots of hybrid models: LRU within their own share of the capacity
        self._states: OrderedDict[tuple[bytes, bytes], tuple[int, list, int]] = OrderedDict()
        self.state_bytes = 0
        self._lock = threading.Lock()

    def _after_fork(self) -> None:
        super()._after_fork()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def has(self, namespace: bytes, block_hash: bytes) -> bool:
        return (namespace, block_hash) in self._entries

    def get(self, namespace: bytes, requests: Sequence[BlockRequest]) -> list[BlockData]:
        found = []
        with self._lock:
            for request in requests:
                entry = self._entries.get((namespace, request.block_hash))
                if entry is None or not entry.matches(request):
                    self.counters.misses += 1
                    break
                self._entries.move_to_end((namespace, request.block_hash))
                self._levels[entry.priority].move_to_end((namespace, request.block_hash))
                found.append(entry)
            self.counters.hits += len(found)
            self.counters.bytes_read += sum(entry.nbytes for entry in found)
        return found

    def put(self, namespace: bytes, blocks: Sequence[BlockData]) -> None:
        with self._lock:
            for block in blocks:
                key = (namespace, block.block_hash)
                if key in self._entries:
                    self._entries.move_to_end(key)
                    self._levels[self._entries[key].priority].move_to_end(key)
                    self.counters.skipped += 1
                    continue
                if block.nbytes > self.capacity:
                    self.counters.dropped += 1
                    continue
                while self.used + block.nbytes > self.capacity and self._evict_one():
                    self.counters.evictions += 1
                if self.used + block.nbytes > self.capacity:  # the rest is pinned
                    self.counters.dropped += 1
                    continue
                stored = self._owned(block)
                stored.priority = block.priority
                self._entries[key] = stored
                self._levels.setdefault(stored.priority, OrderedDict())[key] = None
                self.used += stored.nbytes
                self.counters.puts += 1
                self.counters.bytes_written += stored.nbytes

    def _evict_one(self) -> bool:
        """Drop the least recently used entry of the lowest priority that no pin keeps; False if none."""
        kept = self.kept()
        for priority in sorted(self._levels):
            for key in self._levels[priority]:
                if key[1] not in kept:
                    self._remove(key)
                    return True
        return False

    def _remove(self, key: tuple[bytes, bytes]) -> BlockData:
        entry = self._entries.pop(key)
        level = self._levels[entry.priority]
        del level[key]
        if not level:
            del self._levels[entry.priority]
        self.used -= entry.nbytes
        return entry

    def _owned(self, block: BlockData) -> BlockData:
        """A CPU copy (pinned on CUDA hosts) unless ``block`` already is one the tier may keep."""
        if not self.pin_memory and all(t.device.type == "cpu" for t in (*block.keys, *block.values)):
            return block
        if block.packed is not None:  # one copy per layer group, and the pool takes it back the same way
            packed = {name: self._to_host(t) for name, t in block.packed.items()}
            keys, values = unpack(packed, len(block.keys))
            return BlockData(block.block_hash, block.parent_hash, block.tokens, keys, values, packed=packed)
        keys = [self._to_host(t) for t in block.keys]
        values = [self._to_host(t) for t in block.values]
        return BlockData(block.block_hash, block.parent_hash, block.tokens, keys, values)

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "cpu" and (not self.pin_memory or tensor.is_pinned()):
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self.pin_memory)
        host.copy_(tensor)
        return host

    def put_state(self, namespace: bytes, block_hash: bytes, tokens: int, layers: list) -> None:
        host = [
            {
                index: tuple(None if t is None else self._to_host(t) for t in pair)
                for index, pair in state.items()
            }
            if state
            else None
            for state in layers
        ]
        nbytes = sum(
            t.nbytes for state in host if state for pair in state.values() for t in pair if t is not None
        )
        budget = self.capacity // STATE_SHARE
        with self._lock:
            old = self._states.pop((namespace, block_hash), None)
            if old is not None:
                self.state_bytes -= old[2]
            if nbytes > budget:
                return
            while self.state_bytes + nbytes > budget:
                _, (_, _, dropped) = self._states.popitem(last=False)
                self.state_bytes -= dropped
            self._states[(namespace, block_hash)] = (tokens, host, nbytes)
            self.state_bytes += nbytes

    def get_state(self, namespace: bytes, block_hash: bytes, layouts: list) -> tuple[int, list] | None:
        with self._lock:
            found = self._states.get((namespace, block_hash))
            if found is None:
                return None
            self._states.move_to_end((namespace, block_hash))
            return found[0], found[1]

    def delete(self, namespace: bytes, block_hash: bytes) -> None:
        with self._lock:
            if (namespace, block_hash) in self._entries:
                self._remove((namespace, block_hash))

    def clear(self, namespace: bytes | None = None) -> int:
        with self._lock:
            doomed = [key for key in self._entries if namespace is None or key[0] == namespace]
            for key in doomed:
                self._remove(key)
            for key in [key for key in self._states if namespace is None or key[0] == namespace]:
                self.state_bytes -= self._states.pop(key)[2]
        return len(doomed)


def check_host_memory(host_memory: int | str) -> None:
    """Refuse, with the fix, a host tier larger than the RAM available now."""
    size = parse_bytes(host_memory, "host_memory")
    free = available_bytes(torch.device("cpu"))
    if free is not None and size > free:
        raise ValueError(
            f"host_memory={host_memory!r} ({format_bytes(size)}) is more than the {format_bytes(free)} of RAM "
            f"available; pass a smaller host_memory= (e.g. '{suggested_size(free)}'), or drop it"
        )


def build(host_memory: int | str, *, layouts: list[LayerLayout], key=None) -> HostTier:
    """The host tier of ``PrefixCache(host_memory=...)``: pinned when the pool is on CUDA."""
    check_host_memory(host_memory)
    return HostTier(host_memory, pin_memory=any(layout.device.type == "cuda" for layout in layouts))


HOST = TierKind("host", "host_memory", "a size such as '8GiB'", build)
