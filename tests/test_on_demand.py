"""Memory and copies on demand: the pool commits memory per stored block, decoding appends in place."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
from support.exact import assert_same_output, greedy
from support.models import random_ids, tiny_model
from transformers import StoppingCriteria, StoppingCriteriaList

from hf_prefix_cache import PrefixCache
from hf_prefix_cache.compat import CACHE_KWARG
from hf_prefix_cache.memory import parse_bytes

MiB = 2**20


# Run in a fresh interpreter: in a long test process the allocator may place the pool in pages that
# earlier tests already made resident, and then resident memory no longer shows what the pool commits.
MEASURE = """
import json, os, resource, sys
import torch
if os.environ.get("HF_PREFIX_CACHE_MUTANT"):  # tests/test_mutants.py: the mutant applies here too
    sys.path.insert(0, sys.argv[2])
    from mutants.catalog import by_name
    by_name(os.environ["HF_PREFIX_CACHE_MUTANT"]).patch()
from hf_prefix_cache import BlockStore
from hf_prefix_cache.layout import LayerLayout

def resident_bytes():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()

layouts = [LayerLayout(8, 128, torch.float32, torch.device("cpu")) for _ in range(4)]  # 512 KiB a block
source = [torch.randn(8, 100 * 16, 128) for _ in layouts]  # made before the baseline is read
before = resident_bytes()
store = BlockStore.sized(layouts, block_size=16, max_memory=sys.argv[1])
after_construction = resident_bytes()
committed_at_construction = store.committed_bytes
for layer, values in enumerate(source):
    store.kv.write(layer, list(range(100)), values, values)
after_fill = resident_bytes()
keys, _ = store.kv.read(3, [0, 99])
print(json.dumps(dict(
    block_bytes=sum(layout.block_bytes(16) for layout in layouts),
    capacity=store.capacity_bytes,
    committed_at_construction=committed_at_construction,
    committed_after_fill=store.committed_bytes,
    construction=after_construction - before,
    fill=after_fill - after_construction,
    read_back=bool(torch.equal(keys[:, 16:], source[3][:, 99 * 16 :])),
)))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc (Linux)")
def test_resident_memory_follows_stored_blocks_not_the_budget():
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, "2GiB", os.path.dirname(__file__)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    m = json.loads(done.stdout.strip().splitlines()[-1])
    block_bytes = m["block_bytes"]
    assert m["capacity"] > parse_bytes("1.9GiB")
    assert m["committed_at_construction"] == 0
    assert m["construction"] < 32 * MiB  # a zero-filled pool would be resident: 2 GiB
    assert m["committed_after_fill"] == 100 * block_bytes
    assert 0.9 * 100 * block_bytes <= m["fill"] <= 100 * block_bytes + 32 * MiB, m
    assert m["read_back"]


class KeyPointers(StoppingCriteria):
    """Records, before every decode step, where each full-attention layer's keys and values live."""

    def __init__(self, cache: PrefixCache):
        self.cache, self.steps = cache, []

    def __call__(self, input_ids, scores, **kwargs):
        layers = [layer for layer in self.cache.layers if not getattr(layer, "is_sliding", False)]
        self.steps.append(
            [(layer.keys.data_ptr(), layer.values.data_ptr(), layer.keys.shape[-2]) for layer in layers]
        )
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_decode_steps_append_in_place_without_copying_the_context(family):
    model = tiny_model(family)
    cache = PrefixCache(model, block_size=4, num_blocks=64)
    prefix = random_ids(37, seed=5)[0].tolist()
    greedy(model, torch.tensor([[*prefix, 7]]), **{CACHE_KWARG: cache})  # stores the prefix
    prompt = torch.tensor([[*prefix, 9, 11, 13]])
    pointers = KeyPointers(cache)
    out = greedy(
        model,
        prompt,
        max_new_tokens=12,
        min_new_tokens=12,
        stopping_criteria=StoppingCriteriaList([pointers]),
        **{CACHE_KWARG: cache},
    )
    assert cache.last_call.hit_tokens == 36
    assert len(pointers.steps) == 12
    for layer in range(len(pointers.steps[0])):
        places = {(k, v) for step in pointers.steps for k, v, _ in [step[layer]]}
        lengths = [step[layer][2] for step in pointers.steps]
        assert lengths == list(range(prompt.shape[1], prompt.shape[1] + 12))
        assert len(places) == 1, f"layer {layer}'s K/V moved during decoding: copied, not appended in place"
    assert_same_output(greedy(model, prompt, max_new_tokens=12, min_new_tokens=12), out)


def test_without_a_length_hint_the_buffers_grow_by_doubling():
    model = tiny_model("llama")
    cache = PrefixCache(model, block_size=4, num_blocks=64, install=False)
    ids = random_ids(8, seed=2)
    places = []
    with torch.no_grad():
        logits = model(ids, use_cache=True, **{CACHE_KWARG: cache}).logits
        for _ in range(120):
            token = logits[:, -1:].argmax(-1)
            logits = model(token, use_cache=True, **{CACHE_KWARG: cache}).logits
            places.append(cache.layers[0].keys.data_ptr())
    assert cache.get_seq_length() == 128
    moves = sum(1 for a, b in itertools.pairwise(places) if a != b)
    assert moves <= 4  # 8 -> 16 -> 32 -> 64 -> 128 slots: a copy per doubling, not per token


def test_a_full_layer_follows_every_replacement_of_its_keys_like_a_dynamic_layer():
    """The decode fast path trusts only the views the layer handed out itself: after beam reordering,
    crop, batch repetition or selection replaced them, the layer holds exactly what a DynamicLayer holds."""
    from transformers.cache_utils import DynamicLayer

    from hf_prefix_cache.layers import PrefixFullLayer

    generator = torch.Generator().manual_seed(0)

    def kv(rows, slots):
        return torch.randn(rows, 2, slots, 8, generator=generator)

    ours, reference = PrefixFullLayer(), DynamicLayer()
    ours.reserve = 64

    def both_update(rows, slots):
        keys, values = kv(rows, slots), kv(rows, slots)
        got = ours.update(keys, values)
        expected = reference.update(keys, values)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])

    both_update(2, 5)
    both_update(2, 1)
    for operation in (
        lambda layer: layer.reorder_cache(torch.tensor([1, 0])),
        lambda layer: layer.crop(-2),
        lambda layer: layer.batch_repeat_interleave(2),
        lambda layer: layer.batch_select_indices(torch.tensor([3, 0, 1])),
    ):
        operation(ours)
        operation(reference)
        both_update(ours.keys.shape[0], 1)
        both_update(ours.keys.shape[0], 1)
    assert torch.equal(ours.keys, reference.keys) and torch.equal(ours.values, reference.values)
