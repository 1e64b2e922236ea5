"""Hybrid models (linear attention, Mamba2, short convolution beside attention): exact prefix reuse through
recurrent-state snapshots (issue 22). Every call is compared with generate() without any cache, token for
token and logit for logit; the hits are checked against the block-aligned ideal of a pure-attention model."""

from __future__ import annotations

import warnings

import pytest
import torch
from support.assertions import assert_exact
from support.calls import compare
from support.exact import fallback_warnings
from support.hybrids import FAMILIES, hybrid_model, shared_hybrid
from support.models import random_ids
from support.scenarios import cat, left_pad, new_tokens
from transformers import DynamicCache

from hf_prefix_cache import PrefixCache
from hf_prefix_cache.state_layers import has_state

pytestmark = pytest.mark.usefixtures("quiet_single_thread")

BLOCK = 8
GREEDY = dict(do_sample=False, max_new_tokens=6, pad_token_id=0)


def chat(model, cache, turns: int = 3, first: int = 21, user: int = 9, seed: int = 0, **kwargs):
    """A multi-turn chat: every prompt is the previous prompt and reply plus a user turn. Each call is
    compared with plain generate(); returns (hit tokens, block-aligned ideal hits) per turn."""
    ids = random_ids(first, seed)
    hits, ideal, stored = [], [], 0
    for turn in range(turns):
        predicted = cache.explain(ids).hit_tokens
        outcome = compare(model, cache, ids, torch.ones_like(ids), **{**GREEDY, **kwargs})
        assert_exact(outcome.ref, outcome.out, label=f"turn {turn}")
        assert outcome.hit_tokens == predicted, "explain() says what a hybrid model's call reuses"
        hits.append(outcome.hit_tokens)
        # a pure-attention model hits every stored full block short of the last prompt token
        ideal.append(min(stored, (ids.shape[1] - 1) // BLOCK * BLOCK))
        sequences = outcome.out.sequences
        stored = (sequences.shape[1] - 1) // BLOCK * BLOCK  # the last token of a reply is never computed
        ids = cat(sequences, new_tokens(user, seed + 10 + turn))
    return hits, ideal


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_is_exact_and_hits_the_whole_history(family):
    model = shared_hybrid(family)
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128)
    assert cache.fallback is None, cache.fallback
    assert any(has_state(layer) for layer in cache.layers)
    hits, ideal = chat(model, cache)
    assert hits[0] == 0 and hits[1:] == ideal[1:] and all(hits[1:]), (hits, ideal)
    stats = cache.stats
    assert stats.snapshot_hits == 2 and stats.snapshots >= 2 and stats.snapshot_bytes > 0
    assert cache.store.pool.num_referenced == 0


STRATEGIES = {
    "sample": dict(do_sample=True, top_k=20),
    "sample_n3": dict(do_sample=True, top_k=20, num_return_sequences=3),
    "beam3_n2": dict(num_beams=3, num_return_sequences=2),
    "beam_sample": dict(do_sample=True, num_beams=2),
}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("family", ["qwen3_5_text", "bamba", "falcon_h1"])
def test_decoding_strategies_are_exact_with_hits(family, strategy):
    model = shared_hybrid(family)
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128)
    first = random_ids(21, 3)
    kwargs = {**GREEDY, **STRATEGIES[strategy]}
    torch.manual_seed(0)
    cold = compare(model, cache, first, torch.ones_like(first), seed=1, **kwargs)
    assert_exact(cold.ref, cold.out, label="cold", num_beams=kwargs.get("num_beams"))
    follow = cat(first, new_tokens(13, 4))  # the same prompt, extended: hits on the prompt's snapshot
    again = compare(model, cache, follow, torch.ones_like(follow), seed=2, **kwargs)
    assert_exact(again.ref, again.out, label="warm", num_beams=kwargs.get("num_beams"))
    assert again.hit_tokens == 16  # the last boundary of the 21-token prompt (its prefill stopped there)


def test_rows_that_hit_at_different_snapshots_each_get_their_own_state():
    model = shared_hybrid("qwen3_5_text")
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128, snapshot_every=None)
    long, short = random_ids(37, 5)[0].tolist(), random_ids(19, 6)[0].tolist()
    for prompt in (long, short):  # snapshots at 32 and at 16
        ids = torch.tensor([prompt])
        compare(model, cache, ids, torch.ones_like(ids), **GREEDY)
    rows = [long + new_tokens(5, 7), short + new_tokens(11, 8), new_tokens(14, 9)]
    ids, mask = left_pad(rows)
    outcome = compare(model, cache, ids, mask, **GREEDY)
    assert_exact(outcome.ref, outcome.out, label="batch")
    assert outcome.hit_tokens == 32 + 16 + 0
    assert cache.store.pool.num_referenced == 0


