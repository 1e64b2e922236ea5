"""Every reason a model or a call recomputes without the store, or the store refuses a call's K/V.

Models whose K/V or attention do not fit per-token blocks computed causally at fixed positions get plain
recomputation instead of garbage (``unsupported_reason``: recurrent / linear-attention state,
bidirectional prompt attention, RoPE whose frequencies depend on the current length, encoder-decoders).
A call falls back when its K/V would not be a function of its token ids (``call_fallback_reason``), or
computes off the model's default (``off_default``); the store refuses K/V it cannot vouch for
(``unstorable``). A new reason belongs here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import GenerationMode

from .compat import CACHE_KWARGS


class PrefixCacheFallbackWarning(UserWarning):
    """The cache is recomputing everything instead of reusing a prefix, and says why."""


BUSY = (
    "this PrefixCache is serving another call (on another thread, or the generate() this call was made "
    "from); one PrefixCache serves one call at a time: give each thread or nested call its own view, "
    "PrefixCache(model, store=cache.store) (views share every stored block)"
)
UNPREPARED = (
    "generate() got a PrefixCache that did not look its prompt up: the generate() wrapper was removed "
    "(hf_prefix_cache.uninstall) or never installed (install=False), and K/V of an earlier call would carry "
    "into this one; call hf_prefix_cache.install(model) again, or cache.prepare(input_ids, attention_mask) "
    "before generate() and cache.commit(out.sequences) after it"
)
MERGED = (
    "generate() of a {running} got a PrefixCache made for the PEFT model {mine} that wrapped it: after "
    "merge_and_unload() or unload() the merged model is a model of its own (other weights, other K/V, no "
    "generate() wrapper). Make a cache for it that shares the stored blocks: PrefixCache(merged, "
    "store=cache.store)"
)
REUSE_OFF = "prefix reuse is off for this model: {}; it will be recomputed every call"
UNDER_AUTOCAST = "it ran under torch.autocast, whose K/V differ from what the model computes without it"
NOT_LEFT_PADDED = "the prompt holds pad tokens that are not left padding and no attention_mask was given"
STALE = "the model's dtype or device changed after this PrefixCache was made; create a new one"

EXACT_MODES = {
    GenerationMode.GREEDY_SEARCH,
    GenerationMode.SAMPLE,
    GenerationMode.BEAM_SEARCH,
    GenerationMode.BEAM_SAMPLE,
}
ASSISTED_KWARGS = (
    "assistant_model",
    "prompt_lookup_num_tokens",
    "assistant_early_exit",
    "assistant_tokenizer",
)
# kwargs with a fallback reason of their own: call_fallback_reason, and config_reason for the
# GenerationConfig fields (checked wherever they were set: kwargs, a generation_config, the model's)
CHECKED_KWARGS = (
    *ASSISTED_KWARGS,
    "custom_generate",
    "output_hidden_states",
    "output_attentions",
    "token_healing",
    "cache_implementation",
    "continuous_batching_config",
)
# The generate() kwargs a served call may carry: each either never reaches the model's forward or reaches
# it without changing K/V, so the K/V of a call are a function of its token ids (and the namespace). Any
# other kwarg that is not None (inputs_embeds, position_ids, token_type_ids, PEFT adapter_names, a model's
# own forward kwargs...) falls back.
SERVED_KWARGS = frozenset(
    {
        # the prompt, its 2-D left-padded mask (checked) and the cache
        "inputs",
        "input_ids",
        "attention_mask",
        *CACHE_KWARGS,
        # generate() parameters that act on logits, stopping or the loop only
        "generation_config",
        "logits_processor",
        "stopping_criteria",
        "prefix_allowed_tokens_fn",
        "synced_gpus",
        "streamer",
        "tokenizer",  # stop_strings
        "priority",  # the cache's retention priority: the wrapper takes it out before generate() runs
        "trust_remote_code",  # only read with a Hub custom_generate, which falls back
        # classifier-free guidance: the unconditional forward runs on a cache of its own
        "negative_prompt_ids",
        "negative_prompt_attention_mask",
        "guidance_scale",
        # lengths and stopping
        "max_length",
        "max_new_tokens",
        "min_length",
        "min_new_tokens",
        "early_stopping",
        "max_time",
        "stop_strings",
        # decoding mode (modes other than greedy/sampling/beams fall back by get_generation_mode)
        "do_sample",
        "num_beams",
        "num_return_sequences",
        "num_beam_groups",
        "penalty_alpha",
        "dola_layers",
        "use_cache",  # False falls back
        "prefill_chunk_size",  # chunks the prefill of the computed part; exact (tests/test_matrix.py)
        "compile_config",
        "disable_compile",
        "cache_config",  # read only to build a cache; a PrefixCache is given
        "max_cache_len",
        # logits processing
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "top_h",
        "typical_p",
        "epsilon_cutoff",
        "eta_cutoff",
        "diversity_penalty",
        "repetition_penalty",
        "encoder_repetition_penalty",
        "length_penalty",
        "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size",
        "bad_words_ids",
        "force_words_ids",
        "constraints",
        "renormalize_logits",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "remove_invalid_values",
        "exponential_decay_length_penalty",
        "suppress_tokens",
        "begin_suppress_tokens",
        "sequence_bias",
        "watermarking_config",
        # special tokens (pad_token_id feeds the inferred mask, checked)
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "decoder_start_token_id",
        # outputs that do not depend on how the prompt's K/V were obtained
        "return_dict_in_generate",
        "output_scores",
        "output_logits",
    }
)


# -- the model ------------------------------------------------------------------------------------------
SERVABLE_LAYER_TYPES = {"full_attention", "sliding_attention"}
# recurrent state (served through snapshots, checkpoints.py) and layers that keep nothing
STATEFUL_LAYER_TYPES = {"linear_attention", "conv", "hybrid"}
EMPTY_LAYER_TYPES = {"dummy", "moe", "mlp"}
# Mamba1's selective scan takes no initial state: a prefill after a restored state ignores it
NO_INITIAL_STATE = {"jamba", "mamba", "falcon_mamba"}
LENGTH_DEPENDENT_ROPE = {"dynamic", "longrope"}


def unsupported_reason(model: Any) -> str | None:
    """Why prefix reuse would not be exact for ``model``, or None when it is supported."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    if hasattr(config, "vision_config") or hasattr(config, "audio_config"):
        return "multimodal models are not supported (media tokens may attend bidirectionally)"
    text = config.get_text_config(decoder=True)
    if getattr(text, "use_bidirectional_attention", False):
        return "the model attends bidirectionally over the prompt (use_bidirectional_attention)"
    layer_types = list(getattr(text, "layer_types", None) or ())
    for layer_type in layer_types:
        if layer_type in STATEFUL_LAYER_TYPES and getattr(text, "model_type", None) in NO_INITIAL_STATE:
            return (
                f"layer type {layer_type!r} of {text.model_type} (a Mamba1 scan) cannot continue from a "
                "stored state, so its state cannot be restored exactly"
            )
        if layer_type not in SERVABLE_LAYER_TYPES | STATEFUL_LAYER_TYPES | EMPTY_LAYER_TYPES:
            return f"layer type {layer_type!r} keeps state that token blocks cannot reproduce"
    if layer_types and not any(t in SERVABLE_LAYER_TYPES or t == "hybrid" for t in layer_types):
        return "the model has no attention layer (a pure state-space model): nothing to place a prefix in"
    for rope_type in _rope_types(text):
        if rope_type in LENGTH_DEPENDENT_ROPE:
            return f"RoPE type {rope_type!r} depends on the current sequence length"
    return None


