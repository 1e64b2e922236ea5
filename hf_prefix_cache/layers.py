"""Cache layers that can be pre-filled with a stored prefix and that keep every K/V they were given.

They are transformers' own dynamic layers (so masks, sliding windows and generate() behave exactly as with
a ``DynamicCache``) plus two things: the stored prefix is placed without a concatenation, and
``captured`` returns the K/V of every slot computed in this call. A full-attention layer keeps its K/V in
buffers with room to grow and appends in place (no O(context) copy per decode step). A sliding layer
trims its window in ``update()``, so it keeps the untrimmed chunks on the side for the store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

if TYPE_CHECKING:
    from .placement import StoredPrefix


class PrefixLayer:
    """What the cache asks of its layers beyond transformers' own: each class answers its own way."""

    def reserve_slots(self, slots: int) -> None:
        """This call will need ``slots`` slots (0: unknown)."""

    def place(self, prefix: StoredPrefix, index: int) -> None:
        """Hold the first ``prefix.loaded`` slots of layer ``index`` of the stored prefix."""
        raise NotImplementedError

    def captured(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(keys, values, first slot) of everything this layer saw since the last reset."""
        raise NotImplementedError

    def release_buffers(self) -> None:
        """Free what the layer keeps between calls."""


class PrefixFullLayer(PrefixLayer, DynamicLayer):
    """Full attention: ``keys``/``values`` are views ``[:, :, :length]`` of per-call buffers with spare room.

    ``update()`` copies the new slots into the buffer in place, so neither the prefill nor a decode step
    concatenates the context; the buffer doubles when full. Whatever transformers' own methods do to
    ``keys`` (``crop`` keeps a shorter view; ``reorder_cache``, ``batch_repeat_interleave`` and
    ``batch_select_indices`` assign new tensors) is adopted at the next ``update``. The buffers outlive
    ``reset`` and are reused by the next call when they fit, so their pages are not faulted in again.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.reserve = 0  # slots to allocate for up front (prompt + new tokens); 0: as needed, then doubling
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        # the views last handed out as ``keys``/``values``: while they are still in place, nothing replaced
        # them and a decode step may skip re-checking that they are views of the buffers
        self._shown_keys: torch.Tensor | None = None
        self._shown_values: torch.Tensor | None = None

    def reserve_slots(self, slots: int) -> None:
        self.reserve = slots

    def place(self, prefix: StoredPrefix, index: int) -> None:
        """Copy the stored prefix straight from the pool into this layer's buffers."""
        layout = prefix.layout(index)
        keys, values = self.prefix_slots(
            prefix.rows, prefix.loaded, layout.num_heads, layout.head_dim, layout.dtype, layout.device
        )
        prefix.copy_into(index, keys, values)

    def prefix_slots(
        self, rows: int, length: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hold ``length`` slots (the caller writes them) and return them as ``[rows, heads, length, dim]`` views."""
        self.reset()
        self._ensure_buffers(rows, heads, head_dim, dtype, device, max(length, self.reserve), keep=0)
        self.device, self.is_initialized = device, True
        return self._show(length)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # The decode step: our own views are still in place and the new slots fit the buffers as they are.
        # Only ``narrow`` and ``copy_`` (indexing with slices costs several times more per layer per step).
        keys, buffer, shape = self.keys, self._key_buffer, key_states.shape
        if (
            keys is self._shown_keys
            and keys is not None
            and self.values is self._shown_values
            and shape == value_states.shape
            and shape[:2] == buffer.shape[:2]
            and shape[3:] == buffer.shape[3:]
            and key_states.dtype == buffer.dtype == value_states.dtype
            and key_states.device == buffer.device == value_states.device
        ):
            length = keys.shape[2]
            end = length + shape[2]
            if end <= buffer.shape[2]:
                buffer.narrow(2, length, end - length).copy_(key_states)
                self._value_buffer.narrow(2, length, end - length).copy_(value_states)
                return self._show(end)
        return self._update_checked(key_states, value_states, *args, **kwargs)

    def _update_checked(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Any update: adopts whatever replaced ``keys``/``values``, grows the buffers, or falls back."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if value_states.shape[-1] != key_states.shape[-1] or value_states.dtype != key_states.dtype:
            return super().update(key_states, value_states, *args, **kwargs)  # unusual: keep the plain path
        length = self._held_length()
        if length is None or (length > 0 and self.keys.shape[:2] != key_states.shape[:2]):
            return super().update(key_states, value_states, *args, **kwargs)
        end = length + key_states.shape[-2]
        rows, heads, _, head_dim = key_states.shape
        self._ensure_buffers(rows, heads, head_dim, key_states.dtype, key_states.device, end, keep=length)
        self._key_buffer.narrow(2, length, end - length).copy_(key_states)
        self._value_buffer.narrow(2, length, end - length).copy_(value_states)
        return self._show(end)

    def _show(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expose the first ``length`` slots of the buffers as ``keys``/``values`` (views, no copy)."""
        self.keys = self._shown_keys = self._key_buffer.narrow(2, 0, length)
        self.values = self._shown_values = self._value_buffer.narrow(2, 0, length)
        return self.keys, self.values

    def captured(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(keys, values, first slot) of everything this layer saw since the last reset."""
        return self.keys, self.values, 0

    def _held_length(self) -> int | None:
        """Slots held now, after moving ``keys``/``values`` into the buffers if something replaced them.

        None when they cannot be held in place (keys and values of different shapes or devices).
        """
        keys, values = self.keys, self.values
        if keys is None or keys.numel() == 0:
            return 0
        if self._is_buffer_view(keys, self._key_buffer) and self._is_buffer_view(values, self._value_buffer):
            return keys.shape[-2]
        if keys.shape != values.shape or keys.device != values.device or keys.dim() != 4:
            return None
        rows, heads, length, head_dim = keys.shape
        if self._aliases_buffers(keys) or self._aliases_buffers(values):
            self._key_buffer = self._value_buffer = None  # a view of the old buffers: copy it elsewhere
        self._ensure_buffers(rows, heads, head_dim, keys.dtype, keys.device, length, keep=0)
        self._key_buffer[:, :, :length].copy_(keys)
        self._value_buffer[:, :, :length].copy_(values)
        self._show(length)
        return length

    def _aliases_buffers(self, tensor: torch.Tensor) -> bool:
        storage = tensor.untyped_storage().data_ptr()
        return any(
            buffer is not None and buffer.untyped_storage().data_ptr() == storage
            for buffer in (self._key_buffer, self._value_buffer)
        )

    @staticmethod
    def _is_buffer_view(tensor: torch.Tensor, buffer: torch.Tensor | None) -> bool:
        return (
            buffer is not None
            and tensor.data_ptr() == buffer.data_ptr()
            and tensor.stride() == buffer.stride()
            and tensor.shape[:2] == buffer.shape[:2]
            and tensor.shape[3] == buffer.shape[3]
            and tensor.dtype == buffer.dtype
        )

    def _ensure_buffers(self, rows, heads, head_dim, dtype, device, slots: int, keep: int) -> None:
        """Buffers of this shape with room for ``slots``; the first ``keep`` slots survive a regrowth."""
        buffer = self._key_buffer
        fits = (
            buffer is not None
            and buffer.shape[:2] == (rows, heads)
            and buffer.shape[3] == head_dim
            and buffer.dtype == dtype
            and buffer.device == device
        )
        if fits and buffer.shape[2] >= slots:
            return
        capacity = max(slots, self.reserve, 2 * buffer.shape[2] if fits else 0)
        shape = (rows, heads, capacity, head_dim)
        new_keys = torch.empty(shape, dtype=dtype, device=device)
        new_values = torch.empty(shape, dtype=dtype, device=device)
        if keep:
            new_keys[:, :, :keep].copy_(self._key_buffer[:, :, :keep])
            new_values[:, :, :keep].copy_(self._value_buffer[:, :, :keep])
        self._key_buffer, self._value_buffer = new_keys, new_values

    def release_buffers(self) -> None:
        """Free the buffers kept for the next call."""
        self.reset()
        self._key_buffer = self._value_buffer = self._shown_keys = self._shown_values = None


class PrefixSlidingLayer(PrefixLayer, DynamicSlidingWindowLayer):
    """Sliding window: records the full K/V passed to ``update`` before the window trims them."""

    def __init__(self, sliding_window: int, **kwargs):
        super().__init__(sliding_window=sliding_window, **kwargs)
        self._history: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._history_start = 0

    def place(self, prefix: StoredPrefix, index: int) -> None:
        """Load only the last slots of the stored prefix: a sliding window needs no more."""
        first = max(0, prefix.loaded - (self.sliding_window - 1))
        keys, values = prefix.read_from(index, first)
        self.load_prefix(keys, values, total_length=prefix.loaded)

    def load_prefix(self, keys: torch.Tensor, values: torch.Tensor, total_length: int | None = None) -> None:
        """Place the last slots of a prefix of ``total_length`` slots, keeping only what the window needs."""
        self.reset()
        self.lazy_initialization(keys, values)
        length = keys.shape[-2] if total_length is None else total_length
        keep = self.sliding_window - 1
        self.keys, self.values = keys[:, :, -keep:, :], values[:, :, -keep:, :]
        self.cumulative_length = length
        self._history_start = length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self._history.append((key_states, value_states))
        return super().update(key_states, value_states, *args, **kwargs)

    def captured(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        if len(self._history) > 1:
            keys = torch.cat([k for k, _ in self._history], dim=-2)
            values = torch.cat([v for _, v in self._history], dim=-2)
            self._history = [(keys, values)]
        if not self._history:
            return self.keys[:, :, :0], self.values[:, :, :0], self._history_start
        keys, values = self._history[0]
        return keys, values, self._history_start

    def reset(self) -> None:
        super().reset()
        self._history = []
        self._history_start = 0
