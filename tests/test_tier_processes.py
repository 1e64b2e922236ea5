"""The disk tier across processes: restart, a writer killed mid-write, and concurrent writers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

from support.tier_worker import chain_tokens
from support.tiers import LAYOUT, synthetic_chain, tier_ns
from support.workers import TIER_WORKER, WORKER_ENV, run_worker

from hf_prefix_cache.tiers import DiskTier
from hf_prefix_cache.tiers import disk as disk_module

EXIT_ALLOWANCE_S = 30  # from the worker's report to its exit, with EXIT_FLUSH_S patched to 0.5 s


def test_a_restarted_process_hits_on_its_first_call_and_other_models_never_do(tmp_path):
    folder = tmp_path / "kv"
    filled = run_worker("generate", folder, "llama:0:", 11, 12)
    assert all(call["equal"] for call in filled["calls"]) and filled["calls"][0]["hit_tokens"] == 0
    assert list(folder.rglob("*.kvb")), "the exit flush wrote nothing"

    again = run_worker("generate", folder, "llama:0:", 11, 12)
    first = again["calls"][0]
    assert first["equal"] and first["hit_tokens"] == 36 and first["by_tier"] == {"disk": 36}
    assert again["tier_errors"] == 0

    # another model, changed weights, another salt: one fresh process, three caches over the folder
    specs = ["qwen2:0:", "llama:1:", "llama:0:tenant-b"]
    others = run_worker("generate", folder, ",".join(specs), 11, lines=3)
    for spec, other in zip(specs, others):
        call = other["calls"][0]
        assert call["equal"] and call["hit_tokens"] == 0, (spec, call)
        assert other["tier_errors"] == 0, spec


def test_interpreter_exit_lands_the_writes_still_queued(tmp_path):
    """A process that exits right after generate() (no flush) still leaves its blocks on disk."""
    folder = tmp_path / "kv"
    report = run_worker("queue", folder, 4, 0.2)  # 12 blocks, 0.2 s each: ~2.4 s of writes at exit
    assert report["queued"] >= 10, "the writes should still be queued when the process exits"
    assert len(list(folder.rglob("*.kvb"))) == 12
    assert list(folder.rglob("*.tmp")) == []


def test_the_exit_flush_gives_up_after_its_bound_when_the_disk_hangs(tmp_path):
    """A hung write must not hang the interpreter's exit: the flush waits EXIT_FLUSH_S (0.5 s here) at most.

    The wait for the exit starts when the worker prints its report, its last act before exiting, so the
    allowance (60 times the bound) leaves out the worker's start-up: a hang is told from a slow start
    without waiting minutes (the mutant run pays this allowance once)."""
    worker = subprocess.Popen(
        [sys.executable, TIER_WORKER, "queue", str(tmp_path / "kv"), "2", "hang", "0.5"],
        stdout=subprocess.PIPE,
        text=True,
        env=WORKER_ENV,
    )
    watchdog = threading.Timer(300, worker.kill)  # a worker stuck before its report fails, never hangs
    watchdog.start()
    try:
        line = worker.stdout.readline()
        while line and not line.startswith("{"):
            line = worker.stdout.readline()
        assert line, "the worker ended without its report"
        assert json.loads(line)["queued"] == 6
        worker.wait(timeout=EXIT_ALLOWANCE_S)  # without the bound the exit would wait forever
    finally:
        watchdog.cancel()
        worker.kill()
        worker.wait()
    assert worker.returncode == 0


def test_a_writer_killed_mid_write_leaves_nothing_a_reader_accepts(tmp_path, monkeypatch):
    folder = tmp_path / "kv"
    run_worker("write", folder, 0, 2)  # two complete chains first
    writer = subprocess.Popen(
        [sys.executable, TIER_WORKER, "write", str(folder), "2", "1", "slow"],
        stdout=subprocess.PIPE,
        text=True,
        env=WORKER_ENV,
    )
    try:
        line = writer.stdout.readline()
        assert line.startswith("HALF"), line
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.wait(30)
    assert list(folder.rglob("*.tmp")), "the killed writer should have left its temp file"
    report = run_worker("read", folder, 3, 0)
    assert report["invalid"] == 0 and report["valid"] == 6 and report["missing"] == 3
    tier = DiskTier(folder, LAYOUT)
    requests, _ = synthetic_chain(chain_tokens(2), value=3.0)
    assert tier.get(tier_ns(), requests) == [] and tier.counters.errors == 0
    monkeypatch.setattr(disk_module, "STALE_TEMP_S", -1.0)
    tier._scan()  # the size sweep removes a dead writer's temp files
    assert list(folder.rglob("*.tmp")) == []


def test_two_writers_and_a_reader_share_one_folder(tmp_path):
    folder = tmp_path / "kv"
    count = 40
    procs = [
        subprocess.Popen(
            [sys.executable, TIER_WORKER, *args], stdout=subprocess.PIPE, text=True, env=WORKER_ENV
        )
        for args in (
            ["write", str(folder), "0", str(count)],
            ["write", str(folder), "10", str(count - 10)],  # overlapping chains: the same entries
            ["read", str(folder), str(count), "6"],
        )
    ]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    report = json.loads(outputs[2].strip().splitlines()[-1])
    assert report["invalid"] == 0, report
    assert report["valid"] > 0
    final = run_worker("read", folder, count, 0)
    assert final == {"valid": 3 * count, "missing": 0, "invalid": 0, "problems": []}
    assert list(folder.rglob("*.tmp")) == []
    time.sleep(0)
