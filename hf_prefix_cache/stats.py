"""Counters a user reads after a call: ``Counters.record()`` counts, ``Counters.snapshot()`` reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .memory import format_bytes


@dataclass
class CallStats:
    """Tokens of one ``generate()`` call (summed over the batch's rows)."""

    prompt_tokens: int = 0
    hit_tokens: int = 0
    computed_tokens: int = 0
    stored_blocks: int = 0  # blocks this call added to the store
    hit_tokens_by_tier: dict[str, int] = field(default_factory=dict)  # where the hit tokens came from
    lookup_s: float = 0.0  # the cache's own work before generate(): hashing, matching, placing the prefix
    store_s: float = 0.0  # and after it: storing prompt and reply blocks
    refused: str | None = None  # why nothing of this call was stored (its K/V were not what it implies)
    # per row that lower tiers could extend: what the cost model fetched from which tier, what it left to
    # recompute, and why (``cost_model.FetchPlan.as_dict``: estimated seconds of each choice)
    fetch: list[dict] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass
class CacheStats:
    """Counters since the last ``reset_stats()``, plus the store's current gauges."""

    calls: int = 0
    prompt_tokens: int = 0
    hit_tokens: int = 0
    computed_tokens: int = 0
    hit_rate: float = 0.0
    stored_blocks: int = 0
    free_blocks: int = 0  # holding nothing (stored blocks are evicted only when none is free)
    num_blocks: int = 0
    block_size: int = 0
    evictions: int = 0
    used_bytes: int = 0  # K/V of the stored blocks
    committed_bytes: int = 0  # memory the pool holds now (on CPU it grows with stored blocks)
    capacity_bytes: int = 0  # the budget (max_memory rounded down to whole blocks)
    fallback: str | None = None
    refused_calls: int = 0  # calls whose K/V the store refused (see CallStats.refused)
    hit_tokens_by_tier: dict[str, int] = field(default_factory=dict)  # {"device": .., "host": .., "disk": ..}
    tier_errors: int = 0  # bad entries, failed reads/writes in the lower tiers (each a miss or a drop)
    tiers: dict[str, dict] = field(default_factory=dict)  # each lower tier's counters
    # hybrid models (recurrent state, checkpoints.py): snapshots held now, their bytes, how many were taken
    # into the store, and rows that restarted from one, since the last reset
    snapshots: int = 0
    snapshot_bytes: int = 0
    snapshots_stored: int = 0
    snapshot_hits: int = 0
    pinned_blocks: int = 0  # blocks held by pin() (never evicted until unpinned); they survive reset_stats()
    pinned_bytes: int = 0
    policy: str = ""  # the store's eviction policy (eviction.py)

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"hit rate {self.hit_rate:.1%} ({self.hit_tokens}/{self.prompt_tokens} prompt tokens reused, "
            f"{self.computed_tokens} computed, {self.calls} calls); store {self.stored_blocks}/{self.num_blocks} "
            f"blocks of {self.block_size} tokens, {format_bytes(self.used_bytes)} used, "
            f"{format_bytes(self.committed_bytes)} committed of {format_bytes(self.capacity_bytes)}, "
            f"{self.evictions} evictions"
            + (f"; hit tokens by tier {self.hit_tokens_by_tier}" if self.tiers else "")
            + (f", {self.tier_errors} tier errors" if self.tier_errors else "")
            + (
                f"; {self.snapshots} state snapshots, {format_bytes(self.snapshot_bytes)}"
                if self.snapshots
                else ""
            )
            + (f"; FALLBACK: {self.fallback}" if self.fallback else "")
            + (f"; {self.refused_calls} calls refused by the store" if self.refused_calls else "")
            + (f"; {self.pinned_blocks} blocks pinned" if self.pinned_blocks else "")
        )

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td style='text-align:left'>{f.name}</td><td style='text-align:right'>{_cell(f.name, v)}</td></tr>"
            for f in fields(self)
            if (v := getattr(self, f.name)) is not None or f.name == "fallback"
        )
        return f"<table><thead><tr><th colspan=2>PrefixCache stats</th></tr></thead>{rows}</table>"


def _cell(name: str, value) -> str:
    if name.endswith("_bytes"):
        return format_bytes(value)
    if name == "hit_rate":
        return f"{value:.1%}"
    return "none" if value is None else str(value)


