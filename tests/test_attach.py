"""attach(model): every generate() that passes no cache goes through one store, exactly as plain generate()
(token for token, logits within the fp32 tolerance), one view per call in flight, explicit caches win,
detach restores plain generate(). Real clients (smolagents, pipeline, lm-eval): test_attach_clients.py."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from support.assertions import assert_exact
from support.exact import greedy
from support.models import BOS, random_ids, tiny_model
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

import hf_prefix_cache
from hf_prefix_cache import PrefixCache, PrefixCacheFallbackWarning, attach, attached, detach
from hf_prefix_cache.attachment import REPLACED

pytestmark = pytest.mark.usefixtures("quiet_single_thread")

GEN = dict(max_new_tokens=6)


@pytest.fixture
def model():
    model = tiny_model("llama")
    yield model
    detach(model)


def turns(count: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """Growing prompts: turn k is turn k-1 plus 9 new tokens (its reply is left out: the references and
    the attached run see the same prompts whatever they generated)."""
    first = torch.cat([torch.tensor([[BOS]]), random_ids(20, seed)], dim=1)
    prompts = [first]
    for k in range(1, count):
        prompts.append(torch.cat([prompts[-1], random_ids(9, seed + 100 + k)], dim=1))
    return prompts


def _add_key_noise(cache: PrefixCache, seed: int = 0, scale: float = 0.5) -> None:
    generator = torch.Generator().manual_seed(seed)
    for keys in cache.store.kv.keys:
        keys.add_((scale * torch.randn(keys.shape, generator=generator)).to(keys.dtype))


def test_plain_generate_through_attach_is_exact_and_hits_from_turn_two(model):
    prompts = turns()
    refs = [greedy(model, p, **GEN) for p in prompts]
    cache = attach(model, block_size=4, num_blocks=64)
    assert attached(model) is cache
    for turn, (prompt, ref) in enumerate(zip(prompts, refs)):
        out = greedy(model, prompt, **GEN)
        assert_exact(ref, out, label=f"turn {turn}")
        hit = cache.last_call.hit_tokens
        assert (hit > 0) == (turn > 0), f"turn {turn}: {hit} tokens hit"
    assert cache.stats.calls == len(prompts) and cache.stats.hit_tokens > 0


def test_negative_control_noisy_stored_keys_are_caught(model):
    """The comparison sees the store: noise on the stored keys makes the attached call differ."""
    prompts = turns(2)
    ref = greedy(model, prompts[1], **GEN)
    cache = attach(model, block_size=4, num_blocks=64)
    greedy(model, prompts[0], **GEN)
    _add_key_noise(cache)
    out = greedy(model, prompts[1], **GEN)
    assert cache.last_call.hit_tokens > 0
    with pytest.raises(AssertionError):
        assert_exact(ref, out)


def test_an_explicit_cache_wins(model):
    prompts = turns(2)
    cache = attach(model, block_size=4, num_blocks=64)
    greedy(model, prompts[0], **GEN)
    calls = cache.stats.calls
    own = PrefixCache(model, block_size=4, num_blocks=64)
    for kwarg in ("cache", "past_key_values"):
        out = greedy(model, prompts[1], **{kwarg: own}, **GEN)
        assert own.last_call.prompt_tokens == prompts[1].shape[1]
    assert own.stats.calls == 2 and cache.stats.calls == calls, "the attached store served an explicit cache"
    dynamic = DynamicCache(config=model.config)
    out = greedy(model, prompts[1], cache=dynamic, **GEN)
    assert cache.stats.calls == calls, "the attached store served a call that passed a DynamicCache"
    assert dynamic.get_seq_length() == prompts[1].shape[1] + GEN["max_new_tokens"] - 1
    detach(model)
    assert_exact(greedy(model, prompts[1], **GEN), out)


def test_calls_that_want_no_cache_run_plain(model):
    prompts = turns(2)
    cache = attach(model, block_size=4, num_blocks=64)
    greedy(model, prompts[0], **GEN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref = greedy(model, prompts[1], use_cache=False, **GEN)
    assert not [w for w in caught if w.category is PrefixCacheFallbackWarning], (
        "use_cache=False is not a fallback"
    )
    assert cache.stats.calls == 1
    detach(model)
    assert_exact(greedy(model, prompts[1], use_cache=False, **GEN), ref)


@pytest.mark.parametrize("installed_before", [False, True])
def test_detach_restores_plain_generate(model, installed_before):
    prompts = turns(2)
    if installed_before:
        earlier = PrefixCache(model, block_size=4, num_blocks=64)
    cache = attach(model, block_size=4, num_blocks=64)
    assert hf_prefix_cache.is_installed(model)
    greedy(model, prompts[0], **GEN)
    attachment = model.__dict__[hf_prefix_cache.generation.ATTACHED]
    assert len(attachment.pool.views) == 1
    assert detach(model) is cache
    assert not attachment.pool.views, "the detached cache keeps a view (and its buffers) alive"
    assert attached(model) is None and detach(model) is None
    # the wrapper goes with the attachment unless a PrefixCache made before attach() installed it
    assert hf_prefix_cache.is_installed(model) == installed_before
    assert ("generate" in model.__dict__) == installed_before
    assert cache.stats.calls == 1 and cache.stats.hit_tokens == 0, "the detached views' calls are counted"
    out = greedy(model, prompts[1], **GEN)
    assert cache.stats.calls == 1, "a call after detach went through the detached store"
    if installed_before:
        greedy(model, prompts[1], cache=earlier, **GEN)  # the earlier cache still works
        assert earlier.stats.calls == 1
    assert_exact(greedy(model, prompts[1], cache=DynamicCache(config=model.config), **GEN), out)


class Rendezvous(LogitsProcessor):
    """Holds the first decode step of each thread until every thread is inside its generate() call."""

    def __init__(self, barrier: threading.Barrier):
        self.barrier = barrier
        self.waited = False

    def __call__(self, input_ids, scores):
        if not self.waited:
            self.waited = True
            self.barrier.wait(timeout=60)
        return scores


def test_two_threads_at_once_each_get_a_view_and_stay_exact(model):
    """Two threads in generate() at the same moment (a barrier inside both calls), three turns each."""
    prompts = {name: turns(3, seed) for name, seed in (("a", 0), ("b", 50))}
    refs = {name: [greedy(model, p, **GEN) for p in ps] for name, ps in prompts.items()}
    cache = attach(model, block_size=4, num_blocks=128)
    outs: dict[str, list] = {name: [] for name in prompts}
    errors: list[BaseException] = []
    barriers = [threading.Barrier(2) for _ in range(3)]

    def run(name: str) -> None:
        try:
            for turn, prompt in enumerate(prompts[name]):
                processor = LogitsProcessorList([Rendezvous(barriers[turn])])
                outs[name].append(greedy(model, prompt, logits_processor=processor, **GEN))
        except BaseException as error:  # reported below
            errors.append(error)
            for barrier in barriers:
                barrier.abort()

    threads = [threading.Thread(target=run, args=(name,)) for name in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, f"a thread failed: {errors[0]!r}"
    for name in prompts:
        for turn, (ref, out) in enumerate(zip(refs[name], outs[name], strict=True)):
            assert_exact(ref, out, label=f"thread {name} turn {turn}")
    attachment = model.__dict__[hf_prefix_cache.generation.ATTACHED]
    assert len(attachment.pool.views) == 2, "each call in flight has a view of its own"
    assert cache.stats.calls == 6 and cache.stats.hit_tokens > 0, "stats sum every view's calls"


class Reenter(LogitsProcessor):
    """Runs a generate() on the same model from inside the call in flight, once."""

    def __init__(self, model, prompt):
        self.model, self.prompt, self.inner = model, prompt, None

    def __call__(self, input_ids, scores):
        if self.inner is None:
            self.inner = greedy(self.model, self.prompt, **GEN)
        return scores


def test_a_generate_reentered_on_the_same_thread_runs_plain(model):
    """The outer call's view holds its layers: the inner call runs plain generate() (no second view)."""
    prompts = turns(2)
    refs = [greedy(model, p, **GEN) for p in prompts]
    cache = attach(model, block_size=4, num_blocks=64)
    greedy(model, prompts[0], **GEN)
    reenter = Reenter(model, prompts[0])
    out = greedy(model, prompts[1], logits_processor=LogitsProcessorList([reenter]), **GEN)
    assert_exact(refs[1], out, label="outer")
    assert_exact(refs[0], reenter.inner, label="inner")
    assert cache.stats.calls == 2, "the inner call went through the store"
    assert len(model.__dict__[hf_prefix_cache.generation.ATTACHED].pool.views) == 1