def test_a_snapshot_one_token_off_fails_the_comparison():
    """Negative control: the comparison above catches a state that is not the one of its position."""
    model = shared_hybrid("qwen3_5_text")
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128, snapshot_every=None)
    prompt = random_ids(21, 11)
    compare(model, cache, prompt, torch.ones_like(prompt), max_new_tokens=1, pad_token_id=0)
    [snapshot] = [s for s in cache.store.snapshots.entries.values() if s.tokens == 16]
    wrong = DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt[:, :17], past_key_values=wrong, use_cache=True)  # one token past the boundary
    for index, layer in enumerate(wrong.layers):
        if snapshot.layers[index]:
            snapshot.layers[index] = {0: (layer.conv_states[0].clone(), layer.recurrent_states[0].clone())}
    follow = cat(prompt, new_tokens(6, 12))
    outcome = compare(model, cache, follow, torch.ones_like(follow), **GREEDY)
    assert outcome.hit_tokens == 16
    with pytest.raises(AssertionError):
        assert_exact(outcome.ref, outcome.out, label="state one token off")


def test_snapshots_of_another_model_sharing_the_store_are_never_restored():
    """A snapshot holds for its chain in its namespace only: another model's view of the same store,
    holding blocks with the same tokens, restarts from scratch rather than from the other model's state."""
    first, second = hybrid_model("qwen3_5_text", seed=0), hybrid_model("qwen3_5_text", seed=1)
    cache = PrefixCache(first, block_size=BLOCK, num_blocks=128, snapshot_every=None)
    other = PrefixCache(second, store=cache.store, snapshot_every=None)
    shared = random_ids(16, 13)[0].tolist()
    prompt = torch.tensor([shared + new_tokens(5, 14)])  # the first model: a snapshot at 16
    compare(first, cache, prompt, torch.ones_like(prompt), max_new_tokens=1, pad_token_id=0)
    longer = torch.tensor([shared + new_tokens(24, 15)])  # the second model: blocks 0-4, snapshot at 32
    compare(second, other, longer, torch.ones_like(longer), max_new_tokens=1, pad_token_id=0)
    follow = torch.tensor(
        [shared + new_tokens(7, 16)]
    )  # its blocks hit to 16, where only the first has a state
    outcome = compare(second, other, follow, torch.ones_like(follow), **GREEDY)
    assert_exact(outcome.ref, outcome.out, label="other model")
    assert outcome.hit_tokens == 0 and other.stats.snapshot_hits == 0


def test_snapshot_memory_is_bounded_and_evicts_least_recently_used():
    model = shared_hybrid("lfm2")
    probe = PrefixCache(model, block_size=BLOCK, num_blocks=128)
    compare(model, probe, random_ids(21, 17), max_new_tokens=1, pad_token_id=0)
    one = max(s.nbytes for s in probe.store.snapshots.entries.values())
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128, snapshot_memory=2 * one, snapshot_every=1)
    ids = random_ids(45, 18)  # wants 5 snapshots (every block): only the last 2 fit
    compare(model, cache, ids, torch.ones_like(ids), max_new_tokens=1, pad_token_id=0)
    snapshots = cache.store.snapshots
    assert len(snapshots) == 2 and snapshots.used_bytes <= 2 * one and snapshots.evictions >= 3
    assert sorted(s.tokens for s in snapshots.entries.values()) == [32, 40]


def test_ladder_snapshots_let_a_shared_prefix_hit_under_other_turns():
    model = shared_hybrid("bamba")
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128, snapshot_every=2)
    system = random_ids(34, 19)[0].tolist()
    first = torch.tensor([system + new_tokens(12, 20)])
    compare(model, cache, first, torch.ones_like(first), max_new_tokens=1, pad_token_id=0)
    other = torch.tensor([system + new_tokens(9, 21)])  # shares 34 tokens: the ladder has a state at 32
    outcome = compare(model, cache, other, torch.ones_like(other), **GREEDY)
    assert_exact(outcome.ref, outcome.out, label="ladder")
    assert outcome.hit_tokens == 32


def test_scoring_a_hybrid_model_reuses_the_prefix_exactly():
    model = shared_hybrid("granitemoehybrid")
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128)
    context = random_ids(29, 22)
    cache.score(context)
    ids = cat(context, new_tokens(6, 23))
    logits = cache.score(ids, logits_to_keep=6)
    with torch.no_grad():
        plain = model(ids).logits[:, -6:]
    assert cache.last_call.hit_tokens == 24
    assert (logits - plain).abs().max() <= 1e-4


