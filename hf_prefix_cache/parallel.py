"""Per-layer copies spread over a few threads: moving a prefix into fresh memory is bound by page
faults and small copies that one core takes in turn, and torch releases the GIL while it copies.

Every task has finished when ``run_all`` returns or raises, even on an interrupt: a copy still running
into pool blocks the caller is about to release would write into blocks another call may already own.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence

import torch

_executor: concurrent.futures.ThreadPoolExecutor | None = None


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    global _executor
    if _executor is None:
        workers = max(1, min(8, torch.get_num_threads()))
        _executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="hf_prefix_cache-copy")
    return _executor


def run_all(tasks: Sequence[Callable[[], None]], parallel: bool = True) -> None:
    """Run ``tasks``; in parallel threads when ``parallel`` and more than one. Raises the first error."""
    if not parallel or len(tasks) < 2 or torch.get_num_threads() < 2:
        for task in tasks:
            task()
        return
    futures = [_pool().submit(task) for task in tasks]
    interrupted: BaseException | None = None
    while True:  # wait for every task, whatever interrupts the wait, then raise what came first
        try:
            concurrent.futures.wait(futures)
            break
        except BaseException as error:  # KeyboardInterrupt, a signal handler's exception
            for future in futures:
                future.cancel()
            interrupted = interrupted or error
    if interrupted is not None:
        raise interrupted
    for future in futures:
        future.result()