class Counters:
    """Totals since the last ``reset``, and the stats of the last call."""

    def __init__(self, store: Any = None):
        self.last_call = CallStats()
        self.reset(store)

    def reset(self, store: Any = None) -> None:
        """Zero the totals; evictions count from ``store``'s number now (its gauges are unaffected)."""
        self.calls = self.prompt_tokens = self.hit_tokens = self.refused = self.snapshot_hits = 0
        self.hit_tokens_by_tier: dict[str, int] = {}
        self.evictions_at_reset = store.pool.evictions if store is not None else 0
        snapshots = getattr(store, "snapshots", None)
        self.snapshots_at_reset = snapshots.stored if snapshots is not None else 0

    def record(
        self,
        rows: list,
        loaded: int,
        block_size: int,
        sources: list[list[str]] | None = None,
        hits: list[int] | None = None,
    ) -> None:
        """A looked-up call: ``loaded`` slots of every prompt row (``.tokens``, ``.pad``) came from the
        store, block by block from the tiers named in ``sources``; or, where a row computed part of its
        placed slots itself (hybrid models), ``hits`` tokens of each row did."""
        prompt = sum(len(row.tokens) for row in rows)
        used = hits if hits is not None else [max(0, loaded - row.pad) for row in rows]
        hit = sum(used)
        last = self.last_call = CallStats(prompt_tokens=prompt, hit_tokens=hit, computed_tokens=prompt - hit)
        for row_used, row_sources in zip(used, sources or []):
            for index, tier in enumerate(row_sources):
                tokens = min(block_size, row_used - index * block_size)
                if tokens <= 0:
                    break
                last.hit_tokens_by_tier[tier] = last.hit_tokens_by_tier.get(tier, 0) + tokens
                self.hit_tokens_by_tier[tier] = self.hit_tokens_by_tier.get(tier, 0) + tokens
        self.calls += 1
        self.prompt_tokens += prompt
        self.hit_tokens += hit
        if hits is not None:  # a hybrid model's rows that restarted from a snapshot
            self.snapshot_hits += sum(1 for tokens in hits if tokens)

    def add(self, other: Counters) -> None:
        """Add ``other``'s totals to these (the views of an attached cache into its own)."""
        self.calls += other.calls
        self.prompt_tokens += other.prompt_tokens
        self.hit_tokens += other.hit_tokens
        self.refused += other.refused
        self.snapshot_hits += other.snapshot_hits
        for tier, tokens in other.hit_tokens_by_tier.items():
            self.hit_tokens_by_tier[tier] = self.hit_tokens_by_tier.get(tier, 0) + tokens

    def record_fallback(self, prompt_tokens: int) -> None:
        """A call recomputed without the cache: it reused nothing (the last call's stats say so)."""
        self.last_call = CallStats(prompt_tokens=prompt_tokens, computed_tokens=prompt_tokens)

    def record_refusal(self, problem: str) -> None:
        """The store took nothing from the last call, for ``problem``."""
        self.refused += 1
        self.last_call.refused = problem

    def snapshot(self, store: Any, block_size: int, fallback: str | None) -> CacheStats:
        """The totals plus ``store``'s current gauges (all zero without a store)."""
        pool = store.pool if store is not None else None
        tiers = store.tiers if store is not None else None
        names = ["device"] + ([t.name for t in tiers.tiers] if tiers else [])
        return CacheStats(
            calls=self.calls,
            prompt_tokens=self.prompt_tokens,
            hit_tokens=self.hit_tokens,
            computed_tokens=self.prompt_tokens - self.hit_tokens,
            hit_rate=self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
            stored_blocks=pool.num_cached if pool else 0,
            free_blocks=pool.num_blocks - pool.num_cached if pool else 0,
            num_blocks=pool.num_blocks if pool else 0,
            block_size=block_size,
            evictions=pool.evictions - self.evictions_at_reset if pool else 0,
            used_bytes=store.used_bytes if store is not None else 0,
            committed_bytes=store.committed_bytes if store is not None else 0,
            capacity_bytes=store.capacity_bytes if store is not None else 0,
            fallback=fallback,
            refused_calls=self.refused,
            hit_tokens_by_tier={name: self.hit_tokens_by_tier.get(name, 0) for name in names},
            tier_errors=tiers.errors if tiers else 0,
            tiers=tiers.counters() if tiers else {},
            **_snapshot_gauges(getattr(store, "snapshots", None), self),
            pinned_blocks=store.pins.num_blocks if store is not None else 0,
            pinned_bytes=store.pins.num_blocks * store.kv.block_bytes() if store is not None else 0,
            policy=store.policy if store is not None else "",
        )


def _snapshot_gauges(snapshots: Any, counters: Counters) -> dict:
    if snapshots is None:
        return {}
    return {
        "snapshots": len(snapshots),
        "snapshot_bytes": snapshots.used_bytes,
        "snapshots_stored": snapshots.stored - counters.snapshots_at_reset,
        "snapshot_hits": counters.snapshot_hits,
    }
