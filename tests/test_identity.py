"""The namespace names the model exactly: one weight element, one embedding row, one buffer or the
attention implementation changed means no shared blocks, in this process and through the disk tier.
Every output is compared with generate() without any cache."""

from __future__ import annotations

import pytest
import torch
from support.exact import assert_same_output, greedy
from support.models import random_ids, tiny_model
from support.workers import run_worker

import hf_prefix_cache.fingerprint as fingerprint
from hf_prefix_cache import PrefixCache
from hf_prefix_cache.compat import CACHE_KWARG

BLOCK = 4
HIT = 28  # a 30-token prompt seen before loads 7 blocks of 4
# k_proj of layer 0 is [32, 64]: the old fingerprint read flat indices 0, 32, 64, ... and WeightsWatch
# probes 0, 512, 1024, 1536. Flat index 1 is read by neither.
UNSAMPLED = (0, 1)
# embed_tokens is [96, 64]: the old sampling read flat indices 0, 96, 192, ...; none lies in row 5
UNSAMPLED_ROW = 5


def check(model, cache, prompt, hit: int | None):
    expected = greedy(model, prompt)
    actual = greedy(model, prompt, **{CACHE_KWARG: cache})
    assert_same_output(expected, actual)
    if hit is not None:
        assert cache.last_call.hit_tokens == hit
    return actual


def k_proj(model) -> torch.Tensor:
    return model.model.layers[0].self_attn.k_proj.weight


def test_one_unsampled_weight_element_written_in_place_misses():
    model = tiny_model("llama")
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128)
    prompt = random_ids(30, seed=11)
    before = check(model, cache, prompt, 0)
    with torch.no_grad():
        k_proj(model)[UNSAMPLED] += 5.0  # one element, an ordinary in-place op (bumps the version)
    after = check(model, cache, prompt, 0)
    worst = max((a - b).abs().max().item() for a, b in zip(before.logits, after.logits))
    assert worst > 1e-3  # the element matters: a hit would have been wrong
    check(model, cache, prompt, HIT)  # and the new weights get their own blocks


def _fill_disk(folder, prompt) -> None:
    model = tiny_model("llama")
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128, disk=folder)
    check(model, cache, prompt, 0)
    assert cache.flush(30)


def _disk_view(model, folder) -> PrefixCache:
    return PrefixCache(model, block_size=BLOCK, num_blocks=128, disk=folder)


def test_one_weight_element_edited_in_another_model_object_misses_through_the_disk(tmp_path):
    folder, prompt = tmp_path / "kv", random_ids(30, seed=12)
    _fill_disk(folder, prompt)
    same = tiny_model("llama")  # the same checkpoint, a fresh object: hits the disk (the control)
    check(same, _disk_view(same, folder), prompt, HIT)
    edited = tiny_model("llama")
    with torch.no_grad():
        k_proj(edited).data[UNSAMPLED] += 5.0  # through .data, before any cache saw this object
    cache = _disk_view(edited, folder)
    check(edited, cache, prompt, 0)
    assert cache.last_call.hit_tokens_by_tier.get("disk", 0) == 0


def test_a_second_process_with_one_weight_element_edited_shares_no_blocks(tmp_path):
    """Processes, not objects: the edited checkpoint misses the folder, the original hits it."""
    folder = tmp_path / "kv"
    filled = run_worker("generate", folder, "llama:0:", 21)
    assert filled["calls"][0]["equal"] and list(folder.rglob("*.kvb"))
    edited, original = run_worker("generate", folder, "llama:0e:,llama:0:", 21, lines=2)
    assert edited["calls"][0]["equal"] and edited["calls"][0]["hit_tokens"] == 0
    assert original["calls"][0]["equal"] and original["calls"][0]["by_tier"] == {"disk": 36}


def test_models_differing_in_one_embedding_row_share_no_blocks_through_the_disk(tmp_path):
    folder = tmp_path / "kv"
    prompt = random_ids(30, seed=13)
    prompt[0, 2:6] = UNSAMPLED_ROW  # the fine-tuned "chat token" appears in the prompt
    _fill_disk(folder, prompt)
    tuned = tiny_model("llama")
    with torch.no_grad():
        tuned.model.embed_tokens.weight[UNSAMPLED_ROW] = torch.randn(
            64, generator=torch.Generator().manual_seed(3)
        )
    original = tiny_model("llama")
    assert not torch.equal(greedy(original, prompt).logits[0], greedy(tuned, prompt).logits[0])
    check(tuned, _disk_view(tuned, folder), prompt, 0)
    check(original, _disk_view(original, folder), prompt, HIT)  # the control: the folder does serve


def test_a_changed_buffer_misses():
    """Buffers (here the rotary inverse frequencies) shape K/V like weights do."""
    model = tiny_model("llama")
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128)
    prompt = random_ids(30, seed=14)
    check(model, cache, prompt, 0)
    rotary = model.model.rotary_emb
    with torch.no_grad():
        rotary.inv_freq[1] *= 1.5
    check(model, cache, prompt, 0)