def test_jamba_is_refused_up_front_and_recomputed_exactly():
    model = hybrid_model("jamba")
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    assert cache.store is None and "Mamba1" in cache.fallback and len(fallback_warnings(records)) == 1
    ids = random_ids(21, 24)
    outcome = compare(model, cache, ids, **GREEDY)
    assert_exact(outcome.ref, outcome.out)
    assert outcome.hit_tokens == 0


# -- tiers: snapshots travel with their blocks ---------------------------------------------------------------
def _tier_chat(model, cache, first, second):
    """Store ``first``; push it out of a 4-block pool with ``second``; then extend ``first``: its blocks
    and its state at 32 tokens come back from the tier."""
    for ids in (first, second):
        compare(model, cache, ids, torch.ones_like(ids), max_new_tokens=4, pad_token_id=0)
        cache.flush()
    follow = cat(first, new_tokens(5, 30))
    outcome = compare(model, cache, follow, torch.ones_like(follow), **GREEDY)
    assert_exact(outcome.ref, outcome.out, label="from a tier")
    return outcome


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_snapshots_are_kept_by_the_tiers_and_promoted_back(tier, tmp_path):
    model = shared_hybrid("qwen3_5_text")
    options = {"host_memory": "1MiB"} if tier == "host" else {"disk": tmp_path}
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=4, snapshot_memory="64KiB", **options)
    outcome = _tier_chat(model, cache, random_ids(40, 31), random_ids(40, 32))
    assert outcome.hit_tokens == 32 and cache.last_call.hit_tokens_by_tier == {tier: 32}
    assert cache.stats.tier_errors == 0 and cache.store.pool.num_referenced == 0


def test_a_new_process_resumes_from_the_disk_snapshots(tmp_path):
    model = shared_hybrid("bamba")
    first = PrefixCache(model, block_size=BLOCK, num_blocks=64, disk=tmp_path)
    prompt = random_ids(37, 33)
    turn = compare(model, first, prompt, torch.ones_like(prompt), max_new_tokens=6, pad_token_id=0)
    first.flush()
    assert any(path.suffix == ".kvs" for path in tmp_path.rglob("*"))
    restarted = PrefixCache(model, block_size=BLOCK, num_blocks=64, disk=tmp_path)  # an empty device store
    follow = cat(turn.out.sequences, new_tokens(9, 34))  # the state at the reply's end (40) comes from disk
    outcome = compare(model, restarted, follow, torch.ones_like(follow), **GREEDY)
    assert_exact(outcome.ref, outcome.out, label="restart")
    assert outcome.hit_tokens == 40 and restarted.last_call.hit_tokens_by_tier == {"disk": 40}


def test_a_tampered_state_entry_is_a_counted_miss_never_a_wrong_state(tmp_path):
    model = shared_hybrid("bamba")
    first = PrefixCache(model, block_size=BLOCK, num_blocks=64, disk=tmp_path, snapshot_every=None)
    prompt = random_ids(37, 35)
    compare(model, first, prompt, torch.ones_like(prompt), max_new_tokens=6, pad_token_id=0)
    first.flush()
    for path in tmp_path.rglob("*.kvs"):  # flip one byte of every state's payload
        data = bytearray(path.read_bytes())
        data[-7] ^= 0x40
        path.write_bytes(bytes(data))
    restarted = PrefixCache(model, block_size=BLOCK, num_blocks=64, disk=tmp_path, snapshot_every=None)
    follow = cat(prompt, new_tokens(9, 36))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = compare(model, restarted, follow, torch.ones_like(follow), **GREEDY)
    assert_exact(outcome.ref, outcome.out, label="tampered")
    assert outcome.hit_tokens == 0 and restarted.stats.tiers["disk"]["error_kinds"].get("checksum", 0) >= 1


def test_a_second_process_resumes_from_the_remote_snapshots(server):
    model = shared_hybrid("falcon_h1")
    first = PrefixCache(model, block_size=BLOCK, num_blocks=64, remote=server.url, remote_min_tokens=0)
    prompt = random_ids(37, 37)
    turn = compare(model, first, prompt, torch.ones_like(prompt), max_new_tokens=6, pad_token_id=0)
    first.flush()
    other = PrefixCache(model, block_size=BLOCK, num_blocks=64, remote=server.url, remote_min_tokens=0)
    follow = cat(turn.out.sequences, new_tokens(9, 38))
    outcome = compare(model, other, follow, torch.ones_like(follow), **GREEDY)
    assert_exact(outcome.ref, outcome.out, label="remote")
    assert outcome.hit_tokens == 40 and other.last_call.hit_tokens_by_tier == {"remote": 40}
    assert any(key.endswith(b":state") for key in server.client().keys("*"))


