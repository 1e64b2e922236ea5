"""Only calls whose K/V are a function of their token ids are served (issue 19, items 1 and 2).

A call whose forward gets something besides the token ids that changes K/V (embeddings, positions, a custom
mask, any model kwarg outside the wrapper's allow-list) falls back to plain generate(); outputs the reused
prefix would lack (hidden states, attentions) fall back too; generate() re-entered from inside a call on the
same cache is refused like a second thread; and commit() refuses sequences of another call. Each case ends
as in tests/test_misuse.py: exact output, and a fresh view's correct call that hits the touched blocks.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from support.exact import assert_same_output, assert_store_not_poisoned, fallback_warnings, greedy, run
from support.models import PAD, random_ids, tiny_model
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from hf_prefix_cache import PrefixCache, PrefixCacheFallbackWarning
from hf_prefix_cache.compat import CACHE_KWARG

BLOCK = 4


def stored_prompt(model, length: int = 30, seed: int = 60):
    """A cache whose store holds ``prompt`` (7 blocks of 4 for 30 tokens)."""
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128)
    prompt = random_ids(length, seed=seed)
    run(model, cache, prompt)
    assert cache.store.pool.num_cached > 0
    return cache, prompt


def longer(prompt: torch.Tensor, extra: int, seed: int) -> torch.Tensor:
    return torch.cat([prompt, random_ids(extra, seed=seed)], dim=1)


def recorded(call):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = call()
    return result, fallback_warnings(record)


def soft_prompt(model, ids: torch.Tensor) -> torch.Tensor:
    """Embeddings that differ from the tokens' own (a soft prompt / steering vector on every position)."""
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    return embeds + 0.5 * torch.randn(embeds.shape, generator=torch.Generator().manual_seed(7))


# -- inputs_embeds beside input_ids ------------------------------------------------------------------------
def test_inputs_embeds_beside_input_ids_fall_back_instead_of_hitting_the_ids_blocks(model):
    cache, prompt = stored_prompt(model)
    embeds = soft_prompt(model, prompt)
    expected = greedy(model, prompt, inputs_embeds=embeds)
    outputs, messages = recorded(lambda: [run(model, cache, prompt, inputs_embeds=embeds) for _ in range(2)])
    for actual in outputs:
        assert_same_output(expected, actual)
    assert len(messages) == 1 and "inputs_embeds" in str(messages[0].message)
    assert cache.last_call.hit_tokens == 0 and cache.store.pool.num_referenced == 0


def test_inputs_embeds_beside_input_ids_store_nothing_under_the_ids(model):
    cache, prompt = stored_prompt(model, seed=61)
    stored = cache.store.pool.num_cached
    follow_up = longer(prompt, 14, seed=62)  # its last blocks are not stored yet
    embeds = soft_prompt(model, follow_up)
    recorded(lambda: run(model, cache, follow_up, inputs_embeds=embeds))
    assert cache.store.pool.num_cached == stored
    assert_store_not_poisoned(model, cache.store, follow_up)


# -- position_ids, custom masks, kwargs outside the allow-list --------------------------------------------
def shifted(ids: torch.Tensor, by: int = 9) -> torch.Tensor:
    return torch.arange(ids.shape[1]).unsqueeze(0) + by


def test_position_ids_fall_back_exactly(model):
    cache, prompt = stored_prompt(model, seed=63)
    expected = greedy(model, prompt, position_ids=shifted(prompt))
    actual, messages = recorded(lambda: run(model, cache, prompt, position_ids=shifted(prompt)))
    assert_same_output(expected, actual)
    assert len(messages) == 1 and "position_ids" in str(messages[0].message)
    assert cache.last_call.hit_tokens == 0


def test_position_ids_store_no_shifted_kv(model):
    cache, prompt = stored_prompt(model, seed=64)
    stored = cache.store.pool.num_cached
    follow_up = longer(prompt, 14, seed=65)
    recorded(lambda: run(model, cache, follow_up, position_ids=shifted(follow_up)))
    assert cache.store.pool.num_cached == stored
    assert_store_not_poisoned(model, cache.store, follow_up)


