"""Start the worker scripts beside this file (``tier_worker.py``, ``remote_worker.py``) as fresh interpreters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TIER_WORKER = str(Path(__file__).parent / "tier_worker.py")
REMOTE_WORKER = str(Path(__file__).parent / "remote_worker.py")
WORKER_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def run_worker(*args, timeout=600, lines: int = 1):
    """``tier_worker.py ARGS``, which must exit 0; its last ``lines`` JSON lines (one: that line alone)."""
    out = subprocess.run(
        [sys.executable, TIER_WORKER, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=WORKER_ENV,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads(line) for line in out.stdout.strip().splitlines()[-lines:]]
    return results[0] if lines == 1 else results
