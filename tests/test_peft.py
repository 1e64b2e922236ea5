"""PEFT/LoRA adapters: switching, disabling or merging adapters changes K/V without changing a parameter,
so the namespace carries the adapter state; every call is exact and hits stay within one adapter state."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from support.exact import assert_same_output, greedy
from support.models import random_ids, tiny_model

from hf_prefix_cache import PrefixCache
from hf_prefix_cache.adapters import adapter_namespace
from hf_prefix_cache.compat import CACHE_KWARG

BLOCK = 4
HIT = 28  # a 30-token prompt seen before loads 7 blocks of 4


def lora_model(task_type: str | None = "CAUSAL_LM"):
    """A tiny Llama with LoRA adapters "a" and "b" on q/k/v, with nonzero random weights (not a no-op)."""
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)
    base = tiny_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(5)
        model = peft.get_peft_model(base, peft.LoraConfig(task_type=task_type, **config), adapter_name="a")
        torch.manual_seed(6)
        model.add_adapter("b", peft.LoraConfig(task_type=task_type, **config))
    return model.eval(), base


def check(model, cache, prompt, hit: int | None):
    expected = greedy(model, prompt)
    actual = greedy(model, prompt, **{CACHE_KWARG: cache})
    assert_same_output(expected, actual)
    assert hit is None or cache.last_call.hit_tokens == hit
    assert cache.store.pool.num_referenced == 0
    return actual


@pytest.mark.parametrize("wrap", ["peft_model", "base_model", "both"])
def test_switching_adapters_is_exact_and_hits_stay_within_an_adapter(wrap):
    model, base = lora_model()
    if wrap == "both":  # PeftModel.generate calls the base model's: the inner wrapper must pass through
        PrefixCache(base, block_size=BLOCK, num_blocks=8)
    cache = PrefixCache(base if wrap == "base_model" else model, block_size=BLOCK, num_blocks=128)
    prompt = random_ids(30, seed=1)
    outputs = {}
    for adapter, hit in [("a", 0), ("b", 0), ("a", HIT), ("b", HIT)]:
        model.set_adapter(adapter)
        outputs[adapter] = check(model, cache, prompt, hit)
    assert not torch.equal(outputs["a"].sequences, outputs["b"].sequences)  # the adapters matter here


def test_disabled_adapters_are_their_own_namespace():
    model, _ = lora_model()
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128)
    prompt = random_ids(30, seed=2)
    model.set_adapter("a")
    check(model, cache, prompt, 0)
    with model.disable_adapter():
        check(model, cache, prompt, 0)
        check(model, cache, prompt, HIT)
    check(model, cache, prompt, HIT)


def test_a_merged_adapter_is_exact_and_does_not_hit_unmerged_blocks():
    model, _ = lora_model()
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128)
    prompt = random_ids(30, seed=3)
    model.set_adapter("b")
    check(model, cache, prompt, 0)
    model.merge_adapter()
    check(model, cache, prompt, 0)
    check(model, cache, prompt, HIT)
    model.unmerge_adapter()  # base weights come back only up to rounding: a hit or a miss, but exact
    check(model, cache, prompt, None)


def test_changed_adapter_weights_start_a_new_namespace():
    model, _ = lora_model(task_type=None)  # a plain PeftModel (no generate of its own) works the same
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128)
    prompt = random_ids(30, seed=4)
    model.set_adapter("a")
    check(model, cache, prompt, 0)
    lora_b = model.base_model.model.model.layers[0].self_attn.k_proj.lora_B["a"].weight
    with torch.no_grad():
        lora_b.mul_(2.0)
    check(model, cache, prompt, 0)


def test_negative_control_without_the_adapter_namespace_adapter_b_gets_a_s_kv(monkeypatch):
    """The check can fail: with the adapter suffix switched off, b hits a's blocks and differs."""
    import hf_prefix_cache.identity as identity_module

    monkeypatch.setattr(identity_module, "adapter_namespace", lambda model: "")
    model, _ = lora_model()
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128)
    prompt = random_ids(30, seed=1)
    model.set_adapter("a")
    greedy(model, prompt, **{CACHE_KWARG: cache})
    model.set_adapter("b")
    with pytest.raises(AssertionError):
        check(model, cache, prompt, HIT)


