"""Fuzzing the store's invariants: interleaved prepare / generate / commit / release / clear calls across views
and threads, with an exception injected at every step of match and commit.

After every operation: each block's reference count equals the number of prepared calls holding it, free
blocks are exactly the unreferenced ones, no block is handed out (evicted) while a view holds it, and every
generate() equals plain generate(). At the end of each example every stored block's K/V equal a
recomputation of its tokens with a ``DynamicCache``.
"""

from __future__ import annotations

import functools
import threading
from collections import Counter
from contextlib import ExitStack
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.exact import assert_same_output, greedy
from support.models import random_ids, tiny_model
from transformers import DynamicCache

from hf_prefix_cache import PrefixCache, hashing
from hf_prefix_cache.block_pool import BlockPool
from hf_prefix_cache.compat import CACHE_KWARG
from hf_prefix_cache.generation import _MARK
from hf_prefix_cache.kv_pool import KVPool
from hf_prefix_cache.store import BlockStore

BLOCK = 4
NEW_TOKENS = 3
VIEWS = 3
# The steps of match and commit an exception is injected into (each raises before it acts).
STEPS = [
    (BlockPool, "lookup"),
    (BlockPool, "touch"),
    (BlockPool, "allocate"),
    (BlockPool, "cache"),
    (KVPool, "write"),
    (KVPool, "read"),
]


class Injected(Exception):
    """The fault the fuzzer injects (or a KeyboardInterrupt, see ``Faults``)."""


class Faults:
    """Counts every step of match and commit; the ``countdown``-th one raises."""

    def __init__(self):
        self.lock = threading.Lock()
        self.countdown: int | None = None
        self.error: type[BaseException] = Injected
        self.views: list[PrefixCache] = []

    def step(self) -> None:
        with self.lock:
            if self.countdown is None:
                return
            self.countdown -= 1
            fire = self.countdown == 0
            if fire:
                self.countdown = None
        if fire:
            raise self.error("injected")

    def patches(self, stack: ExitStack) -> None:
        for owner, name in STEPS:
            original = getattr(owner, name)
            stack.enter_context(mock.patch.object(owner, name, self._wrap(original, name)))

    def _wrap(self, original, name):
        @functools.wraps(original)
        def faulty(pool, *args, **kwargs):
            self.step()
            result = original(pool, *args, **kwargs)
            if name == "allocate" and result is not None:
                assert result not in held_blocks(self.views), "a block was handed out while a view held it"
            return result

        return faulty


def held_blocks(views) -> list:
    return [block for view in views if view._call for row in view._call.rows for block in row.hits]


@functools.cache
def world():
    model = tiny_model("llama")
    stem = random_ids(16, seed=100)
    prompts = [stem[:, :9], stem, *(torch.cat([stem, random_ids(n, seed=101 + n)], 1) for n in (3, 7, 12))]
    return model, prompts


@functools.cache
def plain(prompt_index: int):
    model, prompts = world()
    return greedy(model, prompts[prompt_index], max_new_tokens=NEW_TOKENS)


def check_balance(store: BlockStore, views) -> None:
    held = Counter(id(block) for block in held_blocks(views))
    for block in store.pool.blocks:
        assert block.ref_count == held[id(block)], f"block {block.block_id}: {block.ref_count} refs"
        assert (block.block_id in store.pool.free) == (block.ref_count == 0)


def check_stored_kv(model, store: BlockStore, sequences: list[list[int]], namespace: str) -> None:
    """Every block a sequence hits holds the K/V a DynamicCache computes for those tokens."""
    for tokens in sequences:
        hashes = hashing.hash_blocks(hashing.root_hash(namespace), tokens, BLOCK)
        blocks = store.match(namespace, tokens, hashes, len(hashes)).blocks
        try:
            if not blocks:
                continue
            length = len(blocks) * BLOCK
            reference = DynamicCache(config=model.config)
            with torch.no_grad():
                model(torch.tensor([tokens[:length]]), **{CACHE_KWARG: reference})
            for layer in range(len(store.layouts)):
                keys, values = store.read(layer, blocks)
                torch.testing.assert_close(keys, reference.layers[layer].keys[0], atol=1e-4, rtol=0)
                torch.testing.assert_close(values, reference.layers[layer].values[0], atol=1e-4, rtol=0)
        finally:
            store.release(blocks)