def test_attaching_twice_replaces_the_first_with_one_warning(model):
    first = attach(model, block_size=4, num_blocks=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = attach(model, block_size=4, num_blocks=64)
    assert [str(w.message) for w in caught if w.category is PrefixCacheFallbackWarning] == [
        REPLACED.format(model="LlamaForCausalLM")
    ]
    assert attached(model) is second
    greedy(model, turns(1)[0], **GEN)
    assert second.stats.calls == 1 and first.stats.calls == 0


def test_an_unservable_model_warns_once_and_runs_plain():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    prompt = turns(1)[0]
    ref = greedy(model, prompt, **GEN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = attach(model)
        outs = [greedy(model, prompt, **GEN) for _ in range(2)]
    ours = [str(w.message) for w in caught if w.category is PrefixCacheFallbackWarning]
    assert len(ours) == 1 and "dynamic" in ours[0]
    assert cache.store is None and cache.stats.fallback
    for out in outs:
        assert_exact(ref, out)
    detach(model)


def test_training_mode_neither_reuses_nor_stores(model):
    prompts = turns(2)
    refs = [greedy(model, p, **GEN) for p in prompts]
    cache = attach(model, block_size=4, num_blocks=64)
    model.train()
    try:
        outs = [greedy(model, p, **GEN) for p in prompts]
    finally:
        model.eval()
    for ref, out in zip(refs, outs):
        assert_exact(ref, out)  # the tiny Llama has no dropout: the outputs stay equal
    assert cache.stats.hit_tokens == 0 and cache.stats.stored_blocks == 0


def test_a_model_cast_after_attach_runs_plain_with_one_warning(model):
    """The store holds fp32 K/V: after a cast the calls run plain generate() (no view of a store that no
    longer fits the model is made), and say so once."""
    prompt = turns(1)[0]
    cache = attach(model, block_size=4, num_blocks=64)
    model.to(torch.bfloat16)
    ref = greedy(model, prompt, cache=DynamicCache(config=model.config), **GEN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [greedy(model, prompt, **GEN) for _ in range(2)]
    ours = [str(w.message) for w in caught if w.category is PrefixCacheFallbackWarning]
    assert len(ours) == 1 and "dtype or device changed" in ours[0], ours
    for out in outs:
        assert_exact(ref, out, torch.bfloat16)
    assert cache.stats.calls == 0