# -- issue 19 item 3 / issue 20: adapter weights by value, adapters added later, every tuner's settings ----
TARGETS = ["q_proj", "k_proj", "v_proj"]
TUNERS = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
    "dora": lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, use_dora=True
    ),
    "ia3": lambda: peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"],
        feedforward_modules=["down_proj"],
        init_ia3_weights=False,
    ),
    "loha": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=TARGETS, init_weights=False),
    "lokr": lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=TARGETS, init_weights=False),
    "adalora": lambda: peft.AdaLoraConfig(
        init_r=4, target_r=2, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, total_step=10
    ),
    "vera": lambda: peft.VeraConfig(r=4, target_modules=["k_proj", "v_proj"], init_weights=False),
    "boft": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=TARGETS, init_weights=False),
    "oft": lambda: peft.OFTConfig(r=0, oft_block_size=4, target_modules=TARGETS, init_weights=False),
}


def adapter_after_cache(tuner: str):
    """A tiny Llama whose PrefixCache was made BEFORE the adapter was added: the cache's WeightsWatch
    started without the adapter's tensors."""
    base = tiny_model("llama")
    cache = PrefixCache(base, block_size=BLOCK, num_blocks=128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(7)
        model = peft.get_peft_model(base, TUNERS[tuner](), adapter_name="a").eval()
    return model, cache


def k_proj_layer(model):
    return model.base_model.model.model.layers[0].self_attn.k_proj


def adapter_tensors(layer) -> list[torch.Tensor]:
    return [p for name, p in layer.named_parameters() if not name.startswith("base_layer")]


@pytest.mark.parametrize("tuner", list(TUNERS))
def test_adapter_weights_rewritten_through_data_start_a_new_namespace(tuner):
    """``.data.copy_()`` bypasses the version counter: the adapter digest must see the values."""
    model, cache = adapter_after_cache(tuner)
    prompt = random_ids(30, seed=8)
    check(model, cache, prompt, 0)
    check(model, cache, prompt, HIT)
    generator = torch.Generator().manual_seed(9)
    for tensor in adapter_tensors(k_proj_layer(model)):
        tensor.data.copy_(tensor.data + 0.5 * torch.randn(tensor.shape, generator=generator))
    check(model, cache, prompt, 0)
    check(model, cache, prompt, HIT)


def test_an_adapter_added_after_the_cache_is_watched():
    model, _ = lora_model()
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128)
    prompt = random_ids(30, seed=10)
    model.set_adapter("a")
    check(model, cache, prompt, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(11)
        model.add_adapter("c", TUNERS["lora"]())
    model.set_adapter("c")
    check(model, cache, prompt, 0)
    check(model, cache, prompt, HIT)
    lora_a = k_proj_layer(model).lora_A["c"].weight
    lora_a.data.copy_(torch.randn(lora_a.shape, generator=torch.Generator().manual_seed(12)))
    check(model, cache, prompt, 0)


@pytest.mark.parametrize("tuner", ["lora", "dora", "loha", "lokr"])
def test_set_scale_and_scale_layer_start_a_new_namespace(tuner):
    """Issue 20: a runtime scale changes K/V without touching a tensor."""
    model, _ = lora_model() if tuner == "lora" else adapter_after_cache(tuner)
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=128)
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and hasattr(m, "set_scale")]
    assert layers
    prompt = random_ids(30, seed=13)
    model.set_adapter("a")
    check(model, cache, prompt, 0)
    for layer in layers:
        layer.set_scale("a", 3.0)
    check(model, cache, prompt, 0)
    check(model, cache, prompt, HIT)
    for layer in layers:
        layer.scale_layer(0.5)
    check(model, cache, prompt, 0)
    k_proj_layer(model).scaling["a"] = 0.25  # an edit of one layer's scaling by hand
    check(model, cache, prompt, 0)
    for layer in layers:
        layer.unscale_layer()  # back to alpha / r: the first namespace, whose blocks are still there
    check(model, cache, prompt, HIT)


@pytest.mark.parametrize("tuner", ["lora", "dora", "ia3"])
def test_the_adapter_digest_reads_values_not_identities(tuner):
    """The adapter suffix alone (without the base WeightsWatch, which also sees these tensors) changes
    when an active adapter's weights are rewritten through ``.data``, and comes back with the values."""
    model, _ = adapter_after_cache(tuner)
    before = adapter_namespace(model)
    tensors = adapter_tensors(k_proj_layer(model))
    saved = [t.detach().clone() for t in tensors]
    for tensor in tensors:
        tensor.data.copy_(tensor.data * 1.5 + 0.25)
    assert adapter_namespace(model) != before
    for tensor, value in zip(tensors, saved):
        tensor.data.copy_(value)
    assert adapter_namespace(model) == before
