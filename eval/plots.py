"""PNG figures of a run: TTFT by turn, TTFT against context length, hit rate by turn, and all three.

Figures are drawn with matplotlib's object API (``Figure``, no pyplot), so writing them never changes
the backend of a notebook or needs a display.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .modes import BASELINE

if TYPE_CHECKING:
    from .results import EvalResults

logger = logging.getLogger(__name__)

PLOT_FILES = {
    "summary": "summary.png",
    "ttft_by_turn": "ttft_by_turn.png",
    "ttft_vs_context": "ttft_vs_context.png",
    "hit_rate_by_turn": "hit_rate_by_turn.png",
}
COLORS = {
    "baseline": "#7f7f7f",
    "deepcopy": "#1f77b4",
    "cont_batching": "#ff7f0e",
    "prefix_cache": "#2ca02c",
    "restart": "#9467bd",
}
MARKERS = {"baseline": "o", "deepcopy": "s", "cont_batching": "^", "prefix_cache": "D", "restart": "P"}
WORKER_COLORS = ("#d62728", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#393b79")


def _color(mode: str) -> str | None:
    if mode.startswith("worker") and mode[6:].isdigit():
        return WORKER_COLORS[int(mode[6:]) % len(WORKER_COLORS)]
    return COLORS.get(mode)


def _marker(mode: str) -> str:
    return "v" if mode.startswith("worker") else MARKERS.get(mode, "o")


def write_plots(results: EvalResults, directory: str | Path) -> dict[str, Path]:
    """Write the four PNGs into ``directory``; returns ``{name: path}``."""
    directory = Path(directory)
    frame = results.frame()
    frame = frame[frame["error"].isna()]
    modes = results.measured_modes
    model = Path(str(results.environment.get("model", results.config.model))).name
    title = f"{model} on {Path(results.config.dataset).name}"
    panels = {
        "ttft_by_turn": lambda ax: plot_ttft_by_turn(ax, frame, modes),
        "ttft_vs_context": lambda ax: plot_ttft_vs_context(ax, frame, modes, results.bin_tokens),
        "hit_rate_by_turn": lambda ax: plot_hit_rate_by_turn(ax, frame, modes),
    }
    paths: dict[str, Path] = {}
    summary = Figure(figsize=(17, 4.8), layout="constrained")
    for ax, draw in zip(summary.subplots(1, 3), panels.values()):
        draw(ax)
    summary.suptitle(f"Time to first token and prefix reuse: {title}")
    paths["summary"] = _save(summary, directory / PLOT_FILES["summary"])
    for name, draw in panels.items():
        figure = Figure(figsize=(6.4, 4.6), layout="constrained")
        draw(figure.subplots())
        figure.suptitle(title, fontsize="small")
        paths[name] = _save(figure, directory / PLOT_FILES[name])
    return paths


def plot_ttft_by_turn(ax: Axes, frame: pd.DataFrame, modes: Sequence[str]) -> None:
    """Median TTFT per turn index and mode, with a p10-p90 whisker."""
    turns = sorted(frame["turn"].unique())
    width = 0.6 / max(len(modes), 1)
    for index, mode in enumerate(modes):
        part = frame[frame["mode"] == mode].groupby("turn")["ttft_s"]
        median = part.median().reindex(turns)
        low, high = part.quantile(0.1).reindex(turns), part.quantile(0.9).reindex(turns)
        x = np.asarray(turns, dtype=float) + (index - (len(modes) - 1) / 2) * width
        ax.errorbar(
            x,
            median,
            yerr=[median - low, high - median],
            label=_label(mode),
            color=_color(mode),
            marker=_marker(mode),
            capsize=3,
            linestyle="-",
        )
    ax.set_xticks(turns)
    ax.set_xlabel("turn of the conversation")
    ax.set_ylabel("TTFT (s), median with p10-p90")
    ax.set_title("TTFT by turn")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def plot_ttft_vs_context(ax: Axes, frame: pd.DataFrame, modes: Sequence[str], bin_tokens: int) -> None:
    """Every measured turn as a point, and the median per context-length bin as a line."""
    for mode in modes:
        part = frame[frame["mode"] == mode]
        color = _color(mode)
        ax.scatter(
            part["prompt_tokens"],
            part["ttft_s"],
            s=12,
            alpha=0.35,
            color=color,
            marker=_marker(mode),
        )
        bins = (part["prompt_tokens"] // bin_tokens) * bin_tokens + bin_tokens / 2
        median = part.groupby(bins)["ttft_s"].median()
        ax.plot(median.index, median.values, color=color, label=_label(mode), marker=_marker(mode))
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("TTFT (s)")
    ax.set_title(f"TTFT vs context length (median per {bin_tokens}-token bin)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def plot_hit_rate_by_turn(ax: Axes, frame: pd.DataFrame, modes: Sequence[str]) -> None:
    """Token-weighted hit rate per turn for each mode that reports its hits."""
    shown = [m for m in modes if m != BASELINE and not frame[frame["mode"] == m]["hit_tokens"].isna().all()]
    turns = sorted(frame["turn"].unique())
    width = 0.8 / max(len(shown), 1)
    for index, mode in enumerate(shown):
        part = frame[frame["mode"] == mode].groupby("turn")[["hit_tokens", "prompt_tokens"]].sum()
        rate = (part["hit_tokens"] / part["prompt_tokens"]).reindex(turns)
        x = np.asarray(turns, dtype=float) + (index - (len(shown) - 1) / 2) * width
        ax.bar(x, rate * 100, width=width, label=_label(mode), color=_color(mode))
    ax.set_xticks(turns)
    ax.set_ylim(0, 100)
    ax.set_xlabel("turn of the conversation")
    ax.set_ylabel("prompt tokens reused (%)")
    ax.set_title("Hit rate by turn")
    ax.grid(alpha=0.3, axis="y")
    if shown:
        columns = min(len(shown), 3)
        ax.set_ylim(0, 100 + 18 * -(-len(shown) // columns))  # room above the bars for the legend rows
        ax.set_yticks(range(0, 101, 20))
        ax.legend(fontsize="small", loc="upper center", ncol=columns)
    else:
        ax.text(0.5, 0.5, "no mode reported hits", ha="center", va="center", transform=ax.transAxes)


SHORT_LABELS = {
    "baseline": "baseline (no reuse)",
    "deepcopy": "deepcopy recipe",
    "cont_batching": "continuous batching",
    "prefix_cache": "hf_prefix_cache",
    "restart": "restart (fresh process, disk tier)",
}


def _label(mode: str) -> str:
    if mode.startswith("worker"):
        return f"{mode} (remote tier)"
    return SHORT_LABELS.get(mode, mode)


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=110)
    logger.info("wrote %s", path)
    return path