def test_state_and_block_entries_are_never_read_as_each_other():
    from hf_prefix_cache.tiers.entry import EntryError, decode, encode
    from hf_prefix_cache.tiers.state_entry import decode_state, encode_state

    model = shared_hybrid("lfm2")
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64, snapshot_every=None)
    prompt = random_ids(21, 39)
    compare(model, cache, prompt, max_new_tokens=1, pad_token_id=0)
    store = cache.store
    [snapshot] = [s for s in store.snapshots.entries.values() if s.tokens == 16]
    block = next(b for b in store.pool.blocks if b.ref == snapshot.block_ref)
    namespace = bytes(16)
    state = encode_state(namespace, block.block_hash, 16, snapshot.layers)
    tokens, layers = decode_state(state, namespace, block.block_hash, store.layouts)
    assert tokens == 16 and all(
        torch.equal(a[i][part], b[i][part])
        for a, b in zip(layers, snapshot.layers)
        if a
        for i in a
        for part in (0, 1)
        if a[i][part] is not None
    )
    with pytest.raises(EntryError, match="identity"):
        decode_state(state, namespace, bytes(16), store.layouts)
    from hf_prefix_cache.tiers.base import BlockData, BlockRequest

    keys, values = zip(*(store.kv.read(i, [block.block_id]) for i in range(len(store.layouts))))
    data = BlockData(block.block_hash, bytes(16), tuple(block.key[1]), list(keys), list(values))
    entry = encode(namespace, data)
    with pytest.raises(EntryError, match="magic"):
        decode_state(entry, namespace, block.block_hash, store.layouts)
    with pytest.raises(EntryError, match="magic"):
        decode(
            state, namespace, BlockRequest(block.block_hash, bytes(16), tuple(block.key[1])), store.layouts
        )


def test_explain_reports_the_hit_up_to_the_longest_snapshot():
    model = shared_hybrid("olmo_hybrid")
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64, snapshot_every=2)
    prompt = random_ids(37, 40)
    compare(model, cache, prompt, torch.ones_like(prompt), max_new_tokens=1, pad_token_id=0)
    follow = cat(prompt, new_tokens(4, 41))
    assert cache.explain(follow).hit_tokens == 32
    with cache.store.lock:  # drop the state at 32: the blocks still match, the ladder's state at 16 remains
        del cache.store.snapshots.entries[cache.store.pool.blocks[3].block_hash]
    report = cache.explain(follow)
    assert report.hit_tokens == 16 and report.matched_tokens == 32
    outcome = compare(model, cache, follow, torch.ones_like(follow), **GREEDY)
    assert_exact(outcome.ref, outcome.out, label="explained")
    assert outcome.hit_tokens == 16


def test_a_batch_row_with_a_single_token_starts_fresh_beside_rows_that_hit():
    model = shared_hybrid("nemotron_h")
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128)
    long = random_ids(29, 42)[0].tolist()
    compare(model, cache, torch.tensor([long]), max_new_tokens=1, pad_token_id=0)
    ids, mask = left_pad([long + new_tokens(3, 43), new_tokens(1, 44)])
    outcome = compare(model, cache, ids, mask, **GREEDY)
    assert_exact(outcome.ref, outcome.out, label="one-token row")
    assert outcome.hit_tokens == 24 and cache.store.pool.num_referenced == 0


def test_training_mode_on_a_hybrid_model_recomputes_and_stores_nothing():
    model = hybrid_model("qwen3_5_text")
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128)
    prompt = random_ids(29, 45)
    compare(model, cache, prompt, max_new_tokens=1, pad_token_id=0)
    stored = (cache.stats.stored_blocks, cache.stats.snapshots)
    model.train()  # dropout is 0 in these configs, but K/V in training mode are not what eval mode computes
    try:
        follow = cat(prompt, new_tokens(6, 46))
        outcome = compare(model, cache, follow, torch.ones_like(follow), **GREEDY)
    finally:
        model.eval()
    assert_exact(outcome.ref, outcome.out, label="training mode")
    assert outcome.hit_tokens == 0 and (cache.stats.stored_blocks, cache.stats.snapshots) == stored


@pytest.mark.parametrize("family", ["qwen3_5_text", "bamba", "lfm2"])
def test_bf16_hybrids_are_exact_under_the_low_precision_rule(family):
    model = hybrid_model(family, dtype=torch.bfloat16)
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128)
    ids = random_ids(21, 47)
    for turn in range(3):
        outcome = compare(model, cache, ids, torch.ones_like(ids), **GREEDY)
        assert_exact(outcome.ref, outcome.out, torch.bfloat16, label=f"bf16 turn {turn}")
        ids = cat(outcome.out.sequences, new_tokens(9, 48 + turn))
    assert outcome.hit_tokens > 0 and cache.stats.snapshot_hits == 2
