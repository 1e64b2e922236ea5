"""Per-turn records into summaries: percentiles per mode and TTFT speedups against the baseline.

Speedups are ratios of medians computed within the same group (a turn index or a context-length bin),
so every ratio compares the same prompts. Hit rates are token-weighted (reused prompt tokens over prompt
tokens), as vLLM and SGLang report them; a mode that cannot tell its hits gets NaN, not 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from .modes import BASELINE


@dataclass
class TurnRecord:
    """One mode's measurements for one turn (one row of results.csv)."""

    step: int  # position in the interleaved schedule
    conversation: str
    turn: int  # 1-based
    mode: str
    run_position: int  # 0-based place of this mode in the turn's shuffled order
    prompt_tokens: int
    hit_tokens: float  # NaN when the mode cannot tell
    computed_tokens: float
    hit_rate: float
    ttft_s: float
    e2e_s: float
    new_tokens: int
    match: bool  # greedy tokens equal to the baseline's
    error: str | None = None
    # prompt tokens reused from each PrefixCache tier (NaN for the modes that are not a PrefixCache)
    hit_device: float = math.nan
    hit_host: float = math.nan
    hit_disk: float = math.nan
    hit_remote: float = math.nan


TIERS: tuple[str, ...] = ("device", "host", "disk", "remote")


def tier_hits(by_tier: dict[str, int] | None) -> dict[str, float]:
    """``TurnRecord`` keyword arguments from ``CallStats.hit_tokens_by_tier`` (a tier absent there: 0)."""
    if by_tier is None:
        return {}
    return {f"hit_{tier}": float(by_tier.get(tier, 0)) for tier in TIERS}


def records_frame(records: Sequence[TurnRecord], bin_tokens: int | None = None) -> pd.DataFrame:
    """Records as a DataFrame with a ``context_bin`` column (prompt length rounded down to ``bin_tokens``)."""
    frame = pd.DataFrame([asdict(r) for r in records], columns=list(TurnRecord.__dataclass_fields__))
    width = bin_tokens or auto_bin_width(frame["prompt_tokens"])
    frame["context_bin"] = context_bins(frame["prompt_tokens"], width)
    return frame