def test_attention_implementations_are_separate_namespaces():
    model = tiny_model("llama")
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128)
    prompt = random_ids(30, seed=15)
    check(model, cache, prompt, 0)
    sdpa = cache.namespace
    model.set_attn_implementation("eager")  # switched after the cache was made: read per call
    assert cache.namespace != sdpa
    check(model, cache, prompt, 0)
    check(model, cache, prompt, HIT)
    model.set_attn_implementation("sdpa")
    assert cache.namespace == sdpa
    check(model, cache, prompt, HIT)
    eager = tiny_model("llama", attn="eager")  # same weights, another object: another namespace
    shared = PrefixCache(eager, store=cache.store)
    check(eager, shared, prompt, HIT)  # the eager blocks stored above, never the sdpa ones
    assert shared.namespace != sdpa


def test_the_fingerprint_is_one_digest_per_model_computed_on_the_first_call(monkeypatch):
    """Construction reads no weight; the first call hashes each tensor once; later calls and other
    views of the same model reuse the digest; an in-place write rehashes only the written tensor."""
    hashed: list[int] = []
    digest = fingerprint.tensor_digest
    monkeypatch.setattr(fingerprint, "tensor_digest", lambda t: hashed.append(t.numel()) or digest(t))
    model = tiny_model("llama")
    tensors = len([*model.parameters(), *model.buffers()])
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128)
    assert hashed == []
    prompt = random_ids(30, seed=16)
    check(model, cache, prompt, 0)
    assert len(hashed) == tensors
    view = PrefixCache(model, store=cache.store)
    check(model, view, prompt, HIT)
    check(model, cache, prompt, HIT)
    assert len(hashed) == tensors
    with torch.no_grad():
        k_proj(model)[UNSAMPLED] += 1.0
    check(model, cache, prompt, 0)
    assert hashed[tensors:] == [k_proj(model).numel()]


def test_unchanged_calls_neither_walk_the_model_nor_make_probes_again(monkeypatch):
    """What keeps the per-call watch cheap (its time is measured by bench_identity, never asserted):
    with nothing changed a call neither walks the module tree nor makes its probe views again; a
    registration anywhere makes it re-read the model once."""
    model = tiny_model("llama")
    watch = fingerprint.WeightsWatch(model)
    watch.changed()
    made, walked = [], []
    make_probes, parameters = fingerprint._make_probes, model.parameters
    monkeypatch.setattr(fingerprint, "_make_probes", lambda tensors: made.append(1) or make_probes(tensors))
    monkeypatch.setattr(model, "parameters", lambda *a, **k: walked.append(1) or parameters(*a, **k))
    for _ in range(5):
        assert not watch.changed()
    assert (made, walked) == ([], [])
    model.register_buffer("added_after", torch.ones(3))
    assert watch.changed()
    assert (len(made), len(walked)) == (1, 1)
    assert not watch.changed()
    assert (len(made), len(walked)) == (1, 1)


@pytest.mark.parametrize("write", ["in_place", "data"])
def test_a_new_checkpoint_written_into_the_same_object_misses(write):
    """Loading other weights into the model's own tensors (every element changes) starts a new namespace
    whether or not the write bumps the version counter."""
    model = tiny_model("llama")
    other = tiny_model("llama", seed=1)
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128)
    prompt = random_ids(30, seed=17)
    check(model, cache, prompt, 0)
    with torch.no_grad():
        for mine, theirs in zip(model.parameters(), other.parameters()):
            (mine if write == "in_place" else mine.data).copy_(theirs)
    check(model, cache, prompt, 0)


def test_a_module_swapped_after_the_cache_was_made_is_watched():
    model = tiny_model("llama")
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128)
    prompt = random_ids(30, seed=18)
    check(model, cache, prompt, 0)
    attention = model.model.layers[0].self_attn
    replacement = torch.nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        replacement.weight.copy_(attention.k_proj.weight)
        replacement.weight[UNSAMPLED] += 5.0
    attention.k_proj = replacement  # a new module: tensors the watch never saw
    check(model, cache, prompt, 0)
    check(model, cache, prompt, HIT)


def test_an_unprobed_data_write_is_seen_after_clear_and_never_poisons_the_old_namespace(tmp_path):
    """The documented limit: a ``.data`` write to one unprobed element bumps no version and moves no
    probe, so the per-call watch keeps the namespace. ``cache.clear()`` re-hashes every weight: the
    next call gets its own namespace, and the disk never serves the edited K/V to the original."""
    folder, prompt = tmp_path / "kv", random_ids(30, seed=19)
    model = tiny_model("llama")
    cache = _disk_view(model, folder)
    check(model, cache, prompt, 0)
    before = cache.namespace
    with torch.no_grad():
        k_proj(model).data[UNSAMPLED] += 5.0
    assert cache.namespace == before  # not seen per call (README: "Weight changes")
    cache.clear()
    assert cache.namespace != before
    check(model, cache, prompt, 0)
    check(model, cache, prompt, HIT)
    assert cache.flush(30)
    original = tiny_model("llama")
    check(original, _disk_view(original, folder), prompt, 0)
