"""The views of an attached cache: one per call in flight, checked out and back, with their counters summed.

A ``PrefixCache`` serves one call at a time (``call.Ownership``). An attached model may be called from
many threads at once (a server, smolagents' streaming thread), so every call checks a view out of a
free-list and hands it back when it ends. Views are made on demand, so there are never more than the
most calls ever in flight at once; a new thread reuses an idle view and its buffers (smolagents starts a
thread per streamed step, and a per-thread view would be rebuilt, buffers and all, every step).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from .stats import CacheStats, Counters


class ViewPool:
    """Idle views of one store, made by ``make`` when none is idle; each call holds its own.

    ``close`` (at ``detach``) lets go of every view, idle ones at once and the others when their call
    ends, handing each to ``retire`` first (its counters), so a detached cache keeps no view's buffers."""

    def __init__(self, make: Callable[[], Any], retire: Callable[[Any], None] = lambda view: None):
        self._make = make
        self._retire = retire
        self._lock = threading.Lock()
        self._idle: list[Any] = []
        self._closed = False
        self.views: list[Any] = []  # every live view (at most the peak number of calls in flight)

    def checkout(self) -> Any:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        view = self._make()  # outside the lock: a view may probe the model
        with self._lock:
            self.views.append(view)
        return view

    def checkin(self, view: Any) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(view)
                return
            self.views.remove(view)
            self._retire(view)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for view in self._idle:
                self.views.remove(view)
                self._retire(view)
            self._idle = []


class SummedCounters(Counters):
    """The attached cache's counters: the calls made with it directly plus those of every view.

    ``last_call`` is the last call that ended on any thread (the attachment sets it)."""

    def __init__(self, store: Any, pool: ViewPool):
        self._pool = pool
        super().__init__(store)

    def retire(self, view: Any) -> None:
        """Keep the totals of a view that goes away (detach)."""
        self.add(view.counters)

    def reset(self, store: Any = None) -> None:
        super().reset(store)
        for view in list(self._pool.views):
            view.reset_stats()

    def snapshot(self, store: Any, block_size: int, fallback: str | None) -> CacheStats:
        total = Counters(store)
        total.evictions_at_reset = self.evictions_at_reset
        total.add(self)
        for view in list(self._pool.views):
            total.add(view.counters)
        return Counters.snapshot(total, store, block_size, fallback)