def auto_bin_width(prompt_tokens: Sequence[int], max_bins: int = 8) -> int:
    """The smallest power of two (16 or more) that splits the observed prompt lengths into at most
    ``max_bins`` bins: the default MT-Bench run spans ~150 tokens, a ShareGPT run thousands."""
    values = [int(v) for v in prompt_tokens]
    if not values:
        return 256
    width = 16
    while len({v // width for v in values}) > max_bins:
        width *= 2
    return width


def context_bins(prompt_tokens: pd.Series, width: int) -> pd.Series:
    """Labels like ``"1024-1279"`` for fixed-width bins of prompt length."""
    if width < 1:
        raise ValueError(f"bin width must be positive, got {width}")
    low = (prompt_tokens.astype(int) // width) * width
    return low.map(lambda start: f"{start}-{start + width - 1}")


def _ok(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["error"].isna()]


def _hit_rate(group: pd.DataFrame) -> float:
    if group["hit_tokens"].isna().any() or group["prompt_tokens"].sum() == 0:
        return math.nan
    return float(group["hit_tokens"].sum() / group["prompt_tokens"].sum())


def summarize(frame: pd.DataFrame, modes: Sequence[str]) -> pd.DataFrame:
    """One row per mode: TTFT and end-to-end p50/p90/mean, hit rate, mismatches, speedups.

    A mode's speedups are against the baseline on the same turns (steps): the restart and worker modes
    replay only some of the turns, in other processes.
    """
    rows = []
    for mode in modes:
        part = frame[frame["mode"] == mode]
        ok = _ok(part)
        rows.append(
            {
                "mode": mode,
                "turns": len(ok),
                "errors": int(part["error"].notna().sum()),
                "ttft_p50_s": _quantile(ok["ttft_s"], 0.5),
                "ttft_p90_s": _quantile(ok["ttft_s"], 0.9),
                "ttft_mean_s": float(ok["ttft_s"].mean()) if len(ok) else math.nan,
                "e2e_p50_s": _quantile(ok["e2e_s"], 0.5),
                "e2e_p90_s": _quantile(ok["e2e_s"], 0.9),
                "e2e_mean_s": float(ok["e2e_s"].mean()) if len(ok) else math.nan,
                "prompt_tokens": int(ok["prompt_tokens"].sum()),
                "computed_tokens": math.nan
                if ok["computed_tokens"].isna().any()
                else float(ok["computed_tokens"].sum()),
                "hit_rate": _hit_rate(ok),
                "mismatches": int((~ok["match"]).sum()),
                **{f"hit_{tier}": _tier_total(ok, tier) for tier in TIERS},
                **_speedups(frame, part, ok),
            }
        )
    return pd.DataFrame(rows).set_index("mode")


def first_turns(frame: pd.DataFrame, modes: Sequence[str]) -> pd.DataFrame:
    """``summarize`` over the first turn of every conversation: the turn a restart or a fresh worker serves
    cold unless a lower tier (disk, remote) holds its prefix."""
    return summarize(frame[frame["turn"] == 1], [m for m in modes if (frame["mode"] == m).any()])


def _tier_total(ok: pd.DataFrame, tier: str) -> float:
    column = ok[f"hit_{tier}"]
    return math.nan if column.isna().all() else float(column.sum())


def _speedups(frame: pd.DataFrame, part: pd.DataFrame, ok: pd.DataFrame) -> dict[str, float]:
    """TTFT and e2e speedups of one mode: the baseline's p50/mean over the same steps, over the mode's."""
    base = _ok(frame[(frame["mode"] == BASELINE) & frame["step"].isin(part["step"])])
    if base.empty:
        return {}
    ttft_p50, e2e_p50 = _quantile(ok["ttft_s"], 0.5), _quantile(ok["e2e_s"], 0.5)
    ttft_mean = float(ok["ttft_s"].mean()) if len(ok) else math.nan
    return {
        "ttft_speedup_p50": _quantile(base["ttft_s"], 0.5) / ttft_p50,
        "ttft_speedup_mean": float(base["ttft_s"].mean()) / ttft_mean,
        "e2e_speedup_p50": _quantile(base["e2e_s"], 0.5) / e2e_p50,
    }


def by_group(frame: pd.DataFrame, key: str, modes: Sequence[str]) -> pd.DataFrame:
    """Per ``key`` value and mode: count, TTFT p50/p90, hit rate, and TTFT speedup (baseline p50 / p50)."""
    ok = _ok(frame)
    rows = []
    for value, group in ok.groupby(key, sort=False):
        base = group[group["mode"] == BASELINE]["ttft_s"]
        base_p50 = _quantile(base, 0.5)
        for mode in modes:
            part = group[group["mode"] == mode]
            if part.empty:
                continue
            p50 = _quantile(part["ttft_s"], 0.5)
            rows.append(
                {
                    key: value,
                    "mode": mode,
                    "turns": len(part),
                    "prompt_tokens_mean": float(part["prompt_tokens"].mean()),
                    "ttft_p50_s": p50,
                    "ttft_p90_s": _quantile(part["ttft_s"], 0.9),
                    "hit_rate": _hit_rate(part),
                    "ttft_speedup": base_p50 / p50 if p50 and not math.isnan(p50) else math.nan,
                }
            )
    result = pd.DataFrame(rows)
    if result.empty:
        return result
    if key == "context_bin":
        result["_order"] = result[key].map(lambda label: int(str(label).split("-")[0]))
        result = result.sort_values(["_order", "mode"], kind="stable").drop(columns="_order")
    else:
        result = result.sort_values([key], kind="stable")
    return result.reset_index(drop=True)


def speedup_pivot(grouped: pd.DataFrame, key: str, modes: Sequence[str]) -> pd.DataFrame:
    """``by_group`` output reshaped: rows are ``key`` values, columns the modes' TTFT speedups."""
    if grouped.empty:
        return grouped
    pivot = grouped.pivot(index=key, columns="mode", values="ttft_speedup")
    order = list(dict.fromkeys(grouped[key]))
    return pivot.reindex(index=order, columns=[m for m in modes if m in pivot.columns])


def _quantile(values: pd.Series, q: float) -> float:
    values = values.dropna()
    return float(np.quantile(values, q)) if len(values) else math.nan
