"""One call's life on a cache: its state, the thread that owns it, and whose K/V it accepts.

A call runs from ``prepare`` to ``release`` on one thread (``Ownership``); ``CallState`` holds its prompt
rows and the references it took; ``update`` accepts K/V only from the cache's model (``check_module``)
and only inside a prepared call (``inside_generate``, ``unprepared``); ``captured_slots`` says how many
slots the layers hold for ``commit``; ``layout_problem`` whether their K/V fit the store.
"""

from __future__ import annotations

import inspect
import sys
import threading
import time

import torch
from transformers.generation.utils import GenerationMixin

from .identity import root_of
from .layout import UnsupportedLayout, describe_layers, probe_layout, remember_layout
from .prompt_rows import PromptRow
from .reasons import BUSY, MERGED, UNPREPARED

_GENERATE_CODE = inspect.unwrap(GenerationMixin.generate).__code__  # its decorators share their code


class CallState:
    """What one prepared call holds until it is released."""

    def __init__(self, namespace: str, rows: list[PromptRow], width: int, expand: int):
        self.namespace = namespace
        self.root = root_of(namespace)
        self.rows = rows
        self.loaded = 0  # slots placed from the store: the common cut min(pad + hit) over rows
        self.width = width  # padded prompt length
        self.prompt_ids: list[list[int]] = []  # the prepared input_ids, pads included (commit checks them)
        self.expand = expand  # cache rows per prompt (num_beams / num_return_sequences)
        self.rows_reordered = False  # beam search moved rows: only prompt slots are still per-prompt
        self.rows_changed = False  # rows added or dropped: nothing can be attributed any more
        # why this call computes other K/V than the model does by default (torch.autocast, dropout in
        # training mode): such a call neither reuses nor stores blocks
        self.off_default: str | None = None
        # decode steps get an explicit mask so that SDPA packs grouped query heads (see decode_masks.py)
        self.decode_masks = False
        self.priority: int | list[int] | None = None  # retention priority of its blocks (priorities.py)
        # hybrid models (checkpoints.py): states taken during the call, stored at commit, and the recorder
        # that takes them while generate() runs
        self.pending: list = []
        self.recorder = None
        self.timing = PrefillTiming()


class PrefillTiming:
    """How long a call's first forward (the prefill of the tokens not reused) took: from its first layer
    to the next forward's first layer, or to ``commit``. The cost model learns the prefill rate from it."""

    def __init__(self):
        self.started: float | None = None
        self.tokens = 0
        self.seconds: float | None = None

    def forward(self, tokens: int) -> None:
        now = time.perf_counter()
        if self.started is None:
            self.started, self.tokens = now, tokens
        elif self.seconds is None:
            self.seconds = now - self.started

    def report(self, cost_model, loaded: int) -> None:
        """Tell ``cost_model`` (once) what this call's prefill cost."""
        if self.started is None or self.tokens <= 0:
            return
        seconds = self.seconds if self.seconds is not None else time.perf_counter() - self.started
        cost_model.observe_prefill(loaded, self.tokens, seconds)
        self.started = None


class Ownership:
    """The thread serving a cache's call in flight (between ``prepare`` and ``release``): one at a time."""

    def __init__(self):
        self.owner: int | None = None
        self._lock = threading.Lock()
        self.generating = False  # the generate() wrapper runs this call: nested wrapped generates pass

    def claim(self) -> None:
        """Mark this thread as serving the call; a second thread gets an error naming the fix."""
        me = threading.get_ident()
        with self._lock:
            # on this thread too while the wrapper's generate() runs: a call from inside it (a logits
            # processor) would drop the layers of the call in flight
            if self.owner is not None and (self.owner != me or self.generating):
                raise RuntimeError(BUSY)
            self.owner = me

    def check(self) -> None:
        """Refuse a thread other than the one serving the call in flight."""
        owner = self.owner
        if owner is not None and owner != threading.get_ident():
            raise RuntimeError(BUSY)

    def mine(self) -> bool:
        return self.owner == threading.get_ident()

    def generating_here(self) -> bool:
        """Whether the wrapper's generate() runs a call of this cache on this thread."""
        return self.generating and self.mine()

    def end(self) -> None:
        self.generating = False
        self.owner = None


def captured_slots(layers: list, call: CallState) -> int | str:
    """Slots every layer holds for this call, or why they do not agree."""
    rows = len(call.rows) * call.expand
    counts = set()
    for layer in layers:
        keys, _, first = layer.captured()
        if keys is None:
            if first is not None:  # None: a layer without K/V (recurrent state only, or nothing)
                counts.add(first)
            continue
        if keys.shape[0] != rows:
            return f"the layers hold {keys.shape[0]} rows, the call prepared {rows}"
        counts.add(first + keys.shape[-2])
    if len(counts) != 1:
        return f"the layers hold different numbers of slots {sorted(counts)}"
    return counts.pop()


def check_module(model: torch.nn.Module, module: torch.nn.Module | None) -> None:
    """K/V are accepted only from the model this cache fingerprinted (checked once per call)."""
    if module is None or any(m is module for m in model.modules()):
        return
    raise ValueError(
        f"this PrefixCache was made for another model ({type(model).__name__} at {id(model):#x}); "
        f"a {type(module).__name__} outside it computed K/V into it. Make a cache per model: "
        "PrefixCache(model) (or PrefixCache(model, store=...) for another view of the same model)"
    )


def calling_module() -> torch.nn.Module | None:
    """The module whose forward called ``Cache.update`` (the attention layer), found on the stack."""
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch.nn.Module):
            return owner
        frame = frame.f_back
    return None


def unprepared(model: torch.nn.Module) -> str:
    """Why generate() got an unprepared cache: MERGED when it runs on another model than the PEFT model the
    cache was made for (its merged or unloaded base), else UNPREPARED."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _GENERATE_CODE:
            running = frame.f_locals.get("self")
            if running is not None and running is not model and hasattr(model, "peft_config"):
                return MERGED.format(running=type(running).__name__, mine=type(model).__name__)
            break
        frame = frame.f_back
    return UNPREPARED


def inside_generate() -> bool:
    """Whether transformers' ``generate()`` is on this thread's stack (checked only for unprepared use)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _GENERATE_CODE:
            return True
        frame = frame.f_back
    return False


def layout_problem(layers: list, store, model: torch.nn.Module) -> tuple[str | None, bool]:
    """Why the K/V ``layers`` captured do not fit ``store``'s layout (None: they fit), and whether that
    ends reuse for good. The first call confirms a store whose layout was predicted from the config.

    A prediction the call contradicts is settled by a probe forward, never by the call: its K/V may be
    unusual (autocast, a hook) rather than the prediction wrong.
    """
    try:
        observed = describe_layers(layers)
    except UnsupportedLayout as error:
        return str(error), False
    if not store.confirmed:
        if observed == store.layouts:
            truth = observed
            remember_layout(model, observed)
        else:
            try:
                truth = probe_layout(model)
            except UnsupportedLayout as error:
                return str(error), True
        if (problem := store.confirm(truth)) is not None:
            return problem, False
    if observed != store.layouts:
        return (
            "its K/V differ in shape, dtype or device from what the model computes by default "
            "(autocast, a cast in a hook?)"
        ), False
    return None, False
