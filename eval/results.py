"""``EvalResults``: what one evaluation run measured, with its tables (the data every report reads)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from . import metrics
from .config import EvalConfig
from .metrics import TurnRecord
from .report import format_report
from .subruns import PlannedTurn


@dataclass
class EvalResults:
    """What a run measured; ``summary_frame()`` is the headline table, ``plot_paths`` the figures."""

    config: EvalConfig
    records: list[TurnRecord]
    modes: dict[str, dict[str, Any]]  # per mode: label, available, reason, setup_s, notes, stats
    turns: list[dict[str, Any]]  # per turn: conversation, turn, prompt_tokens, baseline reply
    stops: list[dict[str, Any]]  # conversations cut by the context limit
    environment: dict[str, Any]
    wall_s: float = 0.0
    output_dir: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    plot_paths: dict[str, Path] = field(default_factory=dict)
    plan: list[PlannedTurn] = field(default_factory=list, repr=False)  # prompts and baseline outputs

    @property
    def measured_modes(self) -> list[str]:
        """The configured modes that ran, then the other processes' (restart, worker0, ...) in order."""
        seen = list(dict.fromkeys(r.mode for r in self.records))
        return [name for name in self.config.modes if name in seen] + [
            name for name in seen if name not in self.config.modes
        ]

    def frame(self) -> pd.DataFrame:
        """All per-turn, per-mode records (the rows of results.csv)."""
        return metrics.records_frame(self.records, self.bin_tokens)

    @property
    def bin_tokens(self) -> int:
        """Width of the context-length bins: the configured one, or chosen from the prompt lengths."""
        prompts = [r.prompt_tokens for r in self.records]
        return self.config.context_bin_tokens or metrics.auto_bin_width(prompts)

    def summary_frame(self) -> pd.DataFrame:
        """One row per mode: TTFT/e2e p50, p90, mean, hit rate, mismatches, speedups vs the baseline."""
        return metrics.summarize(self.frame(), self.measured_modes)

    def first_turn_frame(self) -> pd.DataFrame:
        """``summary_frame`` over first turns only: what a restart or a fresh worker serves cold."""
        return metrics.first_turns(self.frame(), self.measured_modes)

    def by_turn_frame(self) -> pd.DataFrame:
        return metrics.by_group(self.frame(), "turn", self.measured_modes)

    def by_context_frame(self) -> pd.DataFrame:
        return metrics.by_group(self.frame(), "context_bin", self.measured_modes)

    def table(self) -> str:
        return format_report(self)
