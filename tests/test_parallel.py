"""The per-layer copy threads: every task has finished when ``run_all`` returns or raises."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import torch

from hf_prefix_cache import parallel


def test_every_task_runs_and_errors_reach_the_caller():
    done = []
    parallel.run_all([lambda i=i: done.append(i) for i in range(6)])
    assert sorted(done) == list(range(6))

    def boom():
        raise ValueError("copy failed")

    with pytest.raises(ValueError, match="copy failed"):
        parallel.run_all([boom, lambda: None])


def test_an_interrupt_returns_only_after_every_started_copy_finished(monkeypatch):
    """Otherwise a copy could still write into pool blocks the caller released after the interrupt."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    finished = []
    running = threading.Event()

    def slow(index: int) -> None:
        running.set()
        time.sleep(0.4)
        finished.append(index)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(KeyboardInterrupt):
            parallel.run_all([lambda i=i: slow(i) for i in range(4)])
        started = len(finished)
        time.sleep(0.6)
        assert running.is_set()
        assert len(finished) == started, "a task was still running after run_all raised"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
