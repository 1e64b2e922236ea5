"""Preallocated K/V tensors, one pair per layer, on that layer's own device and dtype.

Layout per layer is ``[heads, num_blocks, block_size, head_dim]`` so that gathering a chain of blocks
with ``index_select`` yields ``[heads, n * block_size, head_dim]`` with a single copy.
"""

from __future__ import annotations

import torch

from .layout import LayerLayout


class KVPool:
    def __init__(self, layouts: list[LayerLayout], num_blocks: int, block_size: int):
        self.layouts = layouts
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.keys = [self._empty(layout, num_blocks) for layout in layouts]
        self.values = [self._empty(layout, num_blocks) for layout in layouts]

    def _empty(self, layout: LayerLayout, num_blocks: int) -> torch.Tensor:
        shape = (layout.num_heads, num_blocks, self.block_size, layout.head_dim)
        return torch.zeros(shape, dtype=layout.dtype, device=layout.device)

    @property
    def capacity_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))

    def block_bytes(self) -> int:
        return sum(layout.block_bytes(self.block_size) for layout in self.layouts)

    def _ids(self, block_ids: list[int], device: torch.device) -> torch.Tensor:
        return torch.tensor(block_ids, dtype=torch.long, device=device)

    def read(self, layer: int, block_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``block_ids`` in order, each ``[heads, len(block_ids) * block_size, head_dim]``."""
        keys, values = self.keys[layer], self.values[layer]
        ids = self._ids(block_ids, keys.device)
        heads, _, block_size, head_dim = keys.shape
        shape = (heads, len(block_ids) * block_size, head_dim)
        return keys.index_select(1, ids).view(shape), values.index_select(1, ids).view(shape)

    def write(self, layer: int, block_ids: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``keys``/``values`` (``[heads, len(block_ids) * block_size, head_dim]``) into ``block_ids``."""
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
