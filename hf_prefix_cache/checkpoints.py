"""Calls on hybrid models: each row restarts from its longest stored snapshot, the prompt runs up to the
block boundaries where snapshots are wanted (a prefill split there), and generate() computes the rest.

Where snapshots are taken (``snapshot_positions``): the last block boundary a prompt's prefill reaches,
every ``snapshot_every`` blocks inside a long prompt (a ladder, so a shared system prompt followed by other
turns still hits), the prompt's end when it is a boundary (``StateRecorder``), and at commit the last
boundary of prompt + reply (``reply_states``: the next turn continues from there). A batch of one prompt stops its prefill at the last wanted boundary and
lets ``generate()`` do the rest; a batch of several runs every row alone up to its last prompt token(s),
since rows that restart from different snapshots cannot share a padded forward (masked pads after a
restored state change it).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache

from .compat import CACHE_KWARG
from .layout import LayerLayout
from .placement import left_pad
from .state_layers import LayerState, has_state

DEFAULT_SNAPSHOT_EVERY = 32  # blocks between ladder snapshots inside one prompt (512 tokens at 16)
TIER_STATE_LOOKUPS = 4  # longest hit candidates whose snapshot is looked for in the tiers, per row


@dataclass
class Pending:
    """A state taken during a call, stored at commit if the call stores the blocks it ends on."""

    source: int  # cache row
    tokens: int  # real tokens of that row before the state
    layers: list[LayerState | None]


@dataclass
class RowRun:
    """One prompt row computed alone from its snapshot: its K/V per layer and its final state."""

    keys: list[torch.Tensor | None] = field(default_factory=list)  # [heads, tokens, dim] per layer
    values: list[torch.Tensor | None] = field(default_factory=list)
    states: list[LayerState | None] = field(default_factory=list)
    tokens: int = 0


def snapshot_positions(start: int, end: int, size: int, every: int | None) -> list[int]:
    """Block boundaries in ``(start, end]`` to take a state at: the last one, and every ``every`` blocks."""
    last = (end // size) * size
    if last <= start:
        return []
    wanted = {last}
    if every:
        step = every * size
        wanted.update(range(step, last, step))
    return sorted(p for p in wanted if p > start)


def restart_point(cache, call, row) -> tuple[int, object]:
    """Cut ``row.hits`` back to the longest prefix that ends on a stored snapshot, releasing the rest;
    returns (blocks kept, the snapshot or None). The device's snapshots are searched first; then the
    tiers', for the ``TIER_STATE_LOOKUPS`` longest candidates (each costs a file read or a round trip),
    and a snapshot found there is promoted to the device."""
    store = cache.store
    with store.lock:
        for count in range(len(row.hits), 0, -1):
            snapshot = store.snapshots.get(row.hits[count - 1])
            if snapshot is not None:
                break
        else:
            count, snapshot = 0, None
    if store.tiers is not None:
        for candidate in range(len(row.hits), max(count, len(row.hits) - TIER_STATE_LOOKUPS), -1):
            promoted = promote_state(cache, call, row.hits[candidate - 1], candidate * store.block_size)
            if promoted is not None:
                count, snapshot = candidate, promoted
                break
    extra, row.hits = row.hits[count:], row.hits[:count]
    store.release(extra)
    return count, snapshot


def promote_state(cache, call, block, tokens: int):
    """The tiers' snapshot ending with ``block`` (``tokens`` long), put into the device store; or None."""
    store = cache.store
    found = store.tiers.get_state(call.namespace, cache.extra_keys, block.block_hash)
    if found is None or found[0] != tokens:
        return None
    layers = [
        {i: tuple(None if t is None else t.to(layout.device) for t in pair) for i, pair in state.items()}
        if state
        else None
        for state, layout in zip(found[1], store.layouts)
    ]
    with store.lock:
        if block.block_hash is None or not store.snapshots.put(block, tokens, layers):
            return None
        return store.snapshots.get(block)


class ScratchCache(DynamicCache):
    """A one-row cache of the prefix layers, for computing a row alone inside ``prepare``."""

    def __init__(self, layers: list):
        Cache.__init__(self, layers=layers)


