"""K/V tensors, one pair per layer, on that layer's own device and dtype, committed on demand.

Layout per layer is ``[heads, num_blocks, block_size, head_dim]`` so that gathering a chain of blocks
with ``index_select`` yields ``[heads, n * block_size, head_dim]`` with a single copy. Consecutive layers
of one shape, dtype and device share one tensor ``[layers, 2, heads, num_blocks, block_size, head_dim]``
(each layer's K and V are views of it): one block of a whole run of layers is then a single strided
slice, laid out as a tier entry's packed tensor (``tiers.entry.pack``), so a tier hit or a copy down to a
tier moves a block with one copy instead of one per layer.

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
        # (first layer, [layers, 2, heads, blocks, size, dim]) per group of alike layers
        self.groups: list[tuple[int, torch.Tensor]] = []
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for first, count in layer_groups(layouts):
            layout = layouts[first]
            shape = (count, 2, layout.num_heads, num_blocks, block_size, layout.head_dim)
            group = torch.empty(shape, dtype=layout.dtype, device=layout.device)
            self.groups.append((first, group))
            self.keys.extend(group[:, 0].unbind(0))
            self.values.extend(group[:, 1].unbind(0))
        self._written = bytearray(num_blocks)  # 1 where a block was ever written (its pages are committed)
        self._num_written = 0

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

    # -- whole blocks, every layer at once (tier entries) ----------------------------------------------
    def read_packed(self, block_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """One block as ``tiers.entry.pack`` lays it out (``[2 * layers, heads, size, dim]`` per group,
        K and V interleaved), copied to ``device``: one strided copy per group."""
        packed = {}
        for first, group in self.groups:
            count, _, heads, _, size, dim = group.shape
            out = torch.empty((count, 2, heads, size, dim), dtype=group.dtype, device=device)
            out.copy_(group[:, :, :, block_id])
            packed[f"kv.{first}"] = out.view(2 * count, heads, size, dim)
        return packed

    def fits_packed(self, packed: dict[str, torch.Tensor] | None) -> bool:
        """Whether ``packed`` (a block as ``read_packed`` returns it) can be written with ``write_packed``."""
        if packed is None or len(packed) != len(self.groups):
            return False
        for first, group in self.groups:
            tensor = packed.get(f"kv.{first}")
            count, _, heads, _, size, dim = group.shape
            if tensor is None or tensor.shape != (2 * count, heads, size, dim) or tensor.dtype != group.dtype:
                return False
        return True

    def write_packed(self, block_ids: list[int], blocks: list[dict[str, torch.Tensor]]) -> None:
        """Store whole blocks (each as ``fits_packed`` accepts) into ``block_ids``: one copy per block and
        group (the promotion of a lower-tier hit). On this thread: torch spreads each copy over its own
        intra-op threads, where copies from helper threads would each start a thread team of their own
        that keeps spinning into the forward pass."""
        self.mark_written(block_ids)
        for block_id, packed in zip(block_ids, blocks):
            for first, group in self.groups:
                source = packed[f"kv.{first}"]
                group[:, :, :, block_id].copy_(source.view(group.shape[0], 2, *source.shape[1:]))


def layer_groups(layouts: list[LayerLayout]) -> list[tuple[int, int]]:
    """(first layer, count) of each run of consecutive layers whose K/V have one shape, dtype and device."""
    groups: list[tuple[int, int]] = []
    for index, layout in enumerate(layouts):
        kind = (layout.num_heads, layout.head_dim, layout.dtype, layout.device)
        if groups:
            first = layouts[groups[-1][0]]
            if (first.num_heads, first.head_dim, first.dtype, first.device) == kind:
                groups[-1] = (groups[-1][0], groups[-1][1] + 1)
                continue
        groups.append((index, 1))
    return groups
