"""Mutants of construction (issue 11 follow-up): the layout predicted from the config without a forward
pass, confirmed (or replaced) by the first call, remembered for the unchanged model, probed again when it
changed."""

from __future__ import annotations

from mutants.base import mutant, replace_function

CONSTRUCTION = "tests/test_construction.py"


@mutant(
    "probe_reused_after_a_change",
    breaks="the probe runs again after a cast, a config edit or a replaced tensor",
    tests=(
        "tests/test_construction.py::test_the_probe_runs_again_after_the_model_changed_and_the_new_cache_is_exact[llama-cast_to_float64]",
        "tests/test_construction.py::test_the_probe_runs_again_after_the_model_changed_and_the_new_cache_is_exact[mistral-shrink_the_window]",
        "tests/test_construction.py::test_the_probe_runs_again_after_the_model_changed_and_the_new_cache_is_exact[llama-replace_a_projection]",
    ),
)
def probe_reused_after_a_change() -> None:
    """A kept probe result is served for a model that was cast, edited or had a tensor replaced since."""
    from hf_prefix_cache import layout

    layout._Probed.still_valid = lambda self, tensors, fingerprint: True


@mutant(
    "probe_never_reused",
    breaks="an unchanged model is probed once, however many caches are made for it",
    tests=("tests/test_construction.py::test_caches_with_tiers_probe_once_per_unchanged_model",),
)
def probe_never_reused() -> None:
    """Every PrefixCache runs the probe forward again, even for an unchanged model."""
    from hf_prefix_cache import layout

    layout._Probed.still_valid = lambda self, tensors, fingerprint: False


@mutant(
    "construction_probes",
    breaks="a new PrefixCache reads the layout from the config instead of running a forward pass",
    tests=(
        f"{CONSTRUCTION}::test_a_new_cache_runs_no_forward_and_its_first_call_confirms_the_predicted_layout[llama]",
        f"{CONSTRUCTION}::test_a_new_cache_runs_no_forward_and_its_first_call_confirms_the_predicted_layout[gemma3]",
    ),
)
def construction_probes() -> None:
    """No layout is predicted from the config: every new PrefixCache runs the probe forward."""
    replace_function("hf_prefix_cache.layout", "predict_layout", lambda original: lambda model: None)


@mutant(
    "confirmed_layout_forgotten",
    breaks="a layout a call confirmed serves later caches on the unchanged model",
    tests=(f"{CONSTRUCTION}::test_a_second_cache_on_a_confirmed_model_is_confirmed_without_a_forward",),
)
def confirmed_layout_forgotten() -> None:
    """The layout a first call confirmed is not kept: the next cache on the model starts unconfirmed."""
    replace_function("hf_prefix_cache.layout", "remember_layout", lambda original: lambda model, result: None)


@mutant(
    "prediction_kept_when_wrong",
    breaks="a wrong prediction is replaced by the probe's layout (and the pool resized) before anything is stored",
    tests=(
        f"{CONSTRUCTION}::test_a_wrong_prediction_is_replaced_by_the_probe_before_anything_is_stored[dtype-max_memory]",
        f"{CONSTRUCTION}::test_a_wrong_prediction_is_replaced_by_the_probe_before_anything_is_stored[head_dim-num_blocks]",
    ),
)
def prediction_kept_when_wrong() -> None:
    """The first call confirms whatever the config predicted, without remaking the pool for the truth."""
    from hf_prefix_cache.store import BlockStore

    def confirm(self, layouts):
        self.confirmed = True
        return None

    BlockStore.confirm = confirm


@mutant(
    "calls_not_checked_against_the_layout",
    breaks="only K/V of the store's confirmed layout are stored",
    tests=(
        f"{CONSTRUCTION}::test_a_new_cache_runs_no_forward_and_its_first_call_confirms_the_predicted_layout[qwen2]",
        f"{CONSTRUCTION}::test_a_wrong_prediction_is_replaced_by_the_probe_before_anything_is_stored[dtype-num_blocks]",
    ),
)
def calls_not_checked_against_the_layout() -> None:
    """Committed K/V are stored whatever their layout, and a predicted layout is never confirmed."""
    replace_function("hf_prefix_cache.call", "layout_problem", lambda original: lambda *args: (None, False))
