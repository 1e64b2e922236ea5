"""Counters a user reads after a call: what was asked, what was reused, what the store holds."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

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
            + (f"; FALLBACK: {self.fallback}" if self.fallback else "")
            + (f"; {self.refused_calls} calls refused by the store" if self.refused_calls else "")
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
