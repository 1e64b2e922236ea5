"""The store defends itself: misuse gets a clear error or an exact fallback, and never poisons the store.

Each case of issue 12 ends the same way: a correct call on a FRESH view of the same store equals plain
``generate()`` while hitting the blocks the misused call touched (so poisoned K/V would show), and no block
is left referenced.
"""

from __future__ import annotations

import pickle
import threading
import warnings

import pytest
import torch
from support.exact import assert_same_output, assert_store_not_poisoned, fallback_warnings, greedy, run
from support.models import BOS, random_ids, tiny_model
from transformers import StoppingCriteria, StoppingCriteriaList

import hf_prefix_cache
from hf_prefix_cache import PrefixCache, PrefixCacheFallbackWarning, parse_bytes
from hf_prefix_cache.compat import CACHE_KWARG

BLOCK = 4


class Hold(StoppingCriteria):
    """Parks generate() at its first step until ``leave`` is set."""

    def __init__(self):
        self.inside, self.leave = threading.Event(), threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        self.inside.set()
        assert self.leave.wait(30)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


# -- case 1: one PrefixCache on two threads -----------------------------------------------------------
def test_case1_a_second_thread_on_a_busy_cache_gets_the_fix(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    prompt = random_ids(30, seed=31)
    run(model, cache, prompt)
    hold, result = Hold(), {}

    def first():
        result["out"] = run(model, cache, prompt, stopping_criteria=StoppingCriteriaList([hold]))

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert hold.inside.wait(30)
        held = cache.store.pool.num_referenced
        assert held > 0
        with pytest.raises(RuntimeError, match=r"own view, PrefixCache\(model, store=cache.store\)"):
            run(model, cache, random_ids(30, seed=32))
        with pytest.raises(RuntimeError, match="own view"):
            cache.release()  # would drop the other thread's references
        with pytest.raises(RuntimeError, match="own view"), torch.no_grad():
            model(prompt, **{CACHE_KWARG: cache})  # would write into the other thread's layers
        assert cache.store.pool.num_referenced == held
    finally:
        hold.leave.set()
        thread.join()
    assert_same_output(greedy(model, prompt), result["out"])
    assert cache.store.pool.num_referenced == 0
    assert_store_not_poisoned(model, cache.store, prompt)
    run(model, cache, prompt)  # the cache itself is free again
    assert cache.last_call.hit_tokens == 28


# -- case 2: a cache made for model A passed to model B's generate() ------------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_case2_a_cache_of_another_model_is_refused(model, family):
    other = tiny_model(family, seed=1)  # same class and config (llama) or another architecture (gemma3)
    PrefixCache(other, block_size=BLOCK, num_blocks=8)  # other.generate is wrapped too
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    prompt = random_ids(30, seed=33)
    run(model, cache, prompt)
    stored = cache.store.pool.num_cached
    for _ in range(2):
        with pytest.raises(
            ValueError, match=r"made for another model.*whose generate\(\) got it.*PrefixCache\(model\)"
        ):
            run(other, cache, prompt)
    assert cache.store.pool.num_cached == stored and cache.store.pool.num_referenced == 0
    assert_store_not_poisoned(model, cache.store, prompt)


def test_case2_without_the_wrapper_kv_of_another_model_are_refused(model):
    """The store-side check: a prepared call whose K/V come from modules outside the cache's model."""
    other = tiny_model("llama", seed=1)
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64, install=False)
    prompt = random_ids(30, seed=34)
    cache.prepare(prompt)
    run(model, cache, prompt)
    cache.commit()
    cache.prepare(prompt)
    with pytest.raises(ValueError, match="made for another model"):
        run(other, cache, prompt)  # other.generate is not wrapped: nothing but the cache can notice
    cache.commit()
    assert cache.store.pool.num_referenced == 0 and cache.stats.refused_calls == 0
    assert_store_not_poisoned(model, cache.store, prompt)


