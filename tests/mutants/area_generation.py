"""Mutants of the generate() wrapper: which calls it serves from the store and which fall back to plain
generate() (other models, generation modes, use_cache=False, custom loops, autocast and training mode, a
busy or unwrapped cache), and that replies are stored for the next turn."""

from __future__ import annotations

import copy

from mutants.base import mutant, replace_function

CORE = "tests/test_core_exactness.py"
API = "tests/test_core_api.py"
BATCHES = "tests/test_batches_strategies.py"
FALLBACKS = "tests/test_fallbacks.py"
CONSTRUCTION = "tests/test_construction.py"


@mutant(
    "reply_storage_off",
    breaks="replies are stored so the next turn hits the whole history",
    tests=(
        f"{CORE}::test_three_turn_conversation_reuses_history_and_replies[llama]",
        f"{BATCHES}::test_text_generation_pipeline_reuses_the_conversation[cache]",
        f"{BATCHES}::test_rows_that_stop_early_store_no_padding[llama-eos]",
    ),
)
def reply_storage_off() -> None:
    """commit() never sees generate()'s sequences: only prompts are stored."""
    from hf_prefix_cache import PrefixCache

    commit = PrefixCache.commit

    def without_replies(self, sequences=None, *args, **kwargs):
        return commit(self, None, *args, **kwargs)

    PrefixCache.commit = without_replies


@mutant(
    "wrapper_changes_kwarg_without_cache",
    breaks="the generate() wrapper is passive without a PrefixCache",
    tests=(f"{API}::test_wrapper_is_idempotent_removable_and_passive_without_a_prefix_cache",),
)
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

    replace_function("hf_prefix_cache.generation", "install", make)


@mutant(
    "fallback_model_gets_the_cache",
    breaks="models the store cannot serve run generate() without the cache",
    tests=(f"{FALLBACKS}::test_encoder_decoders_and_multimodal_models_fall_back_up_front[t5]",),
)
def fallback_model_gets_the_cache() -> None:
    """A model the store cannot serve still gets the PrefixCache (a plain DynamicCache) in generate()."""

    def make(run_generate):
        def hands_over(cache, original, args, kwargs):
            if cache.store is None:
                return original(*args, **kwargs)
            return run_generate(cache, original, args, kwargs)

        return hands_over

    replace_function("hf_prefix_cache.generation", "run_generate", make)


@mutant(
    "every_generation_mode_served",
    breaks="generation modes other than greedy/sampling/beams fall back",
    tests=(f"{FALLBACKS}::test_other_generation_modes_fall_back_with_one_warning[contrastive_search]",),
)
def every_generation_mode_served() -> None:
    """Contrastive search, DoLa, group beams... are served from the store instead of falling back."""
    from transformers.generation.configuration_utils import GenerationMode

    from hf_prefix_cache import reasons

    reasons.EXACT_MODES.update(set(GenerationMode) - {GenerationMode.ASSISTED_GENERATION})


@mutant(
    "busy_view_not_refused",
    breaks="one PrefixCache serves one call at a time",
    tests=("tests/test_misuse.py::test_case1_a_second_thread_on_a_busy_cache_gets_the_fix",),
)
def busy_view_not_refused() -> None:
    """A second thread may take over a PrefixCache whose call is in flight."""
    import threading

    from hf_prefix_cache.call import Ownership

    def claim(self):
        self.owner = threading.get_ident()

    Ownership.claim = claim


@mutant(
    "use_cache_false_served",
    breaks="use_cache=False falls back and stores nothing",
    tests=("tests/test_misuse.py::test_case3_use_cache_false_falls_back_exactly_and_stores_nothing",),
)
def use_cache_false_served() -> None:
    """generate(use_cache=False, cache=...) is prepared and committed as a normal call."""

    def make(reason):
        def ignores_use_cache(cache, config, *args, **kwargs):
            config = copy.deepcopy(config)
            config.use_cache = True
            return reason(cache, config, *args, **kwargs)

        return ignores_use_cache

    replace_function("hf_prefix_cache.reasons", "call_fallback_reason", make)


@mutant(
    "unprepared_generate_served",
    breaks="state never carries from one generate() into the next",
    tests=("tests/test_misuse.py::test_case5_unwrapped_generate_is_refused_and_carries_nothing",),
)
def unprepared_generate_served() -> None:
    """A generate() that never went through prepare() (after uninstall) computes into the cache."""
    replace_function("hf_prefix_cache.call", "inside_generate", lambda original: lambda: False)


@mutant(
    "foreign_module_accepted",
    breaks="only the fingerprinted model computes K/V into the cache",
    tests=("tests/test_misuse.py::test_case2_without_the_wrapper_kv_of_another_model_are_refused",),
)
def foreign_module_accepted() -> None:
    """K/V computed by another model's layers are accepted into this cache."""
    replace_function("hf_prefix_cache.call", "check_module", lambda original: lambda model, module: None)


@mutant(
    "custom_generate_served",
    breaks="a custom decoding loop falls back",
    tests=(f"{FALLBACKS}::test_a_custom_decoding_loop_falls_back_even_in_greedy_mode",),
)
def custom_generate_served() -> None:
    """A callable custom_generate (its own decoding loop) is served from the store."""

    def make(reason):
        def ignores_custom(cache, config, input_ids, kwargs):
            return reason(
                cache, config, input_ids, {k: v for k, v in kwargs.items() if k != "custom_generate"}
            )

        return ignores_custom

    replace_function("hf_prefix_cache.reasons", "call_fallback_reason", make)


@mutant(
    "off_default_calls_use_the_store",
    breaks="a call under torch.autocast or in training mode reuses nothing",
    tests=(
        f"{CONSTRUCTION}::test_calls_under_autocast_neither_use_nor_feed_the_store",
        f"{CONSTRUCTION}::test_calls_in_training_mode_neither_use_nor_feed_the_store",
    ),
)
def off_default_calls_use_the_store() -> None:
    """A call under torch.autocast (or in training mode) looks its prompt up and reuses stored blocks."""
    replace_function(
        "hf_prefix_cache.reasons", "off_default", lambda original: lambda model, device_types: None
    )


@mutant(
    "off_default_calls_feed_the_store",
    breaks="K/V computed under torch.autocast or with dropout in training mode are never stored",
    tests=(
        f"{CONSTRUCTION}::test_calls_under_autocast_neither_use_nor_feed_the_store",
        f"{CONSTRUCTION}::test_calls_in_training_mode_neither_use_nor_feed_the_store",
    ),
)
def off_default_calls_feed_the_store() -> None:
    """K/V computed under torch.autocast or with dropout in training mode are stored."""

    def make(unstorable):
        def forgetting(call, *args, **kwargs):
            call.off_default = None
            return unstorable(call, *args, **kwargs)

        return forgetting

    replace_function("hf_prefix_cache.reasons", "unstorable", make)
