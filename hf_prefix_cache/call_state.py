"""One call between ``prepare`` and ``release``: its prompt rows, the references it holds, and the
placement of the stored prefix into the cache layers (the ordinary left-padded layout)."""

from __future__ import annotations

import math

import torch

from .hashing import root_hash
from .layout import LayerLayout
from .prompt_rows import PromptRow
from .store import BlockStore


class CallState:
    """What one prepared call holds until it is released."""

    def __init__(self, namespace: str, rows: list[PromptRow], width: int, expand: int):
        self.namespace = namespace
        self.root = root_hash(namespace)
        self.rows = rows
        self.loaded = 0  # slots placed from the store: the common cut min(pad + hit) over rows
        self.width = width  # padded prompt length
        self.expand = expand  # cache rows per prompt (num_beams / num_return_sequences)
        self.rows_reordered = False  # beam search moved rows: only prompt slots are still per-prompt
        self.rows_changed = False  # rows added or dropped: nothing can be attributed any more


def place_prefix(layers: list, store: BlockStore, call: CallState) -> None:
    """Put the first ``call.loaded`` slots of every row into ``layers`` from the store."""
    size, loaded = store.block_size, call.loaded
    for index, layer in enumerate(layers):
        window = getattr(layer, "sliding_window", None)
        first = max(0, loaded - (window - 1)) if window else 0  # a window needs only its last slots
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
        keys, values = _left_pad(batch, loaded - first, store.layouts[index])
        if call.expand > 1:
            keys, values = keys.repeat_interleave(call.expand, 0), values.repeat_interleave(call.expand, 0)
        if window:
            layer.load_prefix(keys, values, total_length=loaded)
        else:
            layer.load_prefix(keys, values)


def _left_pad(batch: list[tuple[torch.Tensor, torch.Tensor] | None], length: int, layout: LayerLayout):
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
