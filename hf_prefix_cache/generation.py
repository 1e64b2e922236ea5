"""The one wrapped ``generate()``: per-call fallbacks, then prepare -> generate -> commit on the cache.

``generate()`` never shows a cache its ``input_ids`` before the prefill, so something must look the prompt
up first. The wrapper is installed once per model (idempotent), acts only when a ``PrefixCache`` is
passed or, for calls that pass no cache, when the model is attached (attachment.py), and ``uninstall``
removes it. Users who want no patching call ``prepare``/``commit`` themselves.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from transformers import GenerationConfig

from .call import inside_generate
from .compat import CACHE_KWARGS
from .prompt_rows import is_left_padded
from .reasons import BUSY, NOT_LEFT_PADDED, call_fallback_reason

_MARK = "_hf_prefix_cache_original"
# the model's Attachment (attachment.py): it serves the calls that pass no cache
ATTACHED = "_hf_prefix_cache_attached"
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


class Served:
    """What the wrapper needs of a cache (``PrefixCache`` is one): it recognises caches by this class, so
    that it never imports the cache module."""

    model: torch.nn.Module
    store: Any

    def generating_here(self) -> bool:
        """Whether this cache serves a wrapped generate() on this thread now."""
        raise NotImplementedError

    def recompute_call(self, reason: str, input_ids) -> None:
        """Say (once) why this call recomputes without the store, and count it."""
        raise NotImplementedError

    def start_generate(self, decode_masks: bool) -> None:
        """The prepared call's generate() starts (``decode_masks=False``: no decode-step masks)."""
        raise NotImplementedError

    def release_if_mine(self) -> None:
        """Release the call in flight if this thread serves it."""
        raise NotImplementedError


def install(model: torch.nn.Module) -> None:
    """Wrap ``model.generate`` once; a no-op when already wrapped."""
    if getattr(model.generate, _MARK, None) is not None:
        return
    original = model.generate

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any):
        cache = next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
        if cache is None and (attachment := model.__dict__.get(ATTACHED)) is not None:
            return attachment.generate(original, args, kwargs)
        if not isinstance(cache, Served):
            return original(*args, **kwargs)
        if cache.generating_here():
            if reentered():
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


def reentered() -> bool:
    """Whether a generate() given a cache that is mid-call on this thread comes from inside that call.

    PEFT's ``PeftModel.generate`` calls the (wrapped) base model's ``generate`` with the same cache before
    transformers' ``generate()`` started: that inner call is the outer one and passes. From inside
    transformers' ``generate()`` (a logits processor, a stopping criterion, a streamer) a second call would
    compute into the outer call's layers: both outputs would be wrong."""
    return inside_generate()


def run_generate(cache, original, args: tuple, kwargs: dict):
    """One ``generate()`` call through ``cache``: prepare, generate, commit; release on any exception.

    ``priority=`` is the cache's (``prepare(priority=...)``), not generate()'s: it is taken out first."""
    priority = kwargs.pop("priority", None)
    if cache.store is None:
        # The whole model falls back (warned once, up front). generate() builds the cache the model needs:
        # a plain DynamicCache handed to an encoder-decoder would serve cross-attention K/V as self-attention.
        return original(*args, **{k: v for k, v in kwargs.items() if k not in CACHE_KWARGS})
    config = effective_config(cache.model, args, kwargs)
    input_ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    named = {**dict(zip(GENERATE_PARAMETERS, args)), **kwargs}
    if len(args) > len(GENERATE_PARAMETERS):
        named["<positional arguments>"] = args[len(GENERATE_PARAMETERS) :]
    reason = call_fallback_reason(cache, config, input_ids, named)
    attention_mask = kwargs.get("attention_mask")
    if reason is None and attention_mask is None:
        attention_mask = _inferred_mask(input_ids, config)
        if attention_mask is not None and not is_left_padded(attention_mask):
            reason = NOT_LEFT_PADDED
    if reason is not None:
        cache.recompute_call(reason, input_ids)
        for key in CACHE_KWARGS:
            kwargs.pop(key, None)
        return original(*args, **kwargs)
    expand = max(config.num_beams or 1, config.num_return_sequences or 1)
    new_tokens = config.max_new_tokens or max(0, (config.max_length or 0) - input_ids.shape[-1])
    try:  # prepare inside: an interrupt right after it returns still releases what it took
        cache.prepare(
            input_ids, attention_mask, num_expand=expand, max_new_tokens=new_tokens, priority=priority
        )
        # reported as compileable under a compile_config, generate() would compile the forward
        cache.start_generate(decode_masks=config.compile_config is None)
        output = original(*args, **kwargs)
        sequences = output if isinstance(output, torch.Tensor) else getattr(output, "sequences", None)
        cache.commit(sequences, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    except BaseException:
        cache.release_if_mine()
        raise
    return output


def effective_config(model, args: tuple, kwargs: dict) -> GenerationConfig:
    base = kwargs.get("generation_config")
    if base is None and len(args) > 1 and isinstance(args[1], GenerationConfig):
        base = args[1]
    config = copy.deepcopy(base if base is not None else model.generation_config)
    config.update(**{k: v for k, v in kwargs.items() if hasattr(config, k) and k not in CACHE_KWARGS})
    return config


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