def run_row(model, layers: list, store, row, snapshot, start: int, stops: list[int]) -> tuple[RowRun, list]:
    """Compute ``row.tokens[start:stops[-1]]`` on ``layers`` (fresh, one row) after the stored prefix,
    stopping at every position in ``stops`` to take the state; returns the run and the states taken."""
    cache = ScratchCache(layers)
    if start:
        for index, layer in enumerate(layers):
            if store.layouts[index].holds_kv:
                keys, values = store.read(index, row.hits)
                layer.update(keys[:, :start].unsqueeze(0), values[:, :start].unsqueeze(0))
            if has_state(layer):
                layer.load_states([snapshot.layers[index]], start)
    taken = []
    device = model.get_input_embeddings().weight.device
    position = start
    with torch.no_grad():
        for stop in stops:
            if stop <= position:
                continue
            ids = torch.tensor([row.tokens[position:stop]], device=device)
            positions = torch.arange(position, stop, device=device).unsqueeze(0)
            model(
                input_ids=ids,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **{CACHE_KWARG: cache},
            )
            position = stop
            if stop % store.block_size == 0:
                taken.append((stop, [layer.states(0) if has_state(layer) else None for layer in layers]))
    run = RowRun(tokens=position)
    for layer in layers:
        keys, values, _ = layer.captured()
        run.keys.append(keys[0] if keys is not None else None)
        run.values.append(values[0] if values is not None else None)
        run.states.append(layer.states(0) if has_state(layer) and position else None)
    return run, taken