def _rope_types(config: Any) -> Iterator[str]:
    for name in ("rope_parameters", "rope_scaling"):
        yield from _find_rope_types(getattr(config, name, None))


def _find_rope_types(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("rope_type", "type") and isinstance(item, str):
                yield item
            else:
                yield from _find_rope_types(item)


# -- one call ----------------------------------------------------------------------------------------------
def call_fallback_reason(cache, config: GenerationConfig, input_ids, kwargs: dict) -> str | None:
    if config.use_cache is False:
        return "use_cache=False computes every step without a cache, so nothing can be reused or stored"
    if cache.store is None:
        return None  # the whole model falls back; the cache acts as a plain DynamicCache
    if (stale := cache.stale_reason()) is not None:
        return stale
    if any(kwargs.get(k) is not None for k in ASSISTED_KWARGS):
        return "assisted / speculative decoding is not supported"
    if input_ids is None:
        return "calls without input_ids (inputs_embeds only) cannot be matched to stored tokens"
    if (unserved := unserved_kwargs(kwargs)) is not None:
        return unserved
    if (configured := config_reason(config)) is not None:
        return configured
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.dim() != 2
        or input_ids.dtype
        not in (
            torch.long,
            torch.int,
        )
    ):
        return "inputs other than a [batch, length] tensor of token ids are not supported"
    mask = kwargs.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != input_ids.shape):
        return (
            "an attention_mask other than a [batch, length] mask of the prompt (a 4-D or custom mask) "
            "changes the K/V"
        )
    mode = config.get_generation_mode()
    if mode not in EXACT_MODES:
        return f"generation mode {mode.value!r} is not supported"
    if kwargs.get("custom_generate") is not None:
        return "custom_generate runs its own decoding loop, whose use of the cache cannot be verified"
    return None


