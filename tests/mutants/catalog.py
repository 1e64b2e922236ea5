"""The mutant list: each entry breaks one feature with a monkeypatch and names the tests that must fail.

Patches wrap stable names (a class method, a module function) instead of editing lines, so they survive
refactors of the code around them. To add one: write a ``patch`` function below, then a ``Mutant`` in
``MUTANTS`` (see README.md in this folder). Node ids are relative to the repository root; choose fast
tests on the tiny models, and only tests that fail by an assertion under the mutant.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

PACKAGES = ("hf_prefix_cache", "hf_prefix_cache_eval")


@dataclass(frozen=True)
class Mutant:
    name: str
    breaks: str  # the feature it breaks, in words
    patch: Callable[[], None]  # applied once, before the test modules are imported
    tests: tuple[str, ...]  # every one of these must fail under the mutant


def replace_function(module_name: str, name: str, make: Callable[[Callable], Callable]) -> None:
    """Replace function ``module_name.name`` by ``make(original)`` everywhere the library bound it
    (``from .x import name`` copies the reference into other modules)."""
    for package in PACKAGES:
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)
    original = getattr(importlib.import_module(module_name), name)
    replacement = make(original)
    for module_key, module in list(sys.modules.items()):
        if module_key.split(".")[0] in PACKAGES:
            for attr, value in list(vars(module).items()):
                if value is original:
                    setattr(module, attr, replacement)


# -- the patches -------------------------------------------------------------------------------------------
def reply_storage_off() -> None:
    """commit() never sees generate()'s sequences: only prompts are stored."""
    from hf_prefix_cache import PrefixCache

    commit = PrefixCache.commit

    def without_replies(self, sequences=None, *args, **kwargs):
        return commit(self, None, *args, **kwargs)

    PrefixCache.commit = without_replies


def wrapper_changes_kwarg_without_cache() -> None:
    """The installed generate() wrapper forces max_new_tokens=1 when no PrefixCache is passed."""
    from hf_prefix_cache import PrefixCache

    def make(install):
        def mutated_install(model):
            install(model)
            inner = model.generate
            if getattr(inner, "_mutant", False):
                return

            def generate(*args, **kwargs):
                if not any(isinstance(value, PrefixCache) for value in kwargs.values()):
                    kwargs["max_new_tokens"] = 1
                return inner(*args, **kwargs)

            generate.__dict__.update(vars(inner))  # keeps the installed mark: is_installed/uninstall work
            generate._mutant = True
            model.generate = generate

        return mutated_install

    replace_function("hf_prefix_cache.hook", "install", make)


def write_outputs_wrong_values() -> None:
    """results.csv/results.json say hit_tokens=0, match=False, ttft_s=9.9 (so mismatches=all turns)."""

    def make(write_outputs):
        def wrong(results, directory):
            fake = copy.copy(results)
            fake.records = [
                dataclasses.replace(r, hit_tokens=0.0, match=False, ttft_s=9.9) for r in results.records
            ]
            files = write_outputs(fake, directory)
            results.output_dir, results.files, results.plot_paths = (
                fake.output_dir,
                fake.files,
                fake.plot_paths,
            )
            return files

        return wrong

    replace_function("hf_prefix_cache_eval.report", "write_outputs", make)


def match_capped_at_one_block() -> None:
    from hf_prefix_cache import BlockStore

    match = BlockStore.match

    def one_block(self, *args, **kwargs):
        blocks = match(self, *args, **kwargs)
        self.release(blocks[1:])
        return blocks[:1]

    BlockStore.match = one_block


def kv_written_one_slot_off() -> None:
    """Every stored slot gets its predecessor's K/V (the first slot of a write is duplicated)."""
    from hf_prefix_cache.kv_pool import KVPool

    write = KVPool.write

    def shifted(self, layer, block_ids, keys, values, *args, **kwargs):
        def shift(t):
            return torch.cat([t[:, :1], t[:, :-1]], dim=1)

        return write(self, layer, block_ids, shift(keys), shift(values), *args, **kwargs)

    KVPool.write = shifted


def noise_on_stored_keys_bf16() -> None:
    """Stored bf16 keys get the noise of the bf16 negative control (0.5 * N(0, 1)), seeded."""
    from hf_prefix_cache.kv_pool import KVPool

    write = KVPool.write
    generator = torch.Generator().manual_seed(1004)

    def noisy(self, layer, block_ids, keys, values, *args, **kwargs):
        if keys.dtype == torch.bfloat16:
            noise = torch.randn(keys.shape, generator=generator, dtype=torch.float32)
            keys = keys + (0.5 * noise).to(keys.dtype).to(keys.device)
        return write(self, layer, block_ids, keys, values, *args, **kwargs)

    KVPool.write = noisy


def namespace_ignores_salt() -> None:
    from hf_prefix_cache import PrefixCache

    init = PrefixCache.__init__

    def unsalted(self, *args, cache_salt=None, **kwargs):
        init(self, *args, **kwargs)

    PrefixCache.__init__ = unsalted


def last_prompt_token_loaded() -> None:
    """A fully stored prompt is loaded whole: nothing is left to compute (generate()'s trap)."""
    from hf_prefix_cache import BlockStore

    match = BlockStore.match

    def whole_prompt(self, namespace, tokens, hashes, max_blocks, *args, **kwargs):
        return match(self, namespace, tokens, hashes, len(hashes), *args, **kwargs)

    BlockStore.match = whole_prompt