class ComputedPrefix:
    """The first ``loaded`` slots of every row from per-row runs: what ``StoredPrefix`` is to the store,
    for the layers' ``place``."""

    def __init__(self, layouts: list[LayerLayout], call, runs: list[RowRun], loaded: int):
        self.layouts, self.call, self.runs, self.loaded = layouts, call, runs, loaded
        self.rows = len(call.rows) * call.expand

    def layout(self, index: int) -> LayerLayout:
        return self.layouts[index]

    def _row_kv(self, number: int, index: int, first: int):
        """Slots ``first:loaded`` of row ``number`` (fewer where its padding starts later)."""
        row, run = self.call.rows[number], self.runs[number]
        start, end = max(first - row.pad, 0), self.loaded - row.pad
        if end <= 0 or not run.keys or run.keys[index] is None:
            return None
        return run.keys[index][:, start:end], run.values[index][:, start:end]

    def copy_into(self, index: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        expand = self.call.expand
        for number in range(len(self.call.rows)):
            target = number * expand
            keys[target].zero_()
            values[target].zero_()
            part = self._row_kv(number, index, 0)
            if part is not None:
                n = part[0].shape[1]
                keys[target, :, self.loaded - n :].copy_(part[0])
                values[target, :, self.loaded - n :].copy_(part[1])
            if expand > 1:
                keys[target + 1 : target + expand].copy_(keys[target])
                values[target + 1 : target + expand].copy_(values[target])

    def read_from(self, index: int, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = [self._row_kv(number, index, first) for number in range(len(self.call.rows))]
        keys, values = left_pad(batch, self.loaded - first, self.layouts[index])
        if self.call.expand > 1:
            keys = keys.repeat_interleave(self.call.expand, 0)
            values = values.repeat_interleave(self.call.expand, 0)
        return keys, values

    def states(self, index: int) -> list[LayerState | None]:
        return [
            run.states[index] if run.states else None for run in self.runs for _ in range(self.call.expand)
        ]


def prepare_rows(cache, call, logits_to_keep: int, make_layers) -> list[int]:
    """Restart every row of ``call`` from its longest snapshot and compute what ``generate()`` will not;
    sets ``call.loaded`` and ``call.pending``; returns the reused tokens per row."""
    store, size, rows = cache.store, cache.store.block_size, call.rows
    keep = max(1, logits_to_keep)
    single = len(rows) == 1
    runs, hits = [], []
    for number, row in enumerate(rows):
        count, snapshot = restart_point(cache, call, row)
        start = count * size
        hits.append(start)
        end = max(0, len(row.tokens) - keep)
        wanted = snapshot_positions(start, end, size, cache.snapshot_every)
        target = (wanted[-1] if wanted else start) if single else end
        stops = [p for p in wanted if p <= target] + ([target] if target not in wanted else [])
        if target <= start and start == 0:
            runs.append(RowRun())
            continue
        run, taken = run_row(cache.model, make_layers(), store, row, snapshot, start, stops)
        runs.append(run)
        call.pending.extend(Pending(number * call.expand, tokens, layers) for tokens, layers in taken)
    call.loaded = rows[0].pad + runs[0].tokens if single else call.width - keep
    if call.loaded > 0 and any(run.tokens for run in runs):
        prefix = ComputedPrefix(store.layouts, call, runs, call.loaded)
        for index, layer in enumerate(cache.layers):
            layer.place(prefix, index)
    else:
        call.loaded = 0
    return hits


class StateRecorder:
    """Takes each cache row's state where ``generate()``'s prefill ends (the prompt's last token): a
    forward pre-hook on the input embeddings (installed once per model, ``_dispatch``) sees the first
    decode step start, when the states hold exactly the prompt. States are never taken from decode steps:
    a one-token recurrent update and the chunked prefill scan agree only to ~1e-4 in fp32 (Mamba2), so
    the state at the end of a reply is computed again by a prefill at commit (``reply_states``)."""

    def __init__(self, cache, call):
        self.cache, self.call = cache, call
        self.taken: list[Pending] | None = None
        self.module = cache.model.get_input_embeddings()
        _install_hook(self.module)
        self._previous = getattr(_active, "recorder", None)
        _active.recorder = self

    def before_forward(self, args) -> None:
        if self.cache.generating_here() and self.cache.current_call is self.call:
            self.take()

    def take(self) -> None:
        """Keep every row's state now, once, if generate() computed something since prepare."""
        if self.taken is not None:
            return
        slots = held_slots(self.cache.layers)
        if slots is None or slots <= self.call.loaded:
            return
        self.taken = []
        for source in range(len(self.call.rows) * self.call.expand):
            row = self.call.rows[source // self.call.expand]
            layers = [layer.states(source) if has_state(layer) else None for layer in self.cache.layers]
            self.taken.append(Pending(source, slots - row.pad, layers))
        self.close()

    def close(self) -> None:
        if getattr(_active, "recorder", None) is self:
            _active.recorder = self._previous


def reply_states(model, make_layers, layers: list, call, prompt_end: Pending, tokens: list[int], size: int):
    """The state at the last block boundary of ``tokens`` (prompt + stored reply of one cache row), by a
    prefill from the state at the prompt's end; None when no boundary lies after the prompt."""
    start, boundary = prompt_end.tokens, (len(tokens) // size) * size
    if boundary <= start:
        return None
    row = call.rows[prompt_end.source // call.expand]
    scratch = make_layers()
    for index, layer in enumerate(scratch):
        keys, values, first = layers[index].captured()
        if keys is not None:
            begin = row.pad - first
            layer.update(
                keys[prompt_end.source : prompt_end.source + 1, :, begin : begin + start],
                values[prompt_end.source : prompt_end.source + 1, :, begin : begin + start],
            )
        if has_state(layer):
            layer.load_states([prompt_end.layers[index]], start)
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([tokens[start:boundary]], device=device)
    positions = torch.arange(start, boundary, device=device).unsqueeze(0)
    with torch.no_grad():
        model(
            input_ids=ids,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{CACHE_KWARG: ScratchCache(scratch)},
        )
    states = [layer.states(0) if has_state(layer) else None for layer in scratch]
    return Pending(prompt_end.source, boundary, states)


_active = threading.local()  # the recorder of the call this thread serves
_hook_lock = threading.Lock()
_HOOKED = "_hf_prefix_cache_state_hook"


def _install_hook(module: torch.nn.Module) -> None:
    with _hook_lock:
        if not module.__dict__.get(_HOOKED):
            module.register_forward_pre_hook(_dispatch)
            module.__dict__[_HOOKED] = True


def _dispatch(module, args) -> None:
    recorder = getattr(_active, "recorder", None)
    if recorder is not None and recorder.module is module:
        recorder.before_forward(args)


def held_slots(layers: list) -> int | None:
    """Slots the first K/V layer holds (every layer holds as many)."""
    for layer in layers:
        if getattr(layer, "holds_kv", True):
            keys = layer.keys
            return keys.shape[-2] if keys is not None and keys.dim() == 4 else None
    return None


def store_row_states(cache, call, source: int, chain: list, tokens: list[int]) -> int:
    """Store the snapshots of cache row ``source`` that end on blocks of its stored ``chain`` (``tokens``
    long): those taken in prepare, the one at the prompt's end if that is a block boundary, and the one at
    the last boundary of its reply (computed by ``reply_states``); returns how many were stored."""
    store, size = cache.store, cache.store.block_size
    found = [pending for pending in call.pending if pending.source == source]
    taken = call.recorder.taken if call.recorder is not None else None
    prompt_end = taken[source] if taken else None
    if prompt_end is not None:
        if prompt_end.tokens % size == 0:
            found.append(prompt_end)
        if not call.rows_reordered and len(tokens) > prompt_end.tokens:  # beams: replies are not stored
            layers = cache.layers
            reply = reply_states(cache.model, cache.fresh_layers, layers, call, prompt_end, tokens, size)
            if reply is not None:
                found.append(reply)
    stored = []
    with store.lock:
        for pending in found:
            blocks = pending.tokens // size
            if 0 < blocks <= len(chain) and pending.tokens <= len(tokens):
                block = chain[blocks - 1]
                if store.snapshots.put(block, pending.tokens, pending.layers):
                    stored.append((block.block_hash, pending))
    if store.tiers is not None:  # written through, outside the lock (a disk write, a round trip)
        for block_hash, pending in stored:
            store.tiers.put_state(
                call.namespace, cache.extra_keys, block_hash, pending.tokens, pending.layers
            )
    return len(stored)