def unserved_kwargs(kwargs: dict) -> str | None:
    """Why kwargs outside the allow-list (SERVED_KWARGS) keep this call from the store: they may reach the
    model's forward and change K/V that the store would file under the call's token ids."""
    unserved = sorted(
        k for k, v in kwargs.items() if v is not None and k not in SERVED_KWARGS and k not in CHECKED_KWARGS
    )
    if not unserved:
        return None
    return (
        f"{', '.join(unserved)} may reach the model's forward and change the K/V, which would then not be "
        "a function of the token ids"
    )


def config_reason(config: GenerationConfig) -> str | None:
    """Why the generation config (from kwargs, a generation_config or the model's) keeps this call from
    the store, wherever the fields were set."""
    if config.output_hidden_states or config.output_attentions:
        return (
            "output_hidden_states / output_attentions would cover only the prompt positions this call "
            "computes, not the prefix reused from the store"
        )
    if getattr(config, "token_healing", False):
        return "token_healing rewrites the end of the prompt after it was looked up"
    if getattr(config, "cache_implementation", None) not in (None, "hybrid"):  # generate() drops "hybrid"
        return f"cache_implementation={config.cache_implementation!r} asks generate() for a cache of its own"
    if getattr(config, "continuous_batching_config", None) is not None:
        return "continuous batching runs on a paged cache of its own"
    return None


def off_default(model: torch.nn.Module, device_types: set[str]) -> str | None:
    """Why K/V computed now on ``device_types`` would differ from those the model computes by default
    (and the store holds): under autocast values come out in bf16; in training mode dropout changes
    hidden states."""
    if any(torch.is_autocast_enabled(device) for device in device_types):
        return UNDER_AUTOCAST
    if model.training:  # model.train(); a single fresh submodule in training mode is no sign
        return "the model is in training mode, where dropout changes the K/V; call model.eval()"
    return None


def unstorable(call: Any, slots: int | str, sequences, verified: bool, namespace: str) -> str | None:
    """Why the captured K/V must not be stored: a block is stored only from a call this cache prepared
    (``verified``: its K/V were seen coming from the cache's model), in the ``namespace`` it looked up in,
    with exactly the slots that the prompt and the reply imply."""
    if isinstance(slots, str):
        return slots
    if slots == call.loaded:
        return None  # nothing was computed: nothing to store, nothing wrong
    if not verified:
        return "no K/V of this call were seen coming from the model this cache was made for"
    if call.off_default:
        return call.off_default
    if sequences is not None and slots != sequences.shape[1] - 1:
        return (
            f"the layers hold {slots} slots but prompt and reply imply {sequences.shape[1] - 1} (a call with "
            "use_cache=False, another model, or K/V from outside this call)"
        )
    if slots < call.width:
        return f"the layers hold {slots} slots, fewer than the {call.width} of the prompt"
    if namespace != call.namespace:
        return "the model's weights or active adapters changed during the call"
    return None
