"""Mutants of decode steps: full-attention layers append in place, follow keys/values that beam search
replaced, and get decode masks only where they help (CPU SDPA with grouped queries)."""

from __future__ import annotations

from mutants.base import mutant, replace_function

DECODE_MASKS = "tests/test_decode_masks.py"


@mutant(
    "decode_concatenates",
    breaks="decode steps append in place without copying the context",
    tests=("tests/test_on_demand.py::test_decode_steps_append_in_place_without_copying_the_context[llama]",),
)
def decode_concatenates() -> None:
    """Full-attention layers concatenate the whole context at every step, as DynamicLayer does."""
    from transformers.cache_utils import DynamicLayer

    from hf_prefix_cache.layers import PrefixFullLayer

    def concatenating(self, key_states, value_states, *args, **kwargs):
        self.keys, self.values = self.keys.clone(), self.values.clone()
        return DynamicLayer.update(self, key_states, value_states, *args, **kwargs)

    PrefixFullLayer.update = concatenating


@mutant(
    "decode_trusts_replaced_views",
    breaks="a decode step adopts keys/values that beam search or crop replaced",
    tests=(
        "tests/test_on_demand.py::test_a_full_layer_follows_every_replacement_of_its_keys_like_a_dynamic_layer",
        "tests/test_matrix.py::test_strategy_single[beam3_n2-llama]",
    ),
)
def decode_trusts_replaced_views() -> None:
    """A decode step appends to the layer's buffers even after beam search replaced ``keys``/``values``."""
    from hf_prefix_cache.layers import PrefixFullLayer

    update = PrefixFullLayer.update

    def trusting(self, key_states, value_states, *args, **kwargs):
        buffer = self._key_buffer
        if buffer is not None and self.keys is not None and self.keys.shape[2] <= buffer.shape[2]:
            self._shown_keys, self._shown_values = self.keys, self.values
        return update(self, key_states, value_states, *args, **kwargs)

    PrefixFullLayer.update = trusting


@mutant(
    "decode_masks_off",
    breaks="decode steps of a CPU grouped-query SDPA call get a mask, so SDPA packs the query heads",
    tests=(
        f"{DECODE_MASKS}::test_cpu_grouped_query_decode_steps_take_the_packed_masked_path_and_stay_exact[llama]",
        f"{DECODE_MASKS}::test_beam_search_with_decode_masks_matches_no_cache",
    ),
)
def decode_masks_off() -> None:
    """Decode steps never get a mask: SDPA reads each K/V head once per query head (enable_gqa)."""
    replace_function("hf_prefix_cache.decode_masks", "wants_decode_masks", lambda original: lambda *a: False)


@mutant(
    "decode_masks_everywhere",
    breaks="decode masks only where they help: SDPA with grouped queries on the CPU",
    tests=(
        f"{DECODE_MASKS}::test_decode_masks_stay_off_where_they_do_not_help[eager]",
        f"{DECODE_MASKS}::test_decode_masks_stay_off_where_they_do_not_help[no_grouped_queries]",
    ),
)
def decode_masks_everywhere() -> None:
    """Every call gets decode masks, with eager attention and without grouped queries too."""
    replace_function("hf_prefix_cache.decode_masks", "wants_decode_masks", lambda original: lambda *a: True)


@mutant(
    "decode_masks_outside_calls",
    breaks="is_compileable is reported only during a call that wants decode masks, never under a compile_config",
    tests=(
        f"{DECODE_MASKS}::test_cpu_grouped_query_decode_steps_take_the_packed_masked_path_and_stay_exact[llama]",
        f"{DECODE_MASKS}::test_decode_masks_stay_off_where_they_do_not_help[compile_config]",
    ),
)
def decode_masks_outside_calls() -> None:
    """The cache reports is_compileable from its model alone, before, between and after calls too,
    and under a compile_config."""
    from hf_prefix_cache import PrefixCache
    from hf_prefix_cache.decode_masks import wants_decode_masks

    PrefixCache.is_compileable = property(
        lambda self: (
            self.store is not None
            and wants_decode_masks(self.model, {layout.device.type for layout in self.store.layouts})
        )
    )