def test_a_4d_attention_mask_gets_what_generate_gives_without_a_cache(model):
    cache, prompt = stored_prompt(model, seed=66)
    mask = torch.ones(1, 1, prompt.shape[1], prompt.shape[1])
    with pytest.raises(ValueError, match="must be 2D"):
        greedy(model, prompt, attention_mask=mask)  # generate() itself refuses it beside input_ids
    with pytest.raises(ValueError, match="must be 2D"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(model, cache, prompt, attention_mask=mask)
    assert cache.store.pool.num_referenced == 0
    assert_store_not_poisoned(model, cache.store, prompt)


def test_a_kwarg_outside_the_allow_list_falls_back_and_names_it(model):
    cache, prompt = stored_prompt(model, seed=67)
    stored = cache.store.pool.num_cached
    follow_up = longer(prompt, 14, seed=68)
    expected = greedy(model, follow_up, logits_to_keep=0)  # reaches the forward
    actual, messages = recorded(lambda: run(model, cache, follow_up, logits_to_keep=0))
    assert_same_output(expected, actual)
    assert len(messages) == 1 and "logits_to_keep" in str(messages[0].message)
    assert cache.last_call.hit_tokens == 0 and cache.store.pool.num_cached == stored
    # positional generate() parameters are named like keywords: a GenerationConfig there is served
    served = model.generate(
        follow_up, GenerationConfig(max_new_tokens=8, do_sample=False), **{CACHE_KWARG: cache}
    )
    assert torch.equal(served, greedy(model, follow_up).sequences)
    assert cache.last_call.hit_tokens == 28


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(
            repetition_penalty=1.3,
            no_repeat_ngram_size=3,
            min_new_tokens=2,
            output_scores=True,
            inputs_embeds=None,  # None is absent
            position_ids=None,
        ),
        # classifier-free guidance: its unconditional forward runs on a cache of its own
        dict(guidance_scale=1.5, negative_prompt_ids=random_ids(5, seed=90)),
    ],
    ids=["processors", "guidance"],
)
def test_kwargs_on_the_allow_list_are_still_served(model, kwargs):
    cache, prompt = stored_prompt(model, seed=69)
    actual, messages = recorded(lambda: run(model, cache, prompt, **kwargs))
    assert_same_output(greedy(model, prompt, **kwargs), actual)
    assert not messages and cache.last_call.hit_tokens == 28


# -- output_hidden_states / output_attentions --------------------------------------------------------------
@pytest.mark.parametrize("how", ["kwargs", "generation_config"])
@pytest.mark.parametrize("output", ["hidden_states", "attentions"])
def test_hidden_states_and_attentions_cover_the_whole_prompt(output, how):
    model = tiny_model("llama", attn="eager")  # sdpa returns no attentions
    cache, prompt = stored_prompt(model, seed=70)
    flag = {f"output_{output}": True}
    if how == "kwargs":
        kwargs = flag
    else:
        kwargs = dict(generation_config=GenerationConfig(**flag, pad_token_id=PAD, eos_token_id=2))
    expected = greedy(model, prompt, **kwargs)
    actual, messages = recorded(lambda: run(model, cache, prompt, **kwargs))
    assert_same_output(expected, actual)
    want, got = getattr(expected, output), getattr(actual, output)
    assert len(want) == len(got)
    for step_want, step_got in zip(want, got):
        for layer_want, layer_got in zip(step_want, step_got):
            assert layer_want.shape == layer_got.shape  # the prefill covers all 30 prompt positions
            torch.testing.assert_close(layer_want, layer_got, rtol=0, atol=1e-5)
    assert len(messages) == 1 and f"output_{output}" in str(messages[0].message)
    assert cache.last_call.hit_tokens == 0


# -- generate() re-entered on the same thread ----------------------------------------------------------------
class Reenter(LogitsProcessor):
    """At the first step, runs ``call`` from inside the generate() in flight."""

    def __init__(self, call):
        self.call, self.results = call, []

    def __call__(self, input_ids, scores):
        if not self.results:
            self.results.append(self.call())
        return scores


def test_generate_reentered_with_the_busy_cache_is_refused(model):
    cache, prompt = stored_prompt(model, seed=71)
    inner = longer(prompt, 6, seed=72)
    outer = longer(prompt, 10, seed=73)
    stored = cache.store.pool.num_cached
    processor = Reenter(lambda: run(model, cache, inner))
    with pytest.raises(RuntimeError, match=r"own view, PrefixCache\(model, store=cache.store\)"):
        run(model, cache, outer, logits_processor=LogitsProcessorList([processor]))
    assert cache.store.pool.num_referenced == 0 and cache.store.pool.num_cached == stored
    assert_store_not_poisoned(model, cache.store, outer)
    assert_store_not_poisoned(model, cache.store, inner)
    assert_same_output(greedy(model, outer), run(model, cache, outer))  # the cache itself is free again


def test_prepare_from_inside_the_busy_cache_is_refused(model):
    cache, prompt = stored_prompt(model, seed=74)
    processor = Reenter(lambda: cache.prepare(random_ids(20, seed=75)))
    with pytest.raises(RuntimeError, match="own view"):
        run(model, cache, prompt, logits_processor=LogitsProcessorList([processor]))
    assert cache.store.pool.num_referenced == 0
    assert_store_not_poisoned(model, cache.store, prompt)


