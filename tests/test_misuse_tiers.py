"""Misuse of the tier arguments and of a PEFT cache after merging: each fails up front with an error that
names the fix, instead of a host tier or disk folder larger than the machine, or a RuntimeError that
blames something else."""

from __future__ import annotations

import shutil
import warnings

import peft
import pytest
import torch
from support.exact import assert_same_output, greedy
from support.models import random_ids, tiny_model

from hf_prefix_cache import PrefixCache
from hf_prefix_cache.compat import CACHE_KWARG
from hf_prefix_cache.memory import available_bytes

BLOCK = 4


def test_a_host_tier_larger_than_the_available_ram_is_refused(model):
    free = available_bytes(torch.device("cpu"))
    assert free is not None and free < 1 << 40
    with pytest.raises(ValueError, match=r"host_memory='1TiB' .* RAM available; pass a smaller host_memory="):
        PrefixCache(model, block_size=BLOCK, num_blocks=16, host_memory="1TiB")
    with pytest.raises(ValueError, match="cannot read host_memory='lots'"):
        PrefixCache(model, block_size=BLOCK, num_blocks=16, host_memory="lots")
    with pytest.raises(ValueError, match="host_memory must be positive"):
        PrefixCache(model, block_size=BLOCK, num_blocks=16, host_memory=0)
    PrefixCache(model, block_size=BLOCK, num_blocks=16, host_memory="1MiB")  # a sane size still works


def test_a_disk_size_larger_than_the_filesystem_can_hold_is_refused(model, tmp_path):
    free = shutil.disk_usage(tmp_path).free
    absurd = free * 4 + (1 << 40)
    with pytest.raises(ValueError, match=r"disk_size=\d+ .* can hold .* pass a smaller disk_size="):
        PrefixCache(model, block_size=BLOCK, num_blocks=16, disk=tmp_path / "kv", disk_size=absurd)
    with pytest.raises(ValueError, match="cannot read disk_size='huge'"):
        PrefixCache(model, block_size=BLOCK, num_blocks=16, disk=tmp_path / "kv", disk_size="huge")
    PrefixCache(model, block_size=BLOCK, num_blocks=16, disk=tmp_path / "kv", disk_size="1MiB")


def test_generate_on_a_merged_peft_model_with_the_old_cache_names_the_fix():
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(5)
        peft_model = peft.get_peft_model(
            tiny_model("llama"), peft.LoraConfig(task_type="CAUSAL_LM", **config)
        )
    peft_model.eval()
    cache = PrefixCache(peft_model, block_size=BLOCK, num_blocks=64)
    prompt = random_ids(30, seed=3)
    greedy(peft_model, prompt, **{CACHE_KWARG: cache})
    merged = peft_model.merge_and_unload()
    with pytest.raises(RuntimeError, match=r"merge_and_unload\(\) or unload\(\)") as error:
        greedy(merged, prompt, **{CACHE_KWARG: cache})
    assert "PrefixCache(merged, store=cache.store)" in str(error.value)
    assert "uninstall" not in str(error.value)
    assert cache.get_seq_length() == 0 and cache.store.pool.num_referenced == 0
    fixed = PrefixCache(merged, store=cache.store)  # the fix works, and is exact
    expected = greedy(merged, prompt)
    assert_same_output(expected, greedy(merged, prompt, **{CACHE_KWARG: fixed}))
    assert_same_output(expected, greedy(merged, prompt, **{CACHE_KWARG: fixed}))
    assert fixed.last_call.hit_tokens == 28
