"""Counters a user reads after a call: what was asked, what was reused, what the store holds."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .memory import format_bytes


@dataclass
class CallStats:
    """Tokens of one ``generate()`` call (summed over the batch's rows)."""

    prompt_tokens: int = 0
    hit_tokens: int = 0
    computed_tokens: int = 0
    stored_blocks: int = 0  # blocks this call added to the store
    lookup_s: float = 0.0  # the cache's own work before generate(): hashing, matching, placing the prefix
    store_s: float = 0.0  # and after it: storing prompt and reply blocks

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

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"hit rate {self.hit_rate:.1%} ({self.hit_tokens}/{self.prompt_tokens} prompt tokens reused, "
            f"{self.computed_tokens} computed, {self.calls} calls); store {self.stored_blocks}/{self.num_blocks} "
            f"blocks of {self.block_size} tokens, {format_bytes(self.used_bytes)} used, "
            f"{format_bytes(self.committed_bytes)} committed of {format_bytes(self.capacity_bytes)}, "
            f"{self.evictions} evictions" + (f"; FALLBACK: {self.fallback}" if self.fallback else "")
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
