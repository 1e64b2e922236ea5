"""Benchmark harness for hf_prefix_cache: data, models and measurements.

``run_evaluation(EvalConfig(...))`` replays multi-turn conversations through every mode and returns an
``EvalResults``; the names are loaded lazily so that ``import hf_prefix_cache_eval.data`` stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EvalConfig", "EvalResults", "run_evaluation"]

_LAZY = {"EvalConfig": ".config", "EvalResults": ".results", "run_evaluation": ".runner"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
