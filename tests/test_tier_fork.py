"""A fork while a tier's background writer holds an item (DataLoader workers, multiprocessing with the
fork start method): the child starts with empty writers, so its ``flush()`` returns and its exit does
not wait for the parent's queue, while its own writes still land. Run in a real forked child, which the
parent kills (and the test fails) if it does not finish in time."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

from support.tiers import BLOCK, LAYOUT, synthetic_chain, tier_ns

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


def held_tier(tmp_path, monkeypatch):
    """A disk tier whose writer (in this process only) is inside its first write until ``release`` is
    set, with a second block queued behind it; and three blocks, the third for a child to write."""
    parent = os.getpid()
    entered, release = threading.Event(), threading.Event()
    real = disk_module.write_file

    def held(path, data, fsync):
        if os.getpid() == parent:
            entered.set()
            release.wait(60)
        else:  # a child's write takes a while: it lands only if the child's exit waits for it
            time.sleep(0.5)
        return real(path, data, fsync)

    monkeypatch.setattr(disk_module, "write_file", held)
    tier = DiskTier(tmp_path, LAYOUT)
    _, blocks = synthetic_chain(list(range(10, 10 + 3 * BLOCK)))
    tier.put(tier_ns(), blocks[:2])
    assert entered.wait(30)
    return tier, blocks, release


def test_a_forked_child_flushes_and_exits_while_the_parents_writer_holds_an_item(tmp_path, monkeypatch):
    tier, blocks, release = held_tier(tmp_path, monkeypatch)
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


def test_a_multiprocessing_fork_child_exits_promptly_and_its_own_writes_land_without_a_flush(
    tmp_path, monkeypatch
):
    """A multiprocessing child (as a DataLoader worker) ends with os._exit, skipping atexit: the exit flush
    runs as one of its finalizers, so a put without flush() still lands, and nothing waits for the
    parent's queue."""
    tier, blocks, release = held_tier(tmp_path, monkeypatch)

    def work():  # puts and returns: no flush()
        tier.put(tier_ns(), blocks[2:])

    child = multiprocessing.get_context("fork").Process(target=work)
    try:
        child.start()
        child.join(CHILD_LIMIT_S)
        hung = child.is_alive()
        if hung:
            child.kill()
            child.join()
    finally:
        release.set()
    assert not hung, "the multiprocessing child hung on the parent's queued writes"
    assert child.exitcode == 0
    assert tier.path(tier_ns(), blocks[2].block_hash).exists(), "the child's write did not land at its exit"
    assert tier.flush(30) and tier.counters.puts == 2
    tier.close()


def _spawned_worker(folder: str) -> None:
    """A spawn-context child's work: put one block whose write takes a while, return without flush()."""
    from hf_prefix_cache.tiers import DiskTier
    from hf_prefix_cache.tiers import disk as disk_module

    real = disk_module.write_file

    def slow(path, data, fsync):
        time.sleep(0.5)
        return real(path, data, fsync)

    disk_module.write_file = slow
    _, blocks = synthetic_chain(list(range(10, 10 + BLOCK)))
    DiskTier(folder, LAYOUT).put(tier_ns(), blocks)


def test_a_spawned_child_lands_its_writes_at_exit_without_a_flush(tmp_path):
    child = multiprocessing.get_context("spawn").Process(target=_spawned_worker, args=(str(tmp_path),))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        child.join()
    assert child.exitcode == 0
    assert len(list(tmp_path.rglob("*.kvb"))) == 1, "the spawned child's write did not land at its exit"
