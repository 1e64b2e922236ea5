"""K/V tensors, one pair per layer, on that layer's own device and dtype, committed on demand.

Layout per layer is ``[heads, num_blocks, block_size, head_dim]`` so that gathering a chain of blocks
with ``index_select`` yields ``[heads, n * block_size, head_dim]`` with a single copy.

Memory policy. The tensors are made with ``torch.empty``, never filled: a block is only ever read after
it was written. On CPU a large ``torch.empty`` is an untouched anonymous mapping, so the operating system
commits pages only when a block is first written: construction costs the same whatever the budget, and
resident memory follows the stored blocks (``committed_bytes``), not ``max_memory``. The block pool hands
out the lowest never-used block ids first, so the touched pages stay packed. On CUDA the caching
allocator reserves the whole budget at construction, as vLLM does (preallocation, but without a fill
kernel): size ``max_memory`` for the device, and ``committed_bytes`` reports the full budget there.
"""

from __future__ import annotations

import torch

from .layout import LayerLayout

MAX_DIRECT_RUNS = 8  # more runs of consecutive ids than this are gathered at once (reads and writes)


class KVPool:
    def __init__(self, layouts: list[LayerLayout], num_blocks: int, block_size: int):
        self.layouts = layouts
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.keys = [self._empty(layout, num_blocks) for layout in layouts]
        self.values = [self._empty(layout, num_blocks) for layout in layouts]
        self._written = bytearray(num_blocks)  # 1 where a block was ever written (its pages are committed)
        self._num_written = 0

    def _empty(self, layout: LayerLayout, num_blocks: int) -> torch.Tensor:
        shape = (layout.num_heads, num_blocks, self.block_size, layout.head_dim)
        return torch.empty(shape, dtype=layout.dtype, device=layout.device)

    @property
    def capacity_bytes(self) -> int:
        """The budget: bytes the pool may grow to."""
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))

    @property
    def committed_bytes(self) -> int:
        """Bytes backed by memory now: blocks ever written on CPU (pages touched), everything elsewhere."""
        on_demand = sum(x.block_bytes(self.block_size) for x in self.layouts if x.device.type == "cpu")
        return self._num_written * on_demand + self.num_blocks * (self.block_bytes() - on_demand)

    def block_bytes(self) -> int:
        return sum(layout.block_bytes(self.block_size) for layout in self.layouts)

    def _ids(self, block_ids: list[int], device: torch.device) -> torch.Tensor:
        return torch.tensor(block_ids, dtype=torch.long, device=device)

    def mark_written(self, block_ids: list[int]) -> None:
        """Count ``block_ids`` as committed memory (idempotent)."""
        for block_id in block_ids:
            if not self._written[block_id]:
                self._written[block_id] = 1
                self._num_written += 1

    def read(self, layer: int, block_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``block_ids`` in order, each ``[heads, len(block_ids) * block_size, head_dim]``.

        Consecutive ids (a chain stored by one call) come back as VIEWS of the pool, without a copy: use
        or copy them while the blocks are referenced, never keep them past ``release``. Other chains are
        gathered into new tensors.
        """
        keys, values = self.keys[layer], self.values[layer]
        heads, _, block_size, head_dim = keys.shape
        shape = (heads, len(block_ids) * block_size, head_dim)
        first = block_ids[0] if block_ids else 0
        if block_ids == list(range(first, first + len(block_ids))):
            end = first + len(block_ids)
            return keys[:, first:end].view(shape), values[:, first:end].view(shape)
        ids = self._ids(block_ids, keys.device)
        return keys.index_select(1, ids).view(shape), values.index_select(1, ids).view(shape)

    def write(self, layer: int, block_ids: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``keys``/``values`` (``[heads, len(block_ids) * block_size, head_dim]``) into ``block_ids``."""
        self.mark_written(block_ids)
        pool_k, pool_v = self.keys[layer], self.values[layer]
        heads, _, block_size, head_dim = pool_k.shape
        shape = (heads, len(block_ids), block_size, head_dim)
        first = block_ids[0]
        if block_ids == list(range(first, first + len(block_ids))):  # one strided copy, no index tensor
            pool_k[:, first : first + len(block_ids)].copy_(keys.view(shape))
            pool_v[:, first : first + len(block_ids)].copy_(values.view(shape))
            return
        ids = self._ids(block_ids, pool_k.device)
        pool_k.index_copy_(1, ids, keys.reshape(shape).to(pool_k.device, pool_k.dtype))
        pool_v.index_copy_(1, ids, values.reshape(shape).to(pool_v.device, pool_v.dtype))

    def write_blocks(
        self, layer: int, block_ids: list[int], keys: list[torch.Tensor], values: list[torch.Tensor]
    ) -> None:
        """Store one ``[heads, block_size, head_dim]`` K and V per block into ``block_ids``.

        Each run of consecutive ids on the pool's device and dtype is stacked straight into the pool (one
        pass over the bytes, the promotion of a lower-tier hit); anything else goes through ``write``.
        """
        pool_k, pool_v = self.keys[layer], self.values[layer]
        runs = [0] + [i for i in range(1, len(block_ids)) if block_ids[i] != block_ids[i - 1] + 1]
        same = all(t.device == pool_k.device and t.dtype == pool_k.dtype for t in (keys[0], values[0]))
        if not same or len(runs) > MAX_DIRECT_RUNS:
            self.write(layer, block_ids, torch.cat(keys, dim=1), torch.cat(values, dim=1))
            return
        self.mark_written(block_ids)
        for start, end in zip(runs, [*runs[1:], len(block_ids)]):
            first = block_ids[start]
            torch.stack(keys[start:end], dim=1, out=pool_k[:, first : first + end - start])
            torch.stack(values[start:end], dim=1, out=pool_v[:, first : first + end - start])
