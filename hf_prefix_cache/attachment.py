"""Zero-code use: ``attach(model)`` sends every ``generate()`` that brings no cache through one store.

Libraries on top of transformers (smolagents' ``TransformersModel``, ``pipeline("text-generation")``,
lm-eval's ``hf`` model) call ``model.generate`` themselves and never pass a cache. While a model is
attached, the ``generate()`` wrapper (generation.py) hands such calls to its ``Attachment``, which
checks a view of the store out for the call (views.py), so calls on several threads at once each get
their own view. An explicit ``cache=`` / ``past_key_values=`` always wins (a ``PrefixCache`` follows its
own path, any other cache is left alone), and calls that want no cache or one of their own go through
plain ``generate()`` untouched. A ``generate()`` started from inside an attached call on the same thread
(a logits processor, a stopping criterion, a streamer) runs plain: the outer call's view holds its layers.
"""

from __future__ import annotations

import logging
import threading
import warnings
from typing import Any

import torch

from .cache import PrefixCache
from .compat import CACHE_KWARG
from .generation import ATTACHED, GENERATE_PARAMETERS, effective_config, is_installed, run_generate, uninstall
from .reasons import ASSISTED_KWARGS, PrefixCacheFallbackWarning
from .views import SummedCounters, ViewPool

logger = logging.getLogger(__name__)

REPLACED = (
    "hf_prefix_cache.attach: this {model} was already attached; the new attachment (a new store) "
    "replaces the first one. Call detach(model) first to silence this"
)


class Attachment:
    """What ``attach`` leaves on a model: the cache it returned, the views that serve calls, and whether
    the ``generate()`` wrapper was there before (``detach`` then leaves it)."""

    def __init__(self, cache: PrefixCache, was_installed: bool):
        self.cache = cache
        self.was_installed = was_installed
        self.pool = ViewPool(self._new_view, self._retire)
        self._local = threading.local()  # .active: an attached call is in flight on this thread
        if cache.store is not None:
            cache.counters = SummedCounters(cache.store, self.pool)

    def _retire(self, view: PrefixCache) -> None:
        if isinstance(self.cache.counters, SummedCounters):
            self.cache.counters.retire(view)

    def _new_view(self) -> PrefixCache:
        cache = self.cache
        return PrefixCache(
            cache.model, store=cache.store, cache_salt=cache.cache_salt, extra_keys=cache.extra_keys
        )

    def generate(self, original, args: tuple, kwargs: dict):
        """One ``generate()`` that brought no cache: through a view of the store, or plain when it must."""
        if (
            getattr(self._local, "active", False)
            or self.cache.store is None
            or leave_alone(self.cache, args, kwargs)
        ):
            return original(*args, **kwargs)
        view = self.pool.checkout()
        self._local.active = True
        try:
            return run_generate(view, original, args, {**kwargs, CACHE_KWARG: view})
        finally:
            self._local.active = False
            self.cache.counters.last_call = view.last_call
            self.pool.checkin(view)


def leave_alone(cache: PrefixCache, args: tuple, kwargs: dict) -> bool:
    """Calls that get plain ``generate()`` without a word: they ask for no cache (``use_cache=False``),
    for one of their own (``cache_implementation``; generate() refuses it beside a cache), decode with an
    assistant or a custom loop, or bring no token ids; or the model changed dtype or device (stale)."""
    named = {**dict(zip(GENERATE_PARAMETERS, args)), **kwargs}
    if any(named.get(k) is not None for k in (*ASSISTED_KWARGS, "custom_generate")):
        return True
    if named.get("inputs", named.get("input_ids")) is None:
        return True
    config = effective_config(cache.model, args, kwargs)
    if config.use_cache is False or getattr(config, "cache_implementation", None) not in (None, "hybrid"):
        return True
    if (stale := cache.stale_reason()) is not None:
        cache.warn_once(f"hf_prefix_cache.attach: {stale}; calls run plain generate()", key="attach-stale")
        return True
    return False


def attach(model: torch.nn.Module, **kwargs: Any) -> PrefixCache:
    """Serve every ``generate()`` on ``model`` that passes no cache through one block store; returns its
    ``PrefixCache`` (takes ``PrefixCache``'s keyword arguments: ``block_size``, ``max_memory``, tiers...).

    Its ``stats`` sum the calls of every thread's view; ``last_call`` is the last call that ended. A model
    that cannot be served warns once (``PrefixCacheFallbackWarning``) and keeps plain ``generate()``.
    Attaching again replaces the first attachment (and its store), with a warning. ``detach`` undoes it.
    """
    if kwargs.get("install", True) is not True:
        raise TypeError(
            "attach() needs the generate() wrapper: drop install=False (use PrefixCache for that)"
        )
    previous = model.__dict__.get(ATTACHED)
    if previous is not None:
        warnings.warn(REPLACED.format(model=type(model).__name__), PrefixCacheFallbackWarning, stacklevel=2)
        detach(model)
    was_installed = is_installed(model)
    cache = PrefixCache(model, **kwargs)
    setattr(model, ATTACHED, Attachment(cache, was_installed))
    logger.info("attached a PrefixCache to %s: %s", type(model).__name__, cache.stats)
    return cache


def detach(model: torch.nn.Module) -> PrefixCache | None:
    """Stop serving ``model``'s cache-less calls; returns the detached cache (None if none was attached).

    The ``generate()`` wrapper goes too unless it was installed before ``attach`` (a ``PrefixCache`` made
    earlier needs it). Calls in flight on other threads finish with their view; then the views go (the
    returned cache keeps their counters in its stats)."""
    attachment = model.__dict__.pop(ATTACHED, None)
    if attachment is None:
        return None
    if not attachment.was_installed:
        uninstall(model)
    attachment.pool.close()
    return attachment.cache


def attached(model: torch.nn.Module) -> PrefixCache | None:
    """The cache ``attach`` returned for ``model``, or None."""
    attachment = model.__dict__.get(ATTACHED)
    return attachment.cache if attachment is not None else None
