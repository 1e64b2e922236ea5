"""KeyboardInterrupt at random points of a real SmolLM2 generate() loop (SIGALRM), as in a notebook.

Forty short calls on a small store (so matching, loading, storing and evicting all happen), each
with a timer that raises KeyboardInterrupt somewhere inside it: prepare, the forward passes, commit's
copies. After every call no block may stay referenced and the layers must be empty; afterwards the
store must still serve exact results to a fresh view.
"""

from __future__ import annotations

import random
import signal
import time

import pytest
import torch

from hf_prefix_cache import PrefixCache
from hf_prefix_cache.compat import CACHE_KWARG
from hf_prefix_cache_eval.models import load_model

pytestmark = pytest.mark.slow

CALLS = 40
SETTINGS = dict(max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def test_random_keyboard_interrupts_leave_the_store_sound():
    model, tokenizer = load_model("smollm2")
    rng = random.Random(0)
    stem = tokenizer("You are a helpful assistant for a store that sells speakers. ")["input_ids"]
    questions = [tokenizer(f"Question {n}: why does it hum?")["input_ids"] for n in range(4)]
    prompts = [torch.tensor([stem + q]) for q in questions]  # ~25 tokens sharing a ~13-token stem
    cache = PrefixCache(model, block_size=4, num_blocks=16)  # small: calls evict each other's blocks
    started = time.perf_counter()
    model.generate(prompts[0], **SETTINGS, **{CACHE_KWARG: cache})
    span = time.perf_counter() - started  # how long a call takes here: timers land inside calls
    previous = signal.signal(signal.SIGALRM, _interrupt)
    interrupted = 0
    try:
        for _ in range(CALLS):
            prompt = rng.choice(prompts)
            started = time.perf_counter()
            try:  # a one-shot timer: it fires at most once, inside this try
                signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.0, 1.2 * span))
                model.generate(prompt, **SETTINGS, **{CACHE_KWARG: cache})
                signal.setitimer(signal.ITIMER_REAL, 0)
                span = 0.7 * span + 0.3 * (time.perf_counter() - started)  # follow the warm calls' pace
            except KeyboardInterrupt:
                interrupted += 1
            assert cache.store.pool.num_referenced == 0
            assert cache.get_seq_length() == 0 and cache._ownership.owner is None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert interrupted > CALLS // 10, interrupted  # the timers did land inside calls
    fresh = PrefixCache(model, store=cache.store)
    for prompt in prompts:
        plain = model.generate(prompt, **SETTINGS)
        cached = model.generate(prompt, **SETTINGS, **{CACHE_KWARG: fresh})
        assert torch.equal(plain.sequences, cached.sequences)
        worst = max((a - b).abs().max().item() for a, b in zip(plain.logits, cached.logits))
        assert worst < 1e-3, worst
        assert fresh.last_call.hit_tokens > 0
    assert cache.store.pool.num_referenced == 0
