"""The remote tier with tiny models against a real redis-server: hits from the server are exact and equal
the oracle, other models, weights, salts and key prefixes never hit, and a server killed mid-run costs
recomputation only."""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from support.assertions import assert_exact
from support.models import model_for, random_ids
from support.oracle import StoredPrefixes
from support.scenarios import STRATEGIES, cat, check_call, conversation, new_tokens, run_call

from hf_prefix_cache import PrefixCache
from hf_prefix_cache.tiers import TierWarning

GREEDY = STRATEGIES["greedy"]


def remote_cache(model, server, **options) -> PrefixCache:
    options.setdefault("remote_min_tokens", 0)
    return PrefixCache(model, block_size=4, num_blocks=64, remote=server.url, **options)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_a_new_store_hits_the_server_exactly_as_the_oracle_says(family, server):
    model = model_for(family)
    writer = remote_cache(model, server)
    oracle = StoredPrefixes(4)
    first = random_ids(30, 0)
    check_call(run_call(model, writer, GREEDY, first), oracle, GREEDY, torch.float32, "cold")
    turn = run_call(model, writer, GREEDY, cat(first[:, :22], new_tokens(10, 1)))
    check_call(turn, oracle, GREEDY, torch.float32, "second turn")
    assert writer.flush(30)

    reader = remote_cache(model, server)  # its own empty pool: every hit comes from the server
    follow = cat(conversation(turn.out.sequences, 0, 0, turn.width), new_tokens(5, 2))
    outcome = run_call(model, reader, GREEDY, follow)
    hit = check_call(outcome, oracle, GREEDY, torch.float32, "from the server")
    assert hit >= 28 and reader.last_call.hit_tokens_by_tier == {"remote": hit}
    assert reader.stats.hit_tokens_by_tier == {"device": 0, "remote": hit}
    assert reader.stats.tier_errors == 0 and writer.stats.tier_errors == 0
    assert reader.store.pool.num_referenced == 0


def test_negative_control_a_wrong_value_that_passed_verification_would_be_caught(server, monkeypatch):
    """The exactness check can fail: K/V noise slipped past decode() changes the output."""
    from hf_prefix_cache.tiers import remote as remote_module

    model = model_for("llama")
    prompt = random_ids(30, 3)
    writer = remote_cache(model, server)
    run_call(model, writer, GREEDY, prompt)
    assert writer.flush(30)
    real_decode = remote_module.decode

    def noisy_decode(*args):
        block = real_decode(*args)
        for tensor in block.keys:
            tensor.add_(torch.randn_like(tensor))
        return block

    monkeypatch.setattr(remote_module, "decode", noisy_decode)
    reader = remote_cache(model, server)
    outcome = run_call(model, reader, GREEDY, prompt)
    assert outcome.hit_tokens == 28
    with pytest.raises(AssertionError):
        assert_exact(outcome.ref, outcome.out)


@pytest.mark.parametrize(
    "other",
    [
        dict(family="qwen2"),  # another model with the same K/V shapes
        dict(seed=1),  # other weights
        dict(cache_salt="tenant-b"),
        dict(key_prefix="deployment-b"),
    ],
    ids=["other model", "other weights", "other salt", "other key_prefix"],
)
def test_other_models_weights_salts_and_key_prefixes_never_hit(server, other):
    base = dict(family="llama", seed=0, cache_salt=None, key_prefix=None)
    prompt = random_ids(41, 5)
    model = model_for("llama", seed=0)
    writer = remote_cache(model, server, cache_salt=None)
    run_call(model, writer, GREEDY, prompt)
    assert writer.flush(30)
    control = run_call(model, remote_cache(model, server), GREEDY, prompt)
    assert control.hit_tokens == 40, "positive control: the same set-up does hit"

    setup = {**base, **other}
    other_model = model_for(setup["family"], seed=setup["seed"])
    options = {k: setup[k] for k in ("cache_salt", "key_prefix") if setup[k] is not None}
    reader = remote_cache(other_model, server, **options)
    outcome = run_call(other_model, reader, GREEDY, prompt)
    assert_exact(outcome.ref, outcome.out)
    assert outcome.hit_tokens == 0 and reader.stats.tier_errors == 0
    assert reader.stats.tiers["remote"]["misses"] == 1


def test_a_server_killed_mid_run_costs_recomputation_only_and_hits_resume_after_restart(server):
    model = model_for("llama")
    cache = remote_cache(model, server, remote_timeout=0.2)
    tier = cache.store.tiers.tiers[0]
    tier.backoff_s = tier._delay = 0.2
    prompts = [random_ids(30 + 3 * i, 10 + i) for i in range(6)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for index, prompt in enumerate(prompts):
            if index == 2:
                server.kill()
            outcome = run_call(model, cache, GREEDY, prompt)
            assert_exact(outcome.ref, outcome.out, label=f"call {index}")
            cache.store.clear()  # an empty device pool: the next hit could only come from the server
    tier_warnings = [w for w in caught if issubclass(w.category, TierWarning)]
    assert len(tier_warnings) == 1 and "connection" in str(tier_warnings[0].message)
    assert cache.stats.tier_errors >= 1 and cache.stats.tiers["remote"]["error_kinds"]["connection"] >= 1
    assert cache.stats.hit_tokens_by_tier["remote"] == 0

    server.start()  # empty again: no persistence
    deadline = time.monotonic() + 30
    while not tier.available():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    run_call(model, cache, GREEDY, prompts[0])  # stores it on the restarted server
    assert cache.flush(30)
    cache.store.clear()
    again = run_call(model, cache, GREEDY, prompts[0])
    assert_exact(again.ref, again.out)
    assert again.hit_tokens == 28 and cache.last_call.hit_tokens_by_tier == {"remote": 28}