view_index = st.integers(0, VIEWS - 1)
prompt_index = st.integers(0, 4)
fault = st.one_of(st.none(), st.tuples(st.integers(1, 24), st.sampled_from([Injected, KeyboardInterrupt])))
operation = st.one_of(
    st.tuples(st.just("generate"), view_index, prompt_index, fault),
    st.tuples(st.just("prepare"), view_index, prompt_index, fault),
    st.tuples(st.just("decode"), view_index),
    st.tuples(st.just("commit"), view_index, fault),
    st.tuples(st.just("release"), view_index),
    st.tuples(st.just("clear"), view_index),
    st.tuples(st.just("threads"), view_index, prompt_index, view_index, prompt_index),
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(operation, min_size=1, max_size=10), st.integers(4, 14))
def test_interleaved_calls_keep_the_store_sound(operations, num_blocks):
    model, prompts = world()
    first = PrefixCache(model, block_size=BLOCK, num_blocks=num_blocks)
    views = [first] + [PrefixCache(model, store=first.store) for _ in range(VIEWS - 1)]
    store, faults = first.store, Faults()
    faults.views = views
    original_generate = getattr(model.generate, _MARK)
    prepared: dict[int, int] = {}  # view -> prompt it prepared
    decoded: dict[int, torch.Tensor] = {}  # view -> sequences of its prepared call
    seen = [prompt[0].tolist() for prompt in prompts]

    def wrapped_generate(view: int, index: int) -> None:
        out = greedy(model, prompts[index], max_new_tokens=NEW_TOKENS, **{CACHE_KWARG: views[view]})
        assert_same_output(plain(index), out)
        seen.append(out.sequences[0].tolist())

    wrapped_generate(0, 4)  # a warm store: every later call has blocks to match, hold and evict
    with ExitStack() as stack:
        faults.patches(stack)
        for op in operations:
            kind, view = op[0], op[1]
            if len(op) > 2 and isinstance(op[-1], tuple):
                faults.countdown, faults.error = op[-1]
            try:
                if kind == "generate":
                    prepared.pop(view, None)
                    wrapped_generate(view, op[2])
                elif kind == "prepare":
                    prepared.pop(view, None)
                    decoded.pop(view, None)
                    views[view].prepare(prompts[op[2]])
                    prepared[view] = op[2]
                elif kind == "decode" and view in prepared and view not in decoded:
                    out = original_generate(
                        prompts[prepared[view]],
                        attention_mask=torch.ones_like(prompts[prepared[view]]),
                        max_new_tokens=NEW_TOKENS,
                        do_sample=False,
                        output_logits=True,
                        return_dict_in_generate=True,
                        **{CACHE_KWARG: views[view]},
                    )
                    assert_same_output(plain(prepared[view]), out)
                    decoded[view] = out.sequences
                    seen.append(out.sequences[0].tolist())
                elif kind == "commit":
                    prepared.pop(view, None)
                    views[view].commit(decoded.pop(view, None))
                elif kind == "release":
                    prepared.pop(view, None)
                    decoded.pop(view, None)
                    views[view].release()
                elif kind == "clear":
                    views[view].clear()
                    prepared.pop(view, None)
                    decoded.pop(view, None)
                elif kind == "threads":
                    run_on_threads(
                        views, prepared, decoded, [(op[1], op[2]), (op[3], op[4])], wrapped_generate
                    )
            except (Injected, KeyboardInterrupt):
                pass  # the op failed where the fault was injected; the store must still be sound
            finally:
                faults.countdown = None
            for index, candidate in enumerate(views):
                if candidate._call is None:
                    prepared.pop(index, None)
                    decoded.pop(index, None)
            check_balance(store, views)
    for view in views:
        view.release()
    assert store.pool.num_referenced == 0
    check_stored_kv(model, store, seen, first.namespace)


def run_on_threads(views, prepared, decoded, calls, wrapped_generate) -> None:
    """Two wrapped generate() calls at once: a view busy on another thread refuses with the fix."""
    errors: list[BaseException] = []
    busy = {
        view for view, _ in calls if views[view]._ownership.owner is not None
    }  # prepared on the main thread

    def work(view: int, index: int) -> None:
        try:
            wrapped_generate(view, index)
        except BaseException as error:
            errors.append(error)

    for view, _ in calls:
        if view not in busy:
            prepared.pop(view, None)
            decoded.pop(view, None)
    threads = [threading.Thread(target=work, args=call) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for error in errors:
        if not (isinstance(error, RuntimeError) and "own view" in str(error)):
            raise error
    refused_for_sure = sum(view in busy for view, _ in calls)
    same_free_view = calls[0][0] == calls[1][0] and calls[0][0] not in busy
    assert refused_for_sure <= len(errors) <= refused_for_sure + same_free_view


def test_a_failed_write_never_releases_the_callers_prefix():
    """extend_chain releases only the blocks it took itself; the caller's ``held`` stays referenced."""
    model, prompts = world()
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=16)
    greedy(model, prompts[1], max_new_tokens=1, **{CACHE_KWARG: cache})
    tokens = prompts[4][0].tolist()
    hashes = cache.block_hashes(tokens)
    held = cache.store.match(cache.namespace, tokens, hashes, len(hashes)).blocks
    assert len(held) == 4

    def broken(positions, block_ids):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.store.extend_chain(cache.namespace, tokens, hashes, held, broken)
    assert [block.ref_count for block in held] == [1] * 4
    cache.store.release(held)
    assert cache.store.pool.num_referenced == 0
