"""The optional wrapper that makes ``model.generate(..., past_key_values=cache)`` reuse prefixes.

``generate()`` never shows a cache its ``input_ids`` before the prefill, so something must look the prompt
up first. The wrapper is installed once per model (idempotent), acts only when a ``PrefixCache`` is
passed, and ``uninstall`` removes it. Users who want no patching call ``prepare``/``commit`` themselves.
"""

from __future__ import annotations

import copy
import functools
import threading
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import GenerationMode

from .compat import CACHE_KWARGS
from .prompt_rows import is_left_padded

_MARK = "_hf_prefix_cache_original"
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
# kwargs with a fallback reason of their own: _call_fallback_reason, and _config_reason for the
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
# generate()'s own parameters, in order: what positional arguments after the prompt stand for
GENERATE_PARAMETERS = (
    "inputs",
    "generation_config",
    "logits_processor",
    "stopping_criteria",
    "prefix_allowed_tokens_fn",
    "synced_gpus",
    "assistant_model",
    "streamer",
    "negative_prompt_ids",
    "negative_prompt_attention_mask",
    "custom_generate",
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


def install(model: torch.nn.Module) -> None:
    """Wrap ``model.generate`` once; a no-op when already wrapped."""
    if getattr(model.generate, _MARK, None) is not None:
        return
    original = model.generate

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any):
        cache = next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
        from .cache import BUSY, PrefixCache

        if not isinstance(cache, PrefixCache):
            return original(*args, **kwargs)
        if cache._generating and cache._owner == threading.get_ident():
            if _reentered():
                raise RuntimeError(BUSY)  # as from another thread: the call in flight holds the layers
            return original(*args, **kwargs)  # a wrapped generate() inside another (PEFT): already prepared
        check_model(cache, model)
        return run_generate(cache, original, args, kwargs)

    setattr(generate, _MARK, original)
    model.generate = generate


def uninstall(model: torch.nn.Module) -> bool:
    """Remove the wrapper; returns whether one was installed."""
    if getattr(model.__dict__.get("generate"), _MARK, None) is None:
        return False
    del model.__dict__["generate"]
    return True


def is_installed(model: torch.nn.Module) -> bool:
    return getattr(model.generate, _MARK, None) is not None


def check_model(cache, model: torch.nn.Module) -> None:
    """Refuse a cache made for another model: its namespace, layouts and stored K/V belong to that one.

    A PEFT model and the base model inside it are one network (the cache may wrap either)."""
    mine = cache.model
    if mine is model or any(m is model for m in mine.modules()) or any(m is mine for m in model.modules()):
        return
    raise ValueError(
        f"this PrefixCache was made for another model ({type(mine).__name__} at {id(mine):#x}), not for the "
        f"{type(model).__name__} at {id(model):#x} whose generate() got it; K/V of one model are wrong for "
        "another. Make a cache per model: PrefixCache(model) (or PrefixCache(model, store=...) to share a "
        "store between views of that model)"
    )


def _reentered() -> bool:
    """Whether a generate() given a cache that is mid-call on this thread comes from inside that call.

    PEFT's ``PeftModel.generate`` calls the (wrapped) base model's ``generate`` with the same cache before
    transformers' ``generate()`` started: that inner call is the outer one and passes. From inside
    transformers' ``generate()`` (a logits processor, a stopping criterion, a streamer) a second call would
    compute into the outer call's layers: both outputs would be wrong."""
    from .cache import _inside_generate

    return _inside_generate()


def run_generate(cache, original, args: tuple, kwargs: dict):
    """One ``generate()`` call through ``cache``: prepare, generate, commit; release on any exception."""
    if cache.store is None:
        # The whole model falls back (warned once, up front). generate() builds the cache the model needs:
        # a plain DynamicCache handed to an encoder-decoder would serve cross-attention K/V as self-attention.
        return original(*args, **{k: v for k, v in kwargs.items() if k not in CACHE_KWARGS})
    config = _effective_config(cache.model, args, kwargs)
    input_ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    named = {**dict(zip(GENERATE_PARAMETERS, args)), **kwargs}
    if len(args) > len(GENERATE_PARAMETERS):
        named["<positional arguments>"] = args[len(GENERATE_PARAMETERS) :]
    reason = _call_fallback_reason(cache, config, input_ids, named)
    attention_mask = kwargs.get("attention_mask")
    if reason is None and attention_mask is None:
        attention_mask = _inferred_mask(input_ids, config)
        if attention_mask is not None and not is_left_padded(attention_mask):
            reason = "the prompt holds pad tokens that are not left padding and no attention_mask was given"
    if reason is not None:
        cache._warn(f"PrefixCache: {reason}; this call recomputes the whole prompt without the cache")
        cache._count_fallback(input_ids)
        for key in CACHE_KWARGS:
            kwargs.pop(key, None)
        return original(*args, **kwargs)
    expand = max(config.num_beams or 1, config.num_return_sequences or 1)
    new_tokens = config.max_new_tokens or max(0, (config.max_length or 0) - input_ids.shape[-1])
    try:  # prepare inside: an interrupt right after it returns still releases what it took
        cache.prepare(input_ids, attention_mask, num_expand=expand, max_new_tokens=new_tokens)
        if config.compile_config is not None and cache._call is not None:
            cache._call.decode_masks = False  # reported as compileable, generate() would compile the forward
        cache._generating = True
        output = original(*args, **kwargs)
        sequences = output if isinstance(output, torch.Tensor) else getattr(output, "sequences", None)
        cache.commit(sequences, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    except BaseException:
        cache._release_if_mine()
        raise
    return output


def _effective_config(model, args: tuple, kwargs: dict) -> GenerationConfig:
    base = kwargs.get("generation_config")
    if base is None and len(args) > 1 and isinstance(args[1], GenerationConfig):
        base = args[1]
    config = copy.deepcopy(base if base is not None else model.generation_config)
    config.update(**{k: v for k, v in kwargs.items() if hasattr(config, k) and k not in CACHE_KWARGS})
    return config


def _call_fallback_reason(cache, config: GenerationConfig, input_ids, kwargs: dict) -> str | None:
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
    if (unserved := _unserved_kwargs(kwargs)) is not None:
        return unserved
    if (config_reason := _config_reason(config)) is not None:
        return config_reason
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


def _unserved_kwargs(kwargs: dict) -> str | None:
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


def _config_reason(config: GenerationConfig) -> str | None:
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


def _inferred_mask(input_ids: torch.Tensor, config: GenerationConfig) -> torch.Tensor | None:
    """The mask generate() infers from pad tokens when none is given (pad present and not EOS)."""
    pad = config.pad_token_id
    if pad is None:
        return None
    eos = config.eos_token_id
    eos = eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
    if pad in eos or not bool((input_ids == pad).any()):
        return None
    return input_ids.ne(pad).long()
