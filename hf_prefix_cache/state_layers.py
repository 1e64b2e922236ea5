"""Cache layers of hybrid models: recurrent state (linear attention, SSM, short convolution) that a call can
restore from a snapshot and capture at a block boundary.

Transformers' ``LinearAttentionLayer`` keeps per-layer ``conv_states`` / ``recurrent_states`` (a dict per
``state_idx``). These subclasses add what the prefix cache needs: ``reset`` forgets the states' shapes (a
cache outlives its calls, whose batch sizes differ), ``states``/``load_states`` read and restore them per
row, and the batch operations transformers' linear layers lack. A hybrid layer (``hybrid``: state and
full-attention K/V in one layer) is a ``PrefixFullLayer`` with the same state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import DummyLayer, LinearAttentionLayer

from .layers import PrefixFullLayer, PrefixLayer

if TYPE_CHECKING:
    from .placement import StoredPrefix

# One layer's state for one row: {state_idx: (conv state, recurrent state or None)}, batch dim of 1.
LayerState = dict[int, tuple[torch.Tensor | None, torch.Tensor | None]]


class StateMixin:
    """Per-row reading, restoring and batch operations of a ``LinearAttentionLayer``'s states."""

    def forget_states(self) -> None:
        """Back to a never-used layer: the next call may have another batch size."""
        for index in range(self.number_of_states):
            self.conv_states[index] = self.recurrent_states[index] = None
            self.is_conv_states_initialized[index] = self.is_recurrent_states_initialized[index] = False
            self.has_previous_state[index] = False
        self.device = self.dtype = None
        if hasattr(self, "cumulative_length_linear"):  # transformers >= 5.25 counts tokens on the layer
            self.cumulative_length_linear = torch.tensor(0, dtype=torch.long)

    def states(self, row: int) -> LayerState:
        """Copies of row ``row``'s states (they are updated in place by the next forward)."""
        found: LayerState = {}
        for index in range(self.number_of_states):
            if not self.has_previous_state[index]:
                continue
            conv, recurrent = self.conv_states[index], self.recurrent_states[index]
            found[index] = (
                conv[row : row + 1].clone() if conv is not None else None,
                recurrent[row : row + 1].clone() if recurrent is not None else None,
            )
        return found

    def load_states(self, rows: list[LayerState | None], length: int) -> None:
        """Hold ``rows`` (one state per cache row; None: a row that starts fresh, zeros) after ``length``
        tokens: the next forward continues from them instead of starting a prefill."""
        template = next(state for state in rows if state)
        for index, (conv, recurrent) in template.items():
            kernel = conv.shape[-1] if conv is not None else None
            for name, part, stored in (("conv", 0, conv), ("recurrent", 1, recurrent)):
                if stored is None:
                    continue
                batch = torch.zeros((len(rows), *stored.shape[1:]), dtype=stored.dtype, device=stored.device)
                for number, state in enumerate(rows):
                    if state:
                        batch[number].copy_(state[index][part][0])
                if name == "conv":
                    self.lazy_initialization(conv_states=batch, state_idx=index, conv_kernel_size=kernel)
                    self.conv_states[index].copy_(batch)
                else:
                    self.lazy_initialization(recurrent_states=batch, state_idx=index)
                    self.recurrent_states[index].copy_(batch)
            self.has_previous_state[index] = True
        if hasattr(self, "cumulative_length_linear"):
            self.cumulative_length_linear.fill_(length)

    def _map_states(self, operation) -> None:
        for index in range(self.number_of_states):
            if self.is_conv_states_initialized[index]:
                self.conv_states[index] = operation(self.conv_states[index])
            if self.is_recurrent_states_initialized[index]:
                self.recurrent_states[index] = operation(self.recurrent_states[index])

    def repeat_states(self, repeats: int) -> None:
        self._map_states(lambda state: state.repeat_interleave(repeats, dim=0))

    def select_states(self, indices: torch.Tensor) -> None:
        self._map_states(lambda state: state[indices.to(state.device)].contiguous())


class PrefixStateLayer(StateMixin, PrefixLayer, LinearAttentionLayer):
    """A layer with recurrent state only (no K/V): ``linear_attention`` and ``conv`` layer types."""

    holds_kv = False

    def place(self, prefix: StoredPrefix, index: int) -> None:
        self.load_states(prefix.states(index), prefix.loaded)

    def captured(self):
        return None, None, None

    def reset(self) -> None:
        self.forget_states()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.repeat_states(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_states(indices)


class PrefixHybridLayer(StateMixin, LinearAttentionLayer, PrefixFullLayer):
    """Recurrent state and full-attention K/V in one layer (the ``hybrid`` layer type, Falcon-H1, Zamba2)."""

    holds_kv = True
    is_compileable = False

    def __init__(self, number_of_states: int = 1, **kwargs):
        PrefixFullLayer.__init__(self)
        LinearAttentionLayer.__init__(self, number_of_states=number_of_states)

    def lazy_initialization(self, *args, **kwargs) -> None:
        if len(args) == 2 and not kwargs:  # attention K/V (update)
            PrefixFullLayer.lazy_initialization(self, *args)
        else:  # conv or recurrent states (update_conv_state / update_recurrent_state)
            LinearAttentionLayer.lazy_initialization(self, **kwargs)

    def place(self, prefix: StoredPrefix, index: int) -> None:
        PrefixFullLayer.place(self, prefix, index)
        self.load_states(prefix.states(index), prefix.loaded)

    def reset(self) -> None:
        self.forget_states()
        PrefixFullLayer.reset(self)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        LinearAttentionLayer.reorder_cache(self, beam_idx)
        PrefixFullLayer.reorder_cache(self, beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.repeat_states(repeats)
        PrefixFullLayer.batch_repeat_interleave(self, repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_states(indices)
        PrefixFullLayer.batch_select_indices(self, indices)

    def crop(self, max_length: int) -> None:
        PrefixFullLayer.crop(self, max_length)

    def get_seq_length(self) -> int:
        return PrefixFullLayer.get_seq_length(self)

    def get_max_length(self) -> int:
        return PrefixFullLayer.get_max_length(self)


class PrefixEmptyLayer(PrefixLayer, DummyLayer):
    """A layer that keeps nothing (an MLP or MoE layer in ``layer_types``)."""

    holds_kv = False

    def place(self, prefix: StoredPrefix, index: int) -> None:
        """Nothing to place."""

    def captured(self):
        return None, None, None


def has_state(layer) -> bool:
    return isinstance(layer, StateMixin)
