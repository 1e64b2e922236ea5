"""A pytest plugin that applies one mutant before any test module is imported.

Used by ``tests/test_mutants.py`` in a subprocess: ``python -m pytest -p mutants.plugin <test ids>`` with
``HF_PREFIX_CACHE_MUTANT=<name>`` (and ``tests/`` on ``PYTHONPATH``). It writes what happened to
``HF_PREFIX_CACHE_MUTANT_REPORT`` (JSON) so the caller can tell a test that failed under the mutant
from a mutant that could not be applied, a collection error or a setup error.
"""

from __future__ import annotations

import json
import os
import traceback

MUTANT_ENV = "HF_PREFIX_CACHE_MUTANT"
REPORT_ENV = "HF_PREFIX_CACHE_MUTANT_REPORT"

_state: dict = {"mutant": None, "applied": False, "apply_error": None, "phases": [], "collect_errors": []}


def pytest_configure(config) -> None:
    name = os.environ.get(MUTANT_ENV)
    if not name:
        return
    _state["mutant"] = name
    try:
        from mutants.catalog import by_name

        by_name(name).patch()
    except Exception:
        _state["apply_error"] = traceback.format_exc()
        _write()
        raise
    _state["applied"] = True


def pytest_collectreport(report) -> None:
    if report.failed:
        _state["collect_errors"].append(f"{report.nodeid}: {report.longreprtext[-2000:]}")


def pytest_runtest_logreport(report) -> None:
    if report.failed or report.when == "call":
        crash = getattr(report.longrepr, "reprcrash", None)
        _state["phases"].append(
            {
                "nodeid": report.nodeid,
                "when": report.when,
                "outcome": report.outcome,
                "message": crash.message[:500] if crash is not None else "",
            }
        )


def pytest_sessionfinish(session, exitstatus) -> None:
    if _state["mutant"] is not None:
        _write()


def _write() -> None:
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(_state, handle, indent=1)
