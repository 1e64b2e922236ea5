"""Scoring calls (``cache.score``, ``continuation_logprobs``): logits equal to a plain forward without any
cache, on misses and hits, for batches whose rows hit differently, with the stored sequence hit next time."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from support.assertions import FP32_ATOL
from support.models import random_ids, tiny_model

from hf_prefix_cache import PrefixCache, PrefixCacheFallbackWarning
from hf_prefix_cache.scoring import positions_of

BLOCK = 4


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request):
    return tiny_model(request.param)


def plain(model, ids, mask=None, keep=1):
    """What the model computes without any cache (positions counted from each row's first real token)."""
    with torch.no_grad():
        if mask is None:
            return model(ids).logits[:, -keep:]
        return model(ids, attention_mask=mask, position_ids=positions_of(mask)).logits[:, -keep:]


def assert_close(actual, expected):
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= FP32_ATOL


@contextlib.contextmanager
def fed_lengths(model):
    """The number of tokens each forward of ``model`` is fed (a pre-hook): proves what was reused."""
    seen: list[int] = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        yield seen
    finally:
        handle.remove()


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(row.shape[-1] for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, width - row.shape[-1] :] = row.reshape(-1)
        mask[index, width - row.shape[-1] :] = 1
    return ids, mask


def test_miss_then_hit_equal_plain_forward(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    context = random_ids(22, seed=1)
    first = torch.cat([context, random_ids(3, seed=2)], dim=1)
    second = torch.cat([context, random_ids(5, seed=3)], dim=1)
    assert_close(cache.score(first, logits_to_keep=3), plain(model, first, keep=3))
    assert cache.last_call.hit_tokens == 0
    with fed_lengths(model) as seen:
        actual = cache.score(second, logits_to_keep=5)
    assert_close(actual, plain(model, second, keep=5))
    assert cache.last_call.hit_tokens == 20  # the context's full blocks
    assert seen[-1] == 27 - 20  # only the rest was fed


def test_hit_stays_below_the_requested_positions(model):
    """The whole sequence is stored; scoring it again must still compute every position asked for."""
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    ids = random_ids(24, seed=4)
    cache.score(ids)
    for keep, hit in ((1, 20), (4, 20), (5, 16), (9, 12), (24, 0)):
        actual = cache.score(ids, logits_to_keep=keep)
        assert_close(actual, plain(model, ids, keep=keep))
        assert cache.last_call.hit_tokens == hit


def test_every_position_with_logits_to_keep_zero(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    ids = random_ids(13, seed=5)
    cache.score(ids)
    assert_close(cache.score(ids, logits_to_keep=0), plain(model, ids, keep=13))
    assert cache.last_call.hit_tokens == 0


def test_batch_rows_with_different_hits_left_padded(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128)
    a, b, c = random_ids(26, seed=6), random_ids(17, seed=7), random_ids(21, seed=8)
    cache.score(a[:, :20])  # 16 reusable tokens of a
    cache.score(b[:, :14])  # 12 of b
    ids, mask = left_padded([a, b, c])  # pads 0, 9, 5; hits 24 (a stored again below), 16, 0
    assert_close(cache.score(ids, mask, logits_to_keep=2), plain(model, ids, mask, keep=2))
    # the common cut is min(pad + hit) = 5 + 0: row a gets its first 5 tokens, every row computes the rest
    assert cache.last_call.hit_tokens == 5
    ids2, mask2 = left_padded([a, b])
    with fed_lengths(model) as seen:
        actual = cache.score(ids2, mask2, logits_to_keep=1)
    assert_close(actual, plain(model, ids2, mask2))
    # a: 24 of 26 stored by the batch; b: its 16 full blocks stored; cut = min(0 + 24, 9 + 16) = 24
    assert cache.last_call.hit_tokens == 24 + (24 - 9)
    assert seen[-1] == 2
    # a padded row reuses what an unpadded call stored, and the reverse
    ids3, mask3 = left_padded([torch.cat([c, random_ids(6, seed=9)], dim=1), c[:, :9]])
    assert_close(cache.score(ids3, mask3, logits_to_keep=1), plain(model, ids3, mask3))
    # c was stored whole (20 reusable), c[:9] could use 8 after its 18 pads: the cut is min(20, 26)
    assert cache.last_call.hit_tokens == 20 + 2


def test_right_padding_is_refused_naming_the_fix(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    ids = random_ids(12, seed=10).repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    with pytest.raises(ValueError, match=r"(?i)left-pad.*one row per call"):
        cache.score(ids, mask)
    assert cache.store.pool.num_cached == 0 and cache._call is None
    assert_close(cache.score(ids[:1]), plain(model, ids[:1]))  # the cache still serves


def test_bad_logits_to_keep_is_refused(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    for keep in (-1, 13, 1.5):
        with pytest.raises(ValueError, match="logits_to_keep"):
            cache.score(random_ids(12, seed=11), logits_to_keep=keep)


def test_continuation_logprobs_equal_plain_and_reuse_the_context(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    context = random_ids(19, seed=12)[0].tolist()
    answers = [random_ids(n, seed=13 + n)[0].tolist() for n in (1, 3, 4)]
    for index, answer in enumerate(answers):
        result = cache.continuation_logprobs(context, answer)
        logits = plain(model, torch.tensor([context + answer[:-1]]), keep=len(answer))[0]
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(answer)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(result.logprobs), expected, atol=FP32_ATOL, rtol=0)
        assert abs(result.total - float(expected.sum())) <= FP32_ATOL * len(answer)
        assert result.greedy == bool((logits.argmax(-1) == torch.tensor(answer)).all())
        assert cache.last_call.hit_tokens == (0 if index == 0 else 16)
    greedy = plain(model, torch.tensor([context]))[0, -1].argmax().item()
    assert cache.continuation_logprobs(context, [greedy]).greedy


def test_negative_control_wrong_stored_kv_is_caught(model):
    """Corrupt the stored blocks: the comparison with the plain forward must then fail."""
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    ids = random_ids(21, seed=20)
    cache.score(ids)
    for layer in range(len(cache.store.layouts)):
        for pool in (cache.store.kv.keys[layer], cache.store.kv.values[layer]):
            pool.add_(torch.randn_like(pool))
    actual = cache.score(ids)
    assert cache.last_call.hit_tokens == 20
    with pytest.raises(AssertionError):
        assert_close(actual, plain(model, ids))


def test_training_mode_recomputes_and_stores_nothing(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    ids = random_ids(21, seed=21)
    model.train()
    try:
        with pytest.warns(PrefixCacheFallbackWarning, match="training mode"):
            actual = cache.score(ids)
    finally:
        model.eval()
    assert_close(actual, plain(model, ids))  # the tiny configs have no dropout
    assert cache.last_call.hit_tokens == 0 and cache.store.pool.num_cached == 0


def test_unsupported_model_is_a_plain_forward():
    model = tiny_model("llama")
    model.config.rope_parameters = {**model.config.rope_parameters, "rope_type": "dynamic", "factor": 2.0}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    assert cache.store is None and any("dynamic" in str(w.message) for w in caught)
    ids = random_ids(10, seed=22)
    assert_close(cache.score(ids, logits_to_keep=3), plain(model, ids, keep=3))
    assert cache.get_seq_length() == 0  # the plain forward left nothing in the cache's layers


def test_an_error_in_the_forward_leaks_no_reference(model):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64)
    ids = random_ids(21, seed=23)
    cache.score(ids)

    def fail(module, args, kwargs):
        raise RuntimeError("boom")

    handle = model.register_forward_pre_hook(fail, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            cache.score(ids)
    finally:
        handle.remove()
    assert cache._call is None
    assert all(block.ref_count == 0 for block in cache.store.pool.table.values())
    assert_close(cache.score(ids), plain(model, ids))
    assert cache.last_call.hit_tokens == 20
