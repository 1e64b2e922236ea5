"""Cache layers that can be pre-filled with a stored prefix and that keep every K/V they were given.

They are transformers' own dynamic layers (so masks, sliding windows and generate() behave exactly as with
a ``DynamicCache``) plus two things: ``load_prefix`` places a stored prefix without a concatenation, and
``captured`` returns the K/V of every slot computed in this call. A sliding layer trims its window in
``update()``, so it keeps the untrimmed chunks on the side for the store.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


class PrefixFullLayer(DynamicLayer):
    """Full attention: ``keys``/``values`` already hold every slot."""

    def load_prefix(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.reset()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values

    def captured(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(keys, values, first slot) of everything this layer saw since the last reset."""
        return self.keys, self.values, 0


class PrefixSlidingLayer(DynamicSlidingWindowLayer):
    """Sliding window: records the full K/V passed to ``update`` before the window trims them."""

    def __init__(self, sliding_window: int, **kwargs):
        super().__init__(sliding_window=sliding_window, **kwargs)
        self._history: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._history_start = 0

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