def test_a_nested_call_on_its_own_view_is_exact(model):
    """The fix the refusal names: a view of the same store serves the nested call."""
    cache, prompt = stored_prompt(model, seed=76)
    view = PrefixCache(model, store=cache.store)
    inner, outer = longer(prompt, 6, seed=77), longer(prompt, 10, seed=78)
    processor = Reenter(lambda: run(model, view, inner))
    actual = run(model, cache, outer, logits_processor=LogitsProcessorList([processor]))
    assert_same_output(greedy(model, outer), actual)
    assert_same_output(greedy(model, inner), processor.results[0])
    assert cache.last_call.hit_tokens == 28 and view.last_call.hit_tokens == 28
    assert cache.store.pool.num_referenced == 0


# -- commit() checks its call ------------------------------------------------------------------------------
def manual_cache(model):
    return PrefixCache(model, block_size=BLOCK, num_blocks=128, install=False)


def test_commit_refuses_the_sequences_of_another_call(model):
    cache = manual_cache(model)
    prompt = random_ids(30, seed=79)
    cache.prepare(prompt)
    cache.commit(run(model, cache, prompt).sequences)
    stored = cache.store.pool.num_cached
    prepared, generated = longer(prompt, 12, seed=80), random_ids(42, seed=81)  # same length
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            cache.prepare(prepared)
            out = run(model, cache, generated)
            cache.commit(out.sequences)
            assert "does not start with the prompt" in cache.last_call.refused
    assert len(fallback_warnings(record)) == 1
    assert cache.stats.refused_calls == 2 and cache.store.pool.num_cached == stored
    assert cache.store.pool.num_referenced == 0
    assert_store_not_poisoned(model, cache.store, prepared)


def left_padded(*rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(row.shape[1] for row in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros_like(ids)
    for index, row in enumerate(rows):
        ids[index, width - row.shape[1] :] = row[0]
        mask[index, width - row.shape[1] :] = 1
    return ids, mask


def test_commit_checks_rows_with_their_padding(model):
    cache = manual_cache(model)
    first, second = random_ids(30, seed=82), random_ids(22, seed=83)
    ids, mask = left_padded(first, second)
    cache.prepare(ids, mask)
    out = run(model, cache, ids, attention_mask=mask)
    with pytest.warns(PrefixCacheFallbackWarning, match="does not start with the prompt"):
        cache.commit(out.sequences.flip(0))  # the rows of another (reordered) batch
    assert cache.stats.refused_calls == 1 and cache.store.pool.num_cached == 0
    pad = ids.shape[1] - second.shape[1]
    moved, moved_mask = ids.clone(), mask.clone()
    moved[1, pad - 1], moved_mask[1, pad - 1] = 5, 1  # the same tokens after one more: other positions
    cache.prepare(ids, mask)
    cache.commit(run(model, cache, moved, attention_mask=moved_mask).sequences)
    assert cache.stats.refused_calls == 2 and cache.store.pool.num_cached == 0
    cache.prepare(ids, mask)
    out = run(model, cache, ids, attention_mask=mask)
    cache.commit(out.sequences)  # its own sequences are stored
    assert cache.stats.refused_calls == 2 and cache.store.pool.num_cached > 0
    assert_store_not_poisoned(model, cache.store, first)
    assert_store_not_poisoned(model, cache.store, second)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_beams=4, num_return_sequences=2),
        dict(num_beams=3),
        dict(do_sample=True, num_return_sequences=3),
    ],
    ids=["beams_return_2", "beams", "sampled_returns"],
)
@pytest.mark.parametrize("wrapped", [False, True])
def test_commit_accepts_expanded_and_beam_reordered_rows(model, kwargs, wrapped):
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=256, install=wrapped)
    ids, mask = left_padded(random_ids(30, seed=85), random_ids(21, seed=86))
    expand = max(kwargs.get("num_beams", 1), kwargs.get("num_return_sequences", 1))
    settings = dict(attention_mask=mask, max_new_tokens=8, output_logits=True, return_dict_in_generate=True)
    outputs = []
    for cached in (True, True, False):
        extra = {CACHE_KWARG: cache} if cached else {}
        if cached and not wrapped:
            cache.prepare(ids, mask, num_expand=expand)
        torch.manual_seed(0)
        outputs.append(model.generate(ids, **settings, **kwargs, **extra))
        if cached and not wrapped:
            cache.commit(outputs[-1].sequences)
        assert cache.last_call.refused is None
    assert cache.stats.refused_calls == 0 and cache.store.pool.num_cached > 0
    assert cache.last_call.hit_tokens > 0
    assert_same_output(outputs[2], outputs[1])