# -- case 3: use_cache=False -----------------------------------------------------------------------------
def test_case3_use_cache_false_falls_back_exactly_and_stores_nothing(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    prompt = random_ids(30, seed=35)
    run(model, cache, prompt)
    stored = cache.store.pool.num_cached
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        outputs = [run(model, cache, prompt, use_cache=False) for _ in range(2)]
    assert len(fallback_warnings(record)) == 1 and "use_cache=False" in str(fallback_warnings(record)[0])
    expected = greedy(model, prompt, use_cache=False)
    for actual in outputs:
        assert_same_output(expected, actual)
    assert torch.equal(expected.sequences, greedy(model, prompt).sequences)
    assert cache.last_call.hit_tokens == 0 and cache.last_call.computed_tokens == 30
    assert cache.store.pool.num_cached == stored and cache.store.pool.num_referenced == 0
    next_turn = torch.cat([outputs[0].sequences, random_ids(6, seed=36)], dim=1)
    assert_store_not_poisoned(model, cache.store, next_turn)


def test_case3_prepared_call_with_use_cache_false_is_refused_by_the_store(model):
    """Without the wrapper the store itself sees slots that prompt + reply do not imply, and stores nothing."""
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64, install=False)
    prompt = random_ids(30, seed=37)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            cache.prepare(prompt)
            out = run(model, cache, prompt, use_cache=False)
            cache.commit(out.sequences)
            assert cache.last_call.refused is not None and "imply" in cache.last_call.refused
    assert len(fallback_warnings(record)) == 1  # warned once, counted every time
    assert cache.stats.refused_calls == 2 and cache.store.pool.num_cached == 0
    assert cache.store.pool.num_referenced == 0
    cache.prepare(prompt)
    good = run(model, cache, prompt)
    cache.commit(good.sequences)
    assert cache.store.pool.num_cached > 0
    assert_store_not_poisoned(model, cache.store, torch.cat([good.sequences, random_ids(5, seed=38)], 1))


# -- case 4: an exception while commit copies K/V into the pool --------------------------------------
@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_case4_interrupt_in_commit_keeps_other_references_and_surfaces(model, monkeypatch, error):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    prompt = random_ids(30, seed=39)
    run(model, cache, prompt)
    longer = torch.cat([prompt, random_ids(12, seed=40)], dim=1)
    holder = PrefixCache(model, store=cache.store)  # a second view holding the same prefix
    holder.prepare(longer)
    held = [block for row in holder._call.rows for block in row.hits]
    counts = [block.ref_count for block in held]
    assert len(held) == 7

    def broken(*args, **kwargs):
        raise error("interrupted while copying K/V")

    monkeypatch.setattr(cache.store.kv, "write", broken)
    with pytest.raises(error, match="interrupted while copying"):
        run(model, cache, longer)
    monkeypatch.undo()
    assert [block.ref_count for block in held] == counts  # the other view's references are untouched
    assert all(block.block_hash is not None for block in held)  # and its blocks were not freed
    holder.release()
    assert cache.store.pool.num_referenced == 0
    assert_store_not_poisoned(model, cache.store, longer)


