"""Results on disk (results.json, results.csv, plots) and as a plain-text table for the terminal.

results.json holds everything needed to redo the analysis without rerunning: the configuration, the
environment, per-mode notes, summaries and every per-turn record. NaN (a quantity a mode cannot report)
is written as null so the file is strict JSON.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from . import metrics
from .modes import BASELINE

if TYPE_CHECKING:
    from .results import EvalResults

logger = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"


def write_outputs(results: EvalResults, directory: str | Path) -> dict[str, Path]:
    """Write results.json, results.csv and (if enabled) the plots; fills ``results.files``/``plot_paths``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    results.output_dir = directory
    if results.config.plots:
        from .plots import write_plots

        results.plot_paths = write_plots(results, directory)
    frame = results.frame()
    csv_path = directory / RESULTS_CSV
    frame.to_csv(csv_path, index=False)
    json_path = directory / RESULTS_JSON
    json_path.write_text(json.dumps(results_payload(results, frame), indent=2, allow_nan=False), "utf-8")
    results.files = {"json": json_path, "csv": csv_path, **results.plot_paths}
    logger.info("wrote %s", ", ".join(str(p) for p in results.files.values()))
    return results.files


def results_payload(results: EvalResults, frame: pd.DataFrame | None = None) -> dict[str, Any]:
    """Everything results.json holds, as plain JSON-safe values."""
    frame = results.frame() if frame is None else frame
    modes = results.measured_modes
    payload = {
        "config": results.config.as_dict(),
        "environment": results.environment,
        "wall_s": results.wall_s,
        "modes": results.modes,
        "summary": _rows(results.summary_frame().reset_index()),
        "first_turns": _rows(results.first_turn_frame().reset_index()),
        "by_turn": _rows(metrics.by_group(frame, "turn", modes)),
        "by_context": _rows(metrics.by_group(frame, "context_bin", modes)),
        "stops": results.stops,
        "turns": results.turns,
        "records": _rows(frame),
        "plots": {name: str(path) for name, path in results.plot_paths.items()},
    }
    return _clean(payload)


def _rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return frame.to_dict(orient="records")