def fallback_model_gets_the_cache() -> None:
    """A model the store cannot serve still gets the PrefixCache (a plain DynamicCache) in generate()."""

    def make(run_generate):
        def hands_over(cache, original, args, kwargs):
            if cache.store is None:
                return original(*args, **kwargs)
            return run_generate(cache, original, args, kwargs)

        return hands_over

    replace_function("hf_prefix_cache.hook", "run_generate", make)


def every_generation_mode_served() -> None:
    """Contrastive search, DoLa, group beams... are served from the store instead of falling back."""
    from transformers.generation.configuration_utils import GenerationMode

    from hf_prefix_cache import hook

    hook.EXACT_MODES.update(set(GenerationMode) - {GenerationMode.ASSISTED_GENERATION})


def fingerprint_ignores_weights() -> None:
    """Two models of one class and config share a namespace whatever their weights."""

    def make(model_fingerprint):
        def class_and_config(model):
            return f"{type(model).__qualname__}:{model.config.to_json_string()}".encode().hex()[:64]

        return class_and_config

    replace_function("hf_prefix_cache.fingerprint", "model_fingerprint", make)


def weights_watch_blind() -> None:
    """Weight updates after the first call go unnoticed: stale blocks keep hitting."""
    from hf_prefix_cache.fingerprint import WeightsWatch

    changed = WeightsWatch.changed

    def first_time_only(self):
        if getattr(self, "_mutant_seen", False):
            return False
        self._mutant_seen = True
        return changed(self)

    WeightsWatch.changed = first_time_only


CORE = "tests/test_core_exactness.py"
API = "tests/test_core_api.py"
BATCHES = "tests/test_batches_strategies.py"
FALLBACKS = "tests/test_fallbacks.py"

MUTANTS: list[Mutant] = [
    Mutant(
        "reply_storage_off",
        "replies are stored so the next turn hits the whole history",
        reply_storage_off,
        (
            f"{CORE}::test_three_turn_conversation_reuses_history_and_replies[llama]",
            f"{BATCHES}::test_text_generation_pipeline_reuses_the_conversation[cache]",
            f"{BATCHES}::test_rows_that_stop_early_store_no_padding[llama-eos]",
        ),
    ),
    Mutant(
        "wrapper_changes_kwarg_without_cache",
        "the generate() wrapper is passive without a PrefixCache",
        wrapper_changes_kwarg_without_cache,
        (f"{API}::test_wrapper_is_idempotent_removable_and_passive_without_a_prefix_cache",),
    ),
    Mutant(
        "write_outputs_wrong_values",
        "results.csv and results.json hold the measured values",
        write_outputs_wrong_values,
        ("tests/test_eval_harness.py::test_report_files_hold_the_results",),
    ),
    Mutant(
        "match_capped_at_one_block",
        "the longest stored chain is matched",
        match_capped_at_one_block,
        (
            "tests/test_store.py::test_stored_kv_read_back_in_order",
            "tests/test_store.py::test_capacity_is_never_exceeded_and_references_balance",
        ),
    ),
    Mutant(
        "kv_written_one_slot_off",
        "stored K/V land in their own slots",
        kv_written_one_slot_off,
        (f"{CORE}::test_cold_then_warm_shared_system_prompt[llama]",),
    ),
    Mutant(
        "noise_on_stored_keys_bf16",
        "bf16 exactness sees corrupted keys",
        noise_on_stored_keys_bf16,
        (
            f"{BATCHES}::test_low_precision_tolerance_is_no_cache_noise[bf16-llama]",
            f"{BATCHES}::test_low_precision_tolerance_is_no_cache_noise[bf16-gemma3]",
        ),
    ),
    Mutant(
        "namespace_ignores_salt",
        "caches with different salts never share blocks",
        namespace_ignores_salt,
        (f"{API}::test_salts_do_not_share_blocks",),
    ),
    Mutant(
        "last_prompt_token_loaded",
        "the last prompt token is always computed",
        last_prompt_token_loaded,
        (f"{CORE}::test_prompt_that_is_exactly_a_cached_prefix[llama-16]",),
    ),
    Mutant(
        "fallback_model_gets_the_cache",
        "models the store cannot serve run generate() without the cache",
        fallback_model_gets_the_cache,
        (f"{FALLBACKS}::test_encoder_decoders_and_multimodal_models_fall_back_up_front[t5]",),
    ),
    Mutant(
        "every_generation_mode_served",
        "generation modes other than greedy/sampling/beams fall back",
        every_generation_mode_served,
        (f"{FALLBACKS}::test_other_generation_modes_fall_back_with_one_warning[contrastive_search]",),
    ),
    Mutant(
        "fingerprint_ignores_weights",
        "another model never hits",
        fingerprint_ignores_weights,
        (f"{API}::test_another_model_never_hits",),
    ),
    Mutant(
        "weights_watch_blind",
        "a weight update invalidates stored blocks",
        weights_watch_blind,
        (f"{API}::test_a_weight_update_invalidates_stored_blocks",),
    ),
]


def by_name(name: str) -> Mutant:
    for mutant in MUTANTS:
        if mutant.name == name:
            return mutant
    raise KeyError(f"no mutant {name!r}; known: {[m.name for m in MUTANTS]}")
