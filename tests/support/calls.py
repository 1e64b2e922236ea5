"""One compared call: generate() once without and once with a PrefixCache, recording what was fed.

Nothing is asserted here (see ``support.assertions`` and ``support.oracle``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_prefix_cache import PrefixCache

GEN = dict(output_logits=True, output_scores=True, return_dict_in_generate=True)  # scores: beam replay


class ForwardLog:
    """A forward pre-hook on the top model: how many new tokens each forward() was fed."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.lengths: list[int] = []
        self.batches: list[int] = []
        self._handle = None

    def _hook(self, module, args, kwargs):
        tokens = kwargs.get("input_ids")
        if tokens is None and args:
            tokens = args[0]
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        self.lengths.append(int(tokens.shape[1]))
        self.batches.append(int(tokens.shape[0]))

    def __enter__(self) -> ForwardLog:
        self._handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def real_tokens(ids: torch.Tensor, mask: torch.Tensor | None) -> list[list[int]]:
    """Each row's tokens without its left padding."""
    if mask is None:
        return ids.tolist()
    return [[t for t, m in zip(r, mr) if m] for r, mr in zip(ids.tolist(), mask.tolist())]


@dataclass
class Outcome:
    ref: Any
    out: Any
    forwards: list[int]
    hit_tokens: int
    width: int
    rows: list[list[int]]
    ref_extras: dict = field(default_factory=dict)
    out_extras: dict = field(default_factory=dict)


def compare(
    model,
    cache: PrefixCache,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    seed: int | None = None,
    fresh: Callable[[], dict] | None = None,
    cache_kw: str = "cache",
    pass_mask: bool = True,
    **kwargs,
) -> Outcome:
    """generate() once without and once with ``cache`` (same seed, same inputs); nothing asserted yet.

    ``fresh`` makes the per-run stateful kwargs (streamers, stopping criteria) so both runs get their own.
    """
    mask_kw = {"attention_mask": attention_mask} if (attention_mask is not None and pass_mask) else {}
    ref_extras = fresh() if fresh else {}
    out_extras = fresh() if fresh else {}
    if seed is not None:
        torch.manual_seed(seed)
    ref = model.generate(input_ids, **mask_kw, **GEN, **kwargs, **ref_extras)
    with ForwardLog(model) as log:
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(input_ids, **mask_kw, **GEN, **kwargs, **out_extras, **{cache_kw: cache})
    assert cache.store is None or cache.store.pool.num_referenced == 0, "blocks still referenced after a call"
    return Outcome(
        ref,
        out,
        log.lengths,
        cache.last_call.hit_tokens,
        input_ids.shape[1],
        real_tokens(input_ids, attention_mask),
        ref_extras,
        out_extras,
    )
