"""A tier's background writer: a bounded queue drained by one daemon thread, so ``put()`` never waits.

The disk and remote tiers write through it. What is queued or being written counts against the bounds
(items, and bytes where given); past them ``submit`` says no and the tier counts a drop. ``flush`` waits
until everything submitted was written (or failed), restarting a writer thread that died. At
interpreter exit every live writer is flushed, waiting at most ``EXIT_FLUSH_S`` in all.

**Fork**: a forked child (``os.fork``, ``multiprocessing`` with the fork start method, DataLoader
workers) inherits the queue and count but not the thread; what was queued is the parent's to write. So
after a fork every writer starts empty in the child (fresh queue, locks and count, no thread): its
``flush()`` returns at once and its exit does not wait for the parent's writes. What the child itself
puts afterwards is written by a thread of its own. A ``multiprocessing`` child (DataLoader workers too)
ends with ``os._exit``, which skips ``atexit``: the exit flush is also registered as a
``multiprocessing`` finalizer in every such child (any start method, whether this module came with the
fork or is first imported in the child), so its writes land there too.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing.util
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

EXIT_FLUSH_S = 10.0  # the most interpreter exit waits for queued writes, all writers together


class BackgroundWriter:
    def __init__(
        self,
        write: Callable[[list[Any]], None],
        on_error: Callable[[BaseException], None],
        *,
        name: str,
        max_items: int,
        max_bytes: int | None = None,
        batch: int = 1,
    ):
        self._write, self._on_error = write, on_error
        self.name, self.max_items, self.max_bytes, self.batch = name, max_items, max_bytes, batch
        self.queue: queue.Queue = queue.Queue()
        self.pending = 0  # submitted and not yet written (queued or in the writer's hands)
        self.pending_bytes = 0
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None
        self.closed = False
        _LIVE.add(self)

    def _reset_after_fork(self) -> None:
        """In a forked child: forget the parent's queued writes and its (absent) thread; locks the parent's
        threads held at the fork would never be released here, so they are made anew."""
        self.queue = queue.Queue()
        self.pending = 0
        self.pending_bytes = 0
        self._idle = threading.Condition()
        self._thread = None

    def submit(self, item: Any, nbytes: int = 0) -> bool:
        """Queue ``item`` for writing; False (nothing queued) when the bounds are reached."""
        self._start()
        with self._idle:
            over_bytes = self.max_bytes is not None and self.pending_bytes + nbytes > self.max_bytes
            if self.pending >= self.max_items or over_bytes:
                return False
            self.queue.put_nowait((item, nbytes))
            self.pending += 1
            self.pending_bytes += nbytes
        return True

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            entries = [self.queue.get()]
            while len(entries) < self.batch:
                try:
                    entries.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in entries
            batch = [entry for entry in entries if entry is not None]
            try:
                if batch:
                    self._write([item for item, _ in batch])
            except BaseException as error:  # the writer must never die silently
                self._on_error(error)
            finally:
                with self._idle:
                    self.pending -= len(batch)
                    self.pending_bytes -= sum(nbytes for _, nbytes in batch)
                    self._idle.notify_all()
            if stop:
                return

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted is written; False if ``timeout`` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self.pending > 0:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                if self._thread is None or not self._thread.is_alive():
                    self._start()
                self._idle.wait(timeout=left if left is not None else 1.0)
        return True

    def close(self, timeout: float) -> None:
        """Flush (at most ``timeout`` seconds), then stop the thread."""
        if self.closed:
            return
        self.flush(timeout)
        self.closed = True
        if self._thread is not None and self._thread.is_alive():
            self.queue.put_nowait(None)
            self._thread.join(timeout)


_LIVE: weakref.WeakSet[BackgroundWriter] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for writer in list(_LIVE):
        writer._reset_after_fork()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _ProcessExit:
    """A module-lifetime object for ``multiprocessing.util.register_after_fork`` (it keeps weak refs)."""


_PROCESS_EXIT = _ProcessExit()


def _flush_at_process_exit(_: object) -> None:
    """In a new ``multiprocessing`` child: run the exit flush among its finalizers (it skips ``atexit``)."""
    multiprocessing.util.Finalize(None, _flush_at_exit, exitpriority=10)


multiprocessing.util.register_after_fork(_PROCESS_EXIT, lambda obj: _flush_at_process_exit(obj))


@atexit.register
def _flush_at_exit() -> None:
    """Let queued writes land before the interpreter exits, waiting at most ``EXIT_FLUSH_S`` in all."""
    deadline = time.monotonic() + EXIT_FLUSH_S
    for writer in list(_LIVE):
        left = deadline - time.monotonic()
        if left <= 0 or not writer.flush(left):
            logger.warning("%s: exit flush timed out; some blocks were not written", writer.name)
            break


if multiprocessing.parent_process() is not None:  # first imported inside a running child (spawn)
    _flush_at_process_exit(None)