# -- case 5: generate() after uninstall, with a PrefixCache still passed ------------------------------
def test_case5_unwrapped_generate_is_refused_and_carries_nothing(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    prompt = random_ids(30, seed=41)
    run(model, cache, prompt)
    assert hf_prefix_cache.uninstall(model)
    for seed in (42, 43):  # twice: the second call must not see anything of the first
        with pytest.raises(RuntimeError, match=r"hf_prefix_cache.install\(model\)"):
            run(model, cache, random_ids(30, seed=seed))
        assert cache.get_seq_length() == 0
    assert cache.store.pool.num_referenced == 0
    assert_store_not_poisoned(model, cache.store, prompt)  # a fresh view installs the wrapper again


def test_case5_install_false_without_prepare_is_refused(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64, install=False)
    with pytest.raises(RuntimeError, match=r"cache.prepare\(input_ids"):
        run(model, cache, random_ids(12, seed=44))
    assert cache.get_seq_length() == 0


# -- the invariants, on the store side -----------------------------------------------------------------
def test_commit_refuses_sequences_that_disagree_with_the_captured_slots(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64, install=False)
    prompt = random_ids(30, seed=45)
    cache.prepare(prompt)
    out = run(model, cache, prompt, max_new_tokens=8)
    with pytest.warns(PrefixCacheFallbackWarning, match="stored nothing"):
        cache.commit(out.sequences[:, :-3])  # a reply shorter than what was computed
    assert cache.stats.refused_calls == 1 and cache.store.pool.num_cached == 0
    assert cache.store.pool.num_referenced == 0 and cache.get_seq_length() == 0


def test_weights_changed_during_a_call_store_nothing(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64, install=False)
    prompt = random_ids(30, seed=46)
    cache.prepare(prompt)
    out = run(model, cache, prompt)
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight.mul_(1.1)
    with pytest.warns(PrefixCacheFallbackWarning, match="changed during the call"):
        cache.commit(out.sequences)
    assert cache.store.pool.num_cached == 0 and cache.stats.refused_calls == 1


def test_state_never_carries_into_the_next_call(model):
    """A forward() leaves slots in the layers (DynamicCache behaviour); the next generate() starts clean."""
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    with torch.no_grad():
        model(random_ids(9, seed=47), **{CACHE_KWARG: cache})
    assert cache.get_seq_length() == 9
    prompt = random_ids(20, seed=48)
    assert_same_output(greedy(model, prompt), run(model, cache, prompt))
    assert cache.get_seq_length() == 0 and cache.store.pool.num_referenced == 0


# -- input validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "fix"),
    [
        (dict(block_size=0), ValueError, "block_size=16"),
        (dict(block_size=-1), ValueError, "block_size=16"),
        (dict(block_size=True), TypeError, "block_size=16"),
        (dict(block_size="16"), TypeError, "block_size=16"),
        (dict(block_size=16.5), TypeError, "block_size=16"),
        (dict(num_blocks="20"), TypeError, "num_blocks=1024"),
        (dict(num_blocks=2.5), TypeError, "num_blocks=1024"),
        (dict(num_blocks=0), ValueError, "num_blocks=1024"),
        (dict(max_memory=float("nan")), ValueError, "finite"),
        (dict(max_memory=float("inf")), ValueError, "finite"),
        (dict(max_memory="1e400"), ValueError, "finite"),
        (dict(max_memory=True), TypeError, "512MiB"),
        (dict(max_memory="1 TB"), ValueError, "smaller max_memory"),
        (dict(store="x"), TypeError, "store=cache.store"),
        (dict(extra_keys="lora"), TypeError, r"extra_keys=\('lora',\)"),
        (dict(extra_keys=([1],)), TypeError, "hashable"),
    ],
)
def test_bad_arguments_are_refused_with_the_fix(model, kwargs, error, fix):
    with pytest.raises(error, match=fix):
        PrefixCache(model, **kwargs)


def test_a_shared_store_refuses_a_size(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=8)
    for size in (dict(num_blocks=20), dict(max_memory="1MiB")):
        with pytest.raises(ValueError, match="size is fixed"):
            PrefixCache(model, store=cache.store, **size)
    with pytest.raises(TypeError, match=r"pass its \.store"):
        PrefixCache(model, store=cache)


def test_sizes_in_scientific_notation_and_exact_ints(model):
    assert parse_bytes("1.5e3") == 1500 and parse_bytes("2e3 KiB") == 2000 * 1024
    assert PrefixCache(model, block_size=2, num_blocks=3).stats.num_blocks == 3
    assert PrefixCache(model, extra_keys=["lora"], num_blocks=3).extra_keys == ("lora",)


def test_the_store_refuses_pickling_with_the_fix(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=8)
    with pytest.raises(TypeError, match=r"store=cache.store"):
        pickle.dumps(cache.store)


class BosTokenizer:
    """Token ids are the characters' codes; like most tokenizers it adds BOS unless told not to."""

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + ord(c) % 90 for c in text]
        return {"input_ids": [BOS, *ids] if add_special_tokens else ids}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_explain_text_reads_special_tokens_the_way_generate_saw_them(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    tokenizer, text = BosTokenizer(), "the same long system prompt!"
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    run(model, cache, ids)
    report = cache.explain(text, tokenizer)
    assert report.hit_tokens == (ids.shape[1] - 1) // BLOCK * BLOCK and report.first_miss is None
    without_bos = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    run(model, cache, without_bos)  # now the reading without BOS is stored too: it matches as well
    assert cache.explain(text, tokenizer).hit_tokens == report.hit_tokens


def test_explain_refuses_batches_and_reads_empty_prompts(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    report = cache.explain([])
    assert report.hit_tokens == 0 and str(report).startswith("reused 0/0")
    assert cache.explain("", BosTokenizer()).hit_tokens == 0
    with pytest.raises(ValueError, match=r"one prompt.*input_ids\[i\]"):
        cache.explain(torch.cat([random_ids(8, seed=49), random_ids(8, seed=50)]))
