"""Compare greedy generate() with a PrefixCache against generate() without any cache (the simple checks;
the exactness suite's own are in ``support.assertions``)."""

from __future__ import annotations

import torch

from hf_prefix_cache import BlockStore, PrefixCache, PrefixCacheFallbackWarning
from hf_prefix_cache.compat import CACHE_KWARG

LOGIT_TOLERANCE = 1e-4  # fp32; measured differences are ~1e-6


def greedy(model, input_ids, attention_mask=None, max_new_tokens=8, **kwargs):
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return model.generate(
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )


def run(model, cache, ids, **kwargs):
    """Greedy generate() with ``cache``."""
    return greedy(model, ids, **{CACHE_KWARG: cache}, **kwargs)


def assert_same_output(expected, actual, tolerance: float = LOGIT_TOLERANCE) -> None:
    """Token-identical sequences and per-step logits within ``tolerance``."""
    assert torch.equal(expected.sequences, actual.sequences), (
        f"sequences differ:\n{expected.sequences}\n{actual.sequences}"
    )
    assert len(expected.logits) == len(actual.logits)
    worst = max((a - b).abs().max().item() for a, b in zip(expected.logits, actual.logits))
    assert worst <= tolerance, f"max |logit diff| {worst:.3g} > {tolerance}"


class PrefillRecorder:
    """A forward pre-hook recording how many tokens each forward pass was fed."""

    def __init__(self, model):
        self.lengths: list[int] = []
        self._handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self.lengths.append(input_ids.shape[1])

    def clear(self) -> None:
        self.lengths.clear()

    @property
    def prefill(self) -> int:
        return self.lengths[0]

    def remove(self) -> None:
        self._handle.remove()


def assert_store_not_poisoned(model, store: BlockStore, prompt: torch.Tensor, **kwargs) -> None:
    """A fresh view's correct call equals plain generate() and reuses what is stored; nothing is pinned."""
    view = PrefixCache(model, store=store)
    expected, actual = greedy(model, prompt, **kwargs), run(model, view, prompt, **kwargs)
    assert_same_output(expected, actual)
    assert view.last_call.hit_tokens > 0  # the check reads the store, so poisoned K/V would show
    assert store.pool.num_referenced == 0


def fallback_warnings(record) -> list:
    """The PrefixCacheFallbackWarning entries of a ``warnings.catch_warnings(record=True)`` list."""
    return [w for w in record if issubclass(w.category, PrefixCacheFallbackWarning)]
