"""A new tier is one module plus one registry line: a tier kind added to ``registry.KINDS`` is built
from ``PrefixCache`` arguments, written through, and serves exact hits; its arguments are checked like
the built-in ones."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
import torch
from support.models import random_ids, tiny_model

from hf_prefix_cache import CACHE_KWARG, PrefixCache
from hf_prefix_cache.tiers import BlockData, BlockRequest, Tier, registry
from hf_prefix_cache.tiers.kind import TierKind


class MemoTier(Tier):
    """The whole of a new tier: blocks in a dict, keyed like every tier by (namespace digest, hash)."""

    name = "memo"

    def __init__(self, label: str, limit: int | None = None):
        super().__init__()
        self.label, self.limit = label, limit
        self.entries: dict[tuple[bytes, bytes], BlockData] = {}
        self.lock = threading.Lock()

    def get(self, namespace: bytes, requests: Sequence[BlockRequest]) -> list[BlockData]:
        found = []
        with self.lock:
            for request in requests:
                block = self.entries.get((namespace, request.block_hash))
                if block is None or not block.matches(request):
                    break
                found.append(block)
        self.count(hits=len(found))
        return found

    def has(self, namespace: bytes, block_hash: bytes) -> bool:
        return (namespace, block_hash) in self.entries

    def put(self, namespace: bytes, blocks: Sequence[BlockData]) -> None:
        with self.lock:
            for block in blocks:
                self.entries[(namespace, block.block_hash)] = block
        self.count(puts=len(blocks))

    def delete(self, namespace: bytes, block_hash: bytes) -> None:
        with self.lock:
            self.entries.pop((namespace, block_hash), None)

    def clear(self, namespace: bytes | None = None) -> int:
        with self.lock:
            doomed = [key for key in self.entries if namespace is None or key[0] == namespace]
            for key in doomed:
                del self.entries[key]
        return len(doomed)


def build_memo(label, *, layouts, key=None, limit=None):
    return MemoTier(label, limit)


MEMO = TierKind("memo", "memo", "a label", build_memo, {"memo_limit": "limit"})


@pytest.fixture
def memo_registered(monkeypatch):
    monkeypatch.setattr(registry, "KINDS", [*registry.KINDS, MEMO])  # the one registry line


def generate(model, ids, cache=None):
    kwargs = {} if cache is None else {CACHE_KWARG: cache}
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=4,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        **kwargs,
    )


def test_a_registered_tier_is_built_from_its_arguments_and_serves_exact_hits(memo_registered):
    model = tiny_model("llama")
    cache = PrefixCache(model, block_size=4, num_blocks=64, memo="first", memo_limit=7)
    memo = cache.store.tiers.tiers[-1]
    assert isinstance(memo, MemoTier) and (memo.label, memo.limit) == ("first", 7)
    ids = random_ids(40, seed=3)
    reference = generate(model, ids)
    generate(model, ids, cache)  # stores, and writes through to the new tier
    assert len(memo.entries) >= 9
    cache.store.tiers.spill_device()  # the device pool forgets: the next hit comes from the new tier
    out = generate(model, ids, cache)
    assert cache.last_call.hit_tokens_by_tier.get("memo", 0) >= 36
    assert torch.equal(out.sequences, reference.sequences)
    for ours, theirs in zip(out.scores, reference.scores):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert "memo" in cache.stats.tiers


def test_the_negative_control_a_wrong_block_in_the_new_tier_changes_the_output(memo_registered):
    """The comparison above can fail: corrupt K/V served from the new tier give other scores."""
    model = tiny_model("llama")
    cache = PrefixCache(model, block_size=4, num_blocks=64, memo="first")
    memo = cache.store.tiers.tiers[-1]
    ids = random_ids(40, seed=3)
    reference = generate(model, ids)
    generate(model, ids, cache)
    for block in memo.entries.values():
        for tensor in (*block.keys, *block.values):
            tensor.mul_(-1.0)
    cache.store.tiers.spill_device()
    out = generate(model, ids, cache)
    assert cache.last_call.hit_tokens_by_tier.get("memo", 0) >= 36
    assert max((a - b).abs().max().item() for a, b in zip(out.scores, reference.scores)) > 1e-3


def test_a_registered_tiers_arguments_are_checked(memo_registered):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"memo_limit= needs memo= \(a label\).*also pass memo="):
        PrefixCache(model, block_size=4, num_blocks=8, memo_limit=3)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'memo_limt'.*memo_limit"):
        PrefixCache(model, block_size=4, num_blocks=8, memo="x", memo_limt=3)


def test_without_the_registry_line_the_arguments_are_unknown():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="unexpected keyword argument 'memo'"):
        PrefixCache(model, block_size=4, num_blocks=8, memo="first")
