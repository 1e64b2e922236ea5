"""Mutants of issue 19, items 1 and 2: only calls whose K/V are a function of their token ids are served,
and commit() stores only the sequences of the call it prepared (tests/test_misuse_calls.py)."""

from __future__ import annotations

from mutants.base import mutant, replace_function

CALLS = "tests/test_misuse_calls.py"


@mutant(
    "calls_allow_list_lets_inputs_embeds_through",
    breaks="calls with inputs_embeds beside input_ids fall back and store nothing",
    tests=(
        f"{CALLS}::test_inputs_embeds_beside_input_ids_fall_back_instead_of_hitting_the_ids_blocks",
        f"{CALLS}::test_inputs_embeds_beside_input_ids_store_nothing_under_the_ids",
    ),
)
def allow_list_lets_inputs_embeds_through() -> None:
    """inputs_embeds beside input_ids is on the wrapper's allow-list."""
    from hf_prefix_cache import reasons

    reasons.SERVED_KWARGS = reasons.SERVED_KWARGS | {"inputs_embeds"}


@mutant(
    "calls_allow_list_off",
    breaks="position_ids and any kwarg outside the allow-list fall back and store nothing",
    tests=(
        f"{CALLS}::test_position_ids_fall_back_exactly",
        f"{CALLS}::test_position_ids_store_no_shifted_kv",
        f"{CALLS}::test_a_kwarg_outside_the_allow_list_falls_back_and_names_it",
    ),
)
def allow_list_off() -> None:
    """Any kwarg (position_ids, a model's forward kwargs...) is served."""
    replace_function("hf_prefix_cache.reasons", "unserved_kwargs", lambda original: lambda kwargs: None)


@mutant(
    "calls_custom_masks_served",
    breaks="a 4-D attention mask falls back to what generate() does without a cache",
    tests=(f"{CALLS}::test_a_4d_attention_mask_gets_what_generate_gives_without_a_cache",),
)
def custom_masks_served() -> None:
    """An attention_mask that is not [batch, length] like the prompt (a 4-D mask) is served."""

    def make(reason):
        def without_the_mask_check(cache, config, input_ids, kwargs):
            mask = kwargs.get("attention_mask")
            if mask is not None and mask.dim() != 2:
                kwargs = {k: v for k, v in kwargs.items() if k != "attention_mask"}
            return reason(cache, config, input_ids, kwargs)

        return without_the_mask_check

    replace_function("hf_prefix_cache.reasons", "call_fallback_reason", make)


@mutant(
    "calls_hidden_states_served",
    breaks="output_hidden_states / output_attentions fall back: they cover the whole prompt",
    tests=tuple(
        f"{CALLS}::test_hidden_states_and_attentions_cover_the_whole_prompt[{output}-{how}]"
        for output in ("hidden_states", "attentions")
        for how in ("kwargs", "generation_config")
    ),
)
def hidden_states_served() -> None:
    """The wrapper does not see output_hidden_states / output_attentions: hits serve them."""

    def make(effective_config):
        def blind(*args, **kwargs):
            config = effective_config(*args, **kwargs)
            config.output_hidden_states = config.output_attentions = False
            return config

        return blind

    replace_function("hf_prefix_cache.generation", "effective_config", make)


@mutant(
    "calls_reentry_passes_through",
    breaks="generate() re-entered with a cache mid-call on the same thread is refused",
    tests=(f"{CALLS}::test_generate_reentered_with_the_busy_cache_is_refused",),
)
def reentry_passes_through() -> None:
    """generate() re-entered from inside a call on the same cache runs on the outer call's layers."""
    replace_function("hf_prefix_cache.generation", "reentered", lambda original: lambda: False)


@mutant(
    "calls_peft_inner_call_refused",
    breaks="PeftModel.generate calling the wrapped base model's generate() is one call, not a re-entry",
    tests=("tests/test_peft.py::test_switching_adapters_is_exact_and_hits_stay_within_an_adapter[both]",),
)
def peft_inner_call_refused() -> None:
    """PeftModel.generate's own call of the wrapped base model's generate() is refused as a re-entry."""
    replace_function("hf_prefix_cache.generation", "reentered", lambda original: lambda: True)


@mutant(
    "calls_prepare_reentry_claimed",
    breaks="prepare() from inside a wrapped generate() on the same cache is refused",
    tests=(f"{CALLS}::test_prepare_from_inside_the_busy_cache_is_refused",),
)
def prepare_reentry_claimed() -> None:
    """prepare() from inside the wrapper's generate() on the same thread takes the call in flight over."""
    from hf_prefix_cache.call import Ownership

    claim = Ownership.claim

    def ignores_the_call_in_flight(self):
        generating, self.generating = self.generating, False
        try:
            claim(self)
        finally:
            self.generating = generating

    Ownership.claim = ignores_the_call_in_flight


@mutant(
    "calls_commit_skips_the_prompt_check",
    breaks="commit() refuses sequences that do not start with the prepared prompt",
    tests=(
        f"{CALLS}::test_commit_refuses_the_sequences_of_another_call",
        f"{CALLS}::test_commit_checks_rows_with_their_padding",
    ),
)
def commit_skips_the_prompt_check() -> None:
    """commit() stores the prepared prompt's blocks whatever sequences it is given."""
    replace_function("hf_prefix_cache.recording", "prompt_mismatch", lambda original: lambda *args: None)


@mutant(
    "calls_commit_ignores_padding",
    breaks="commit() checks each row's prompt with its left padding (where its tokens start)",
    tests=(f"{CALLS}::test_commit_checks_rows_with_their_padding",),
)
def commit_ignores_padding() -> None:
    """commit() compares only each row's real tokens, not where they start (its left padding)."""

    def make(prompt_mismatch):
        def real_tokens_only(call, sequences):
            rows = len(call.prompt_ids)
            if sequences.shape[0] % rows or sequences.shape[1] < call.width:
                return prompt_mismatch(call, sequences)
            per = sequences.shape[0] // rows
            for source, prompt in enumerate(sequences[:, : call.width].tolist()):
                row = call.rows[source // per]
                if prompt[row.pad :] != row.tokens:
                    return "another call"
            return None

        return real_tokens_only

    replace_function("hf_prefix_cache.recording", "prompt_mismatch", make)


@mutant(
    "calls_commit_wants_every_expanded_row",
    breaks="commit() accepts beam search's num_return_sequences < num_beams rows",
    tests=(
        f"{CALLS}::test_commit_accepts_expanded_and_beam_reordered_rows[False-beams_return_2]",
        f"{CALLS}::test_commit_accepts_expanded_and_beam_reordered_rows[True-beams_return_2]",
    ),
)
def commit_wants_every_expanded_row() -> None:
    """commit() refuses beam search's sequences when num_return_sequences < num_beams."""

    def make(prompt_mismatch):
        def strict(call, sequences):
            if sequences.shape[0] != len(call.prompt_ids) * call.expand:
                return "rows missing"
            return prompt_mismatch(call, sequences)

        return strict

    replace_function("hf_prefix_cache.recording", "prompt_mismatch", make)
