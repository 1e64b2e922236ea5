"""Showing where a prompt stops hitting the store, for people tuning prompts in a notebook.

A timestamp or request id early in a system prompt silently kills every hit after it. ``HitReport``
marks, token by token, what would be reused, what agrees with stored text but sits in an unfinished
block, and where the first difference is.
"""

from __future__ import annotations

import html
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from .identity import root_ref
from .store import BlockStore


@dataclass
class HitReport:
    """How a prompt matches the store.

    ``hit_tokens``: what ``generate()`` would load (full blocks, at most ``len(tokens) - 1``; for a hybrid
    model, up to the longest of them ending on a state snapshot on the device);
    ``matched_tokens``: how far the prompt agrees with stored text, token-exact (>= ``hit_tokens``,
    except when the last-token rule caps the hit); the token at ``matched_tokens`` is the first miss.
    """

    tokens: list[int] = field(repr=False)
    hit_tokens: int
    matched_tokens: int
    block_size: int
    pieces: list[str] | None = field(default=None, repr=False)
    pinned_tokens: int = 0  # the first this many tokens sit in pinned blocks (pin()): never evicted
    # what the cost model took from the lower tiers and left to recompute, and why (None: the device pool
    # alone served the lookup, or there are no tiers); see ``CallStats.fetch``
    fetch: dict | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.tokens)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / len(self.tokens) if self.tokens else 0.0

    @property
    def first_miss(self) -> int | None:
        """Index of the first token that differs from everything stored (None if all of it matched)."""
        return self.matched_tokens if self.matched_tokens < len(self.tokens) else None

    def text(self, start: int, end: int) -> str:
        if self.pieces is None:
            return " ".join(str(t) for t in self.tokens[start:end])
        return "".join(self.pieces[start:end])

    def __repr__(self) -> str:
        return f"HitReport({self})"

    def __str__(self) -> str:
        summary = f"reused {self.hit_tokens}/{len(self.tokens)} prompt tokens ({self.hit_rate:.0%})"
        if self.pinned_tokens:
            summary += f", the first {self.pinned_tokens} pinned"
        if self.fetch is not None:
            summary += f"; lower tiers: fetched {self.fetch['fetch'] or 'nothing'} ({self.fetch['reason']})"
        if self.first_miss is None:
            return summary + "; every token matches stored text"
        context = self.text(max(0, self.first_miss - 8), self.first_miss)
        after = self.text(self.first_miss, min(len(self.tokens), self.first_miss + 8))
        return f"{summary}; first miss at token {self.first_miss}: {context!r} | {after!r}"

    def _repr_html_(self) -> str:
        pinned = min(self.pinned_tokens, self.hit_tokens)
        spans = [
            ("#9be39a", "reused, pinned (never evicted)", 0, pinned),
            ("#c8f7c5", "reused", pinned, self.hit_tokens),
            (
                "#fff3b0",
                "matches stored text, not reused (partial block or last token)",
                self.hit_tokens,
                self.matched_tokens,
            ),
            (
                "#ffd6d6",
                "not in the store: computed",
                max(self.hit_tokens, self.matched_tokens),
                len(self.tokens),
            ),
        ]
        body = "".join(
            f"<span title='{title}' style='background:{color}'>{html.escape(self.text(start, end))}</span>"
            for color, title, start, end in spans
            if end > start
        )
        return f"<div><b>{html.escape(str(self))}</b><pre style='white-space:pre-wrap'>{body}</pre></div>"


def matched_length(children_tokens: list[tuple[int, ...]], tail: list[int]) -> int:
    """Longest common prefix of ``tail`` with any stored continuation block."""
    best = 0
    for stored in children_tokens:
        common = 0
        for a, b in zip(stored, tail):
            if a != b:
                break
            common += 1
        best = max(best, common)
    return best


def stored_prefix(
    store: BlockStore,
    namespace: str,
    tokens: list[int],
    hashes: Sequence[bytes],
    extra_keys: tuple[Hashable, ...],
    pieces: list[str] | None,
) -> HitReport:
    """The report for ``tokens`` against ``store``: its hit, and how far a stored chain matches beyond.

    Read-only: the references taken to look the chain up are released."""
    size = store.block_size
    found = store.match(namespace, tokens, hashes, len(hashes), extra_keys)
    blocks = found.blocks
    try:
        parent_ref = blocks[-1].ref if blocks else root_ref(namespace)
        with store.lock:
            children = [b.key[1] for b in store.pool.table.values() if b.key[0] == parent_ref]
            pinned = sum(1 for block in blocks if store.pins.is_pinned(block))
    finally:
        store.release(blocks)
    matched = len(blocks) * size + matched_length(children, tokens[len(blocks) * size :])
    usable = min(len(blocks), (len(tokens) - 1) // size)
    if store.snapshots is not None:  # a hybrid model restarts at the longest prefix with a state snapshot
        with store.lock:
            usable = next((n for n in range(usable, 0, -1) if store.snapshots.peek(blocks[n - 1])), 0)
    fetch = found.plans[0].as_dict() if found.plans else None
    return HitReport(tokens, usable * size, matched, size, pieces, pinned * size, fetch)