def _clean(value: Any) -> Any:
    """NaN -> None, numpy scalars -> Python, paths -> str, recursively."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def format_report(results: EvalResults) -> str:
    """The terminal summary: setup line, per-mode table, speedups by turn and by context length, notes."""
    env = results.environment
    config = results.config
    frame = results.frame()
    modes = results.measured_modes
    conversations = frame["conversation"].nunique() if len(frame) else 0
    lines = [
        f"model {env['model']} ({env['model_class']}, {env['model_parameters'] / 1e6:.1f}M parameters, "
        f"{env['dtype'].replace('torch.', '')}, {env['device']}, {env['torch_threads']} threads, "
        f"generate() on the {env.get('generate_thread', 'main')} thread); "
        f"dataset {config.dataset}: {conversations} conversations, {len(results.turns)} turns, "
        f"history from {config.history} replies",
        f"shared system prompt: {env['recipe_prefix_tokens']} tokens; max_new_tokens {config.max_new_tokens}; "
        f"greedy; mode order shuffled per turn (seed {config.seed}); {config.warmup_calls} warm-up call(s) "
        "per mode excluded",
        "",
        _summary_table(results.summary_frame()),
    ]
    if any(mode not in config.modes for mode in modes):  # a restart or workers ran in other processes
        lines += [
            "",
            "first turn of each conversation (speedup vs baseline on the same turns; hit tokens by tier):",
            _first_turn_table(results.first_turn_frame()),
        ]
    for title, key in (("turn", "turn"), ("context length (prompt tokens)", "context_bin")):
        grouped = metrics.by_group(frame, key, modes)
        pivot = metrics.speedup_pivot(grouped, key, modes)
        if pivot.empty or len(pivot.columns) < 2:
            continue
        lines += [
            "",
            f"TTFT speedup vs {BASELINE} (ratio of p50s) by {title}:",
            _speedup_table(pivot, grouped, key),
        ]
    notes = _notes(results)
    if notes:
        lines += ["", "notes:", *(f"  - {note}" for note in notes)]
    return "\n".join(lines)


def _summary_table(summary: pd.DataFrame) -> str:
    table = pd.DataFrame(
        {
            "turns": summary["turns"],
            "TTFT p50": summary["ttft_p50_s"].map(_seconds),
            "TTFT p90": summary["ttft_p90_s"].map(_seconds),
            "TTFT mean": summary["ttft_mean_s"].map(_seconds),
            "speedup p50": summary.get("ttft_speedup_p50", pd.Series(dtype=float)).map(_ratio),
            "e2e p50": summary["e2e_p50_s"].map(_seconds),
            "hit rate": summary["hit_rate"].map(_percent),
            "computed tok": summary["computed_tokens"].map(lambda v: "n/a" if pd.isna(v) else f"{int(v)}"),
            "mismatches": summary["mismatches"].astype(str) + "/" + summary["turns"].astype(str),
        }
    )
    if summary["errors"].any():
        table["errors"] = summary["errors"]
    return table.to_string()


def _first_turn_table(summary: pd.DataFrame) -> str:
    table = pd.DataFrame(
        {
            "turns": summary["turns"],
            "TTFT p50": summary["ttft_p50_s"].map(_seconds),
            "speedup p50": summary.get("ttft_speedup_p50", pd.Series(dtype=float)).map(_ratio),
            "hit rate": summary["hit_rate"].map(_percent),
            **{
                tier: summary[f"hit_{tier}"].map(lambda v: "n/a" if pd.isna(v) else f"{int(v)}")
                for tier in metrics.TIERS
            },
            "mismatches": summary["mismatches"].astype(str) + "/" + summary["turns"].astype(str),
        }
    )
    return table.to_string()


def _speedup_table(pivot: pd.DataFrame, grouped: pd.DataFrame, key: str) -> str:
    counts = grouped[grouped["mode"] == BASELINE].set_index(key)["turns"]
    table = pivot.drop(columns=[BASELINE], errors="ignore").map(_ratio)
    table.insert(0, "turns", counts.reindex(pivot.index).fillna(0).astype(int))
    table.index.name = key
    return table.to_string()


def _notes(results: EvalResults) -> list[str]:
    notes = []
    for name, info in results.modes.items():
        if not info.get("available", True):
            notes.append(f"{name}: NOT MEASURED - {info.get('reason')}")
        for note in info.get("notes", []):
            notes.append(f"{name}: {note}")
        if info.get("fallbacks"):
            notes.append(
                f"{name}: {info['fallbacks']} prompt(s) did not start with the prefix and were recomputed"
            )
        stats = info.get("stats")
        if stats:
            notes.append(
                f"{name}: store {stats['stored_blocks']}/{stats['num_blocks']} blocks used, "
                f"{stats['evictions']} evictions"
            )
    busy = busy_machine_note(results.environment)
    if busy:
        notes.append(busy)
    if results.stops:
        notes.append(f"{len(results.stops)} conversation(s) stopped early at the context limit")
    fallbacks = results.environment.get("dataset_reply_fallbacks")
    if fallbacks:
        notes.append(f"{fallbacks} turn(s) had no dataset reply; the model's reply was kept instead")
    return notes


def busy_machine_note(env: dict[str, Any]) -> str | None:
    """A warning when other processes were using the CPU: their load distorts every timing."""
    load, cpus = env.get("load_average_before"), env.get("cpu_count")
    if load is None or not cpus or load < max(1.0, 0.5 * cpus):
        return None
    return (
        f"WARNING: the machine was busy before this run (1-min load {load} on {cpus} CPUs): absolute times are "
        "inflated, and short computations (cache hits) suffer most when threads are oversubscribed; "
        "compare modes within this run only, rerun on an idle machine, or try --threads 1"
    )


def _seconds(value: float) -> str:
    return "n/a" if pd.isna(value) else f"{value:.3f}s"


def _ratio(value: float) -> str:
    return "n/a" if pd.isna(value) else f"{value:.2f}x"


def _percent(value: float) -> str:
    return "n/a" if pd.isna(value) else f"{value:.1%}"
