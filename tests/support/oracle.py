"""The oracle of what was stored: which block-aligned prefixes the store should hold after the calls so
far, and the check that a warm call reused exactly those (its hit, and what its prefill was fed).

A check is only worth something if it can fail: besides "same tokens, same logits", every warm call is
held to what it must have reused. ``StoredPrefixes`` replays which blocks earlier calls stored, the
cache's ``last_call.hit_tokens`` must equal the oracle's hit, and a forward pre-hook (``support.calls``)
proves that generate() fed the model only the tokens that were not loaded.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from hf_prefix_cache import PrefixCache
from support.calls import Outcome
from support.models import PAD


class StoredPrefixes:
    """Which block-aligned token prefixes the store should hold, replayed from the calls (no eviction)."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.prefixes: set[tuple[int, ...]] = set()

    def store(self, tokens: Sequence[int]) -> None:
        for end in range(self.block_size, len(tokens) + 1, self.block_size):
            self.prefixes.add(tuple(tokens[:end]))

    def hit(self, tokens: Sequence[int]) -> int:
        """Longest stored block-aligned prefix, never the whole prompt (the last token is computed)."""
        hit = 0
        for end in range(self.block_size, len(tokens), self.block_size):
            if tuple(tokens[:end]) not in self.prefixes:
                break
            hit = end
        return hit


def kv_tokens(
    prompt: list[int], generated: list[int], steps: int, stop_ids: Iterable[int], pad: int | None = PAD
) -> list[int]:
    """The tokens of one output row whose K/V went through the model and may be stored: the prompt, then
    the reply up to and including the first stop token, else without its trailing padding (a pad id the
    model generated mid-reply is text), minus the last sampled token (it is never fed)."""
    stop_ids = set(stop_ids)
    reply = list(generated)
    for index, token in enumerate(reply):
        if token in stop_ids:
            reply = reply[: index + 1]
            break
    else:
        while reply and reply[-1] == pad:
            reply.pop()
    return prompt + reply[: max(0, steps - 1)]


def expected_prefill(new_tokens: int, chunk: int | None) -> list[int]:
    if chunk is None:
        return [new_tokens]
    return [min(chunk, new_tokens - start) for start in range(0, new_tokens, chunk)]


def assert_reused(
    outcome: Outcome, oracle: StoredPrefixes, *, chunk: int | None = None, label: str = ""
) -> int:
    """hit_tokens equals what the stored prefixes allow, and the prefill was fed only the rest.

    Returns the common loaded length L (left-padded layout: L = min over rows of pad + hit)."""
    pads = [outcome.width - len(row) for row in outcome.rows]
    hits = [oracle.hit(row) for row in outcome.rows]
    loaded = min(p + h for p, h in zip(pads, hits))
    expected_hit = sum(max(0, loaded - p) for p in pads)
    assert outcome.hit_tokens == expected_hit, (
        f"{label}: hit_tokens {outcome.hit_tokens} != {expected_hit} expected (row hits {hits}, pads {pads})"
    )
    prefill = expected_prefill(outcome.width - loaded, chunk)
    assert outcome.forwards[: len(prefill)] == prefill, (
        f"{label}: forwards fed {outcome.forwards[: len(prefill) + 1]}, expected prefill {prefill} "
        f"(width {outcome.width} - loaded {loaded})"
    )
    return loaded


def record_stored(
    outcome: Outcome,
    oracle: StoredPrefixes,
    *,
    expand: int = 1,
    replies: bool = True,
    stop_ids: Iterable[int] = (2,),
) -> None:
    """Tell the oracle what this call stored: each row's prompt, plus (unless beams moved rows) the
    replies of its ``expand`` output rows."""
    sequences = outcome.out.sequences
    steps = sequences.shape[1] - outcome.width
    for index, prompt in enumerate(outcome.rows):
        oracle.store(prompt)
        if not replies:
            continue
        for source in range(index * expand, (index + 1) * expand):
            generated = sequences[source, outcome.width :].tolist()
            oracle.store(kv_tokens(prompt, generated, steps, stop_ids))


def stored_sequences(cache: PrefixCache) -> set[tuple[int, ...]]:
    """The full token prefix (from position 0) of every block in the store, rebuilt from block keys
    (``key = (parent_ref, tokens, extra_keys)``, parent_ref ``("block", id, generation)`` or ``("root", ns)``)."""
    pool = cache.store.pool
    by_ref = {block.ref: block for block in pool.table.values()}
    prefixes = set()
    for block in pool.table.values():
        tokens: list[int] = []
        node = block
        while node is not None:
            parent_ref, own, _ = node.key
            tokens[:0] = own
            node = by_ref.get(parent_ref) if parent_ref[0] == "block" else None
            if parent_ref[0] == "block" and node is None:
                tokens = []  # orphan (parent evicted): cannot be rebuilt, and can never hit
                break
        if tokens:
            prefixes.add(tuple(tokens))
    return prefixes
