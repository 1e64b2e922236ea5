"""Every curated mutant (tests/mutants/area_*.py, collected by mutants.catalog) is killed: each of its
tests fails under it.

``mutants.runner`` runs the mutants, one per core at a time, each in its own forked process that applies it
(``mutants.plugin``) and runs its tests. A mutant counts as killed only when it was applied, collection
went through, nothing errored outside a test body, and every listed test failed; a crash at import, a
renamed test id or a test that passes all leave it alive, and this test says which and why.
``HF_PREFIX_CACHE_MUTANTS=name,name`` runs a subset (while writing a new mutant).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mutants.catalog import MUTANTS, Mutant

ROOT = Path(__file__).resolve().parent.parent


def verdict(mutant: Mutant, exit_code: int, out: Path) -> str | None:
    """Why ``mutant`` survived, or None when it was killed."""
    log_path = out / f"{mutant.name}.log"
    tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
    report_path = out / f"{mutant.name}.json"
    if exit_code == -1:
        return f"timed out\n{tail}"
    if not report_path.exists():
        return f"no report (exit {exit_code}): the plugin did not run\n{tail}"
    report = json.loads(report_path.read_text())
    if not report["applied"]:
        return f"could not be applied:\n{report['apply_error']}"
    if report["collect_errors"]:
        return f"collection failed (exit {exit_code}):\n{report['collect_errors'][0]}"
    errors = [p for p in report["phases"] if p["when"] != "call" and p["outcome"] == "failed"]
    if errors:
        return f"errors outside a test body: {errors}"
    failed = {p["nodeid"] for p in report["phases"] if p["when"] == "call" and p["outcome"] == "failed"}
    survivors = [test for test in mutant.tests if test not in failed]
    if survivors or exit_code != 1:
        return f"not failed by {survivors} (exit {exit_code})\n{tail}"
    return None


def test_every_mutant_is_killed(tmp_path):
    selected = os.environ.get("HF_PREFIX_CACHE_MUTANTS")
    mutants = [m for m in MUTANTS if not selected or m.name in selected.split(",")]
    assert mutants, f"no mutant selected by HF_PREFIX_CACHE_MUTANTS={selected!r}"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [sys.executable, "-m", "mutants.runner", str(tmp_path), *(m.name for m in mutants)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"the mutant runner crashed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    runs = json.loads((tmp_path / "exit_codes.json").read_text())
    survivors, lines = [], []
    for mutant in mutants:
        run = runs[mutant.name]
        why = verdict(mutant, run["exit_code"], tmp_path)
        lines.append(f"{mutant.name:40s} {'killed' if why is None else 'SURVIVED'} {run['seconds']:6.1f} s")
        if why is not None:
            survivors.append(f"{mutant.name} ({mutant.breaks}): {why}")
    print("\n".join(lines))
    assert not survivors, "\n\n".join(survivors)
