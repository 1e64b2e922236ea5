"""Stored prefix -> layers: the first ``call.loaded`` slots of every row, placed by each layer class."""

from __future__ import annotations

import math

import torch

from .call import CallState
from .kv_pool import MAX_DIRECT_RUNS
from .layout import LayerLayout
from .store import BlockStore

# Slots reserved up front for new tokens beyond the prompt; longer replies grow the buffers by doubling.
MAX_RESERVED_NEW_TOKENS = 4096


def reserve_room(layers: list, width: int, max_new_tokens: int | None) -> None:
    """Tell the layers how many slots this call will need, so that full-attention buffers never regrow
    mid-call."""
    slots = width + min(max_new_tokens, MAX_RESERVED_NEW_TOKENS) if max_new_tokens else 0
    for layer in layers:
        layer.reserve_slots(slots)


def place_prefix(layers: list, store: BlockStore, call: CallState) -> None:
    """Put the first ``call.loaded`` slots of every row into ``layers`` from the store: each layer class
    places them its own way (``place``) from a ``StoredPrefix``."""
    prefix = StoredPrefix(store, call)
    for index, layer in enumerate(layers):
        layer.place(prefix, index)


class StoredPrefix:
    """The stored prefix of one call, read layer by layer: copied straight into a layer's buffers
    (``copy_into``), or only its last slots, left-padded into new tensors (``read_from``)."""

    def __init__(self, store: BlockStore, call: CallState):
        self.store, self.call = store, call
        self.loaded = call.loaded
        self.rows = len(call.rows) * call.expand  # cache rows: each prompt row repeated ``expand`` times
        size = store.block_size
        self._runs = [
            consecutive_runs(row.hits[: math.ceil(max(0, self.loaded - row.pad) / size)]) for row in call.rows
        ]

    def layout(self, index: int) -> LayerLayout:
        return self.store.layouts[index]

    def copy_into(self, index: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Copy each row's stored prefix of layer ``index`` into ``[rows, heads, loaded, dim]`` views of a
        layer's buffers: the only copy of the prefix."""
        store, call, loaded = self.store, self.call, self.loaded
        for number, row in enumerate(call.rows):
            target = number * call.expand
            pad = min(row.pad, loaded)
            if pad:  # padding slots: zeros, hidden by the attention mask as pad tokens are without a cache
                keys[target, :, :pad].zero_()
                values[target, :, :pad].zero_()
            slot = pad
            for run in self._runs[number]:
                stored_keys, stored_values = store.read(index, run)
                n = min(stored_keys.shape[1], loaded - slot)
                keys[target, :, slot : slot + n].copy_(stored_keys[:, :n])
                values[target, :, slot : slot + n].copy_(stored_values[:, :n])
                slot += n
            if call.expand > 1:  # beams / return sequences start from copies of their prompt's row
                keys[target + 1 : target + call.expand].copy_(keys[target])
                values[target + 1 : target + call.expand].copy_(values[target])

    def read_from(self, index: int, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots ``first:loaded`` of layer ``index`` as ``[rows, heads, loaded - first, dim]``, right-aligned."""
        store, call, loaded, size = self.store, self.call, self.loaded, self.store.block_size
        batch = []
        for row in call.rows:
            start, end = max(first - row.pad, 0), loaded - row.pad  # token range of this row
            if end <= 0:
                batch.append(None)
                continue
            first_block = start // size
            keys, values = store.read(index, row.hits[first_block : math.ceil(end / size)])
            offset = first_block * size
            batch.append((keys[:, start - offset : end - offset], values[:, start - offset : end - offset]))
        keys, values = left_pad(batch, loaded - first, store.layouts[index])
        if call.expand > 1:
            keys, values = keys.repeat_interleave(call.expand, 0), values.repeat_interleave(call.expand, 0)
        return keys, values


def consecutive_runs(blocks: list, most: int = MAX_DIRECT_RUNS) -> list[list]:
    """``blocks`` cut where block ids stop being consecutive (each run reads as one view of the pool);
    a chain of more than ``most`` runs stays one piece, gathered at once."""
    runs: list[list] = []
    for block in blocks:
        if runs and runs[-1][-1].block_id + 1 == block.block_id:
            runs[-1].append(block)
        else:
            runs.append([block])
    return runs if len(runs) <= most else [list(blocks)]


def left_pad(batch: list[tuple[torch.Tensor, torch.Tensor] | None], length: int, layout: LayerLayout):
    """Stack per-row ``[heads, n, dim]`` K/V into ``[rows, heads, length, dim]``, right-aligned.

    Padding slots get zeros: the attention mask hides them, as it hides pad tokens without a cache.
    """
    if len(batch) == 1 and batch[0] is not None and batch[0][0].shape[1] == length:
        return batch[0][0].unsqueeze(0), batch[0][1].unsqueeze(0)
    shape = (len(batch), layout.num_heads, length, layout.head_dim)
    keys = torch.zeros(shape, dtype=layout.dtype, device=layout.device)
    values = torch.zeros(shape, dtype=layout.dtype, device=layout.device)
    for index, item in enumerate(batch):
        if item is not None:
            n = item[0].shape[1]
            keys[index, :, length - n :] = item[0]
            values[index, :, length - n :] = item[1]
    return keys, values
