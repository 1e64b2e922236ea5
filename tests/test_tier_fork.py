"""A fork while a tier's background writer holds an item (DataLoader workers, multiprocessing with the
fork start method): the child starts with empty writers, so its ``flush()`` returns and its exit does
not wait for the parent's queue, while its own writes still land. Run in a real forked child, which the
parent kills (and the test fails) if it does not finish in time."""

from __future__ import annotations

import os
import signal
import threading
import time

from tier_helpers import BLOCK, LAYOUT, synthetic_chain, tier_ns

from hf_prefix_cache.tiers import DiskTier
from hf_prefix_cache.tiers import disk as disk_module
from hf_prefix_cache.tiers import writer as writer_module

CHILD_LIMIT_S = 20.0  # a generous bound for a child that does a few millisecond-sized writes


def wait_for(pid: int, limit: float) -> int | None:
    """The child's exit code, or None (after killing it) if it is still running after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def test_a_forked_child_flushes_and_exits_while_the_parents_writer_holds_an_item(tmp_path, monkeypatch):
    parent = os.getpid()
    entered, release = threading.Event(), threading.Event()
    real = disk_module.write_file

    def held(path, data, fsync):  # the parent's writer stays inside its first write until released
        if os.getpid() == parent:
            entered.set()
            release.wait(60)
        return real(path, data, fsync)

    monkeypatch.setattr(disk_module, "write_file", held)
    tier = DiskTier(tmp_path, LAYOUT)
    _, blocks = synthetic_chain(list(range(10, 10 + 3 * BLOCK)))
    tier.put(tier_ns(), blocks[:2])  # block 0 in the writer's hands, block 1 queued behind it
    assert entered.wait(30)
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            flushed = tier.flush() and tier.writer.pending == 0  # no timeout: it hangs unless reset
            writer_module._flush_at_exit()  # what the child's interpreter exit runs
            tier.put(tier_ns(), blocks[2:])  # the child's own write lands, on a thread of its own
            own = tier.flush(CHILD_LIMIT_S) and tier.path(tier_ns(), blocks[2].block_hash).exists()
            code = 0 if flushed and own else 2
        finally:
            os._exit(code)
    try:
        code = wait_for(pid, CHILD_LIMIT_S)
    finally:
        release.set()
    assert code is not None, "the forked child hung on the parent's queued writes (flush or exit)"
    assert code == 0, "the child's flush returned but its state was wrong, or its own write did not land"
    assert tier.flush(30) and tier.counters.puts == 2  # the parent's writes land in the parent
    assert all(tier.path(tier_ns(), block.block_hash).exists() for block in blocks)
    tier.close()
