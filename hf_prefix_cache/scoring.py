"""Scoring calls: one forward pass for the logits of a sequence's last positions, reusing stored prefixes.

A loglikelihood, multiple-choice, perplexity or reward call is a forward pass, not ``generate()``. Here
it goes through the same three steps as a generate() call: ``prepare`` loads the longest stored prefix
(held below the first position whose logits are asked for, so every requested position is computed),
the model computes the rest, and ``commit`` stores the whole scored sequence, so that the next call
with the same few-shot context, document or question hits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .compat import CACHE_KWARG
from .prompt_rows import as_batch, is_left_padded
from .reasons import off_default

logger = logging.getLogger(__name__)

RIGHT_PADDED = (
    "score() needs left padding: every row of attention_mask must be zeros then ones (positions and "
    "stored blocks are counted from each row's first real token). Left-pad the batch "
    "(tokenizer.padding_side = 'left'), or score one row per call without padding"
)


def positions_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position ids generate() gives a left-padded batch: each row counts from its first real token."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def score(cache, input_ids, attention_mask=None, *, logits_to_keep: int = 1) -> torch.Tensor:
    """Logits ``[batch, logits_to_keep, vocab]`` of the last positions of ``input_ids``, from one forward pass.

    Equal (fp32: within the exactness suite's tolerance) to
    ``model(input_ids, attention_mask=mask, position_ids=positions_of(mask)).logits[:, -logits_to_keep:]``,
    which without padding is plain ``model(input_ids).logits[:, -logits_to_keep:]``. A left-padded
    batch counts positions from each row's first real token (as generate() does), so rows share blocks
    whatever their padding. ``logits_to_keep=0`` asks for every position (nothing can then be reused).
    The scored sequence is stored for the next call. Right padding raises ``ValueError``; a model
    without prefix reuse, in training mode, or changed since the cache was made recomputes everything
    (warned once). Runs under ``torch.no_grad()``.
    """
    ids = as_batch(input_ids)
    mask = as_batch(attention_mask) if attention_mask is not None else None
    width = ids.shape[1]
    if not isinstance(logits_to_keep, int) or not 0 <= logits_to_keep <= width:
        raise ValueError(
            f"logits_to_keep must be an int from 0 (every position) to the {width} tokens of input_ids, "
            f"got {logits_to_keep!r}"
        )
    keep = logits_to_keep or width
    if mask is not None:
        if mask.shape != ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}"
            )
        if not is_left_padded(mask):
            raise ValueError(RIGHT_PADDED)
    model = cache.model
    positions = positions_of(mask) if mask is not None else None
    with torch.no_grad():
        reason = plain_reason(cache)
        if reason is not None:
            if cache.store is not None:  # else construction already warned that reuse is off
                cache.recompute_call(reason, ids)
            return _forward(model, ids, mask, positions, keep)
        try:
            cache.prepare(ids, mask, logits_to_keep=keep)
            loaded = cache.get_seq_length()
            logits = _forward(model, ids, mask, positions, keep, loaded, cache)
            cache.commit()
        except BaseException:
            cache.release_if_mine()
            raise
    return logits


def plain_reason(cache) -> str | None:
    """Why this scoring call cannot use the store (then it is a plain forward), or None."""
    if cache.store is None:
        return cache.fallback or "prefix reuse is off for this model"
    if (stale := cache.stale_reason()) is not None:
        return stale
    return off_default(cache.model, {layout.device.type for layout in cache.store.layouts})


def _forward(model, ids, mask, positions, keep: int, loaded: int = 0, cache=None) -> torch.Tensor:
    kwargs = {"attention_mask": mask, "logits_to_keep": keep}
    if positions is not None:
        kwargs["position_ids"] = positions[:, loaded:]
    if cache is not None:
        kwargs[CACHE_KWARG] = cache
        kwargs["use_cache"] = True
    return model(input_ids=ids[:, loaded:], **kwargs).logits


@dataclass
class Continuation:
    """Log-probabilities of a continuation's tokens after a context."""

    logprobs: list[float]  # one per continuation token
    total: float  # their sum: the continuation's loglikelihood
    greedy: bool  # every continuation token is the argmax of its logits


def continuation_logprobs(cache, context, continuation) -> Continuation:
    """Log-probs of ``continuation`` token ids after ``context`` token ids (one pair, lists or 1-D tensors).

    Scores ``context + continuation[:-1]`` keeping ``len(continuation)`` logits, as lm-eval does; the
    context is stored, so other continuations of it (multiple-choice answers) reuse it.
    """
    context, continuation = _token_list(context, "context"), _token_list(continuation, "continuation")
    ids = torch.tensor([context + continuation[:-1]], dtype=torch.long, device=_device_of(cache.model))
    logits = score(cache, ids, logits_to_keep=len(continuation))
    logprobs = torch.log_softmax(logits[0].float(), dim=-1)
    wanted = torch.tensor(continuation, device=logprobs.device)
    picked = logprobs.gather(-1, wanted.unsqueeze(-1)).squeeze(-1)
    greedy = bool((logprobs.argmax(dim=-1) == wanted).all())
    return Continuation(picked.tolist(), float(picked.sum()), greedy)


def _token_list(tokens, name: str) -> list[int]:
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 1:
            raise ValueError(f"{name} must be one row of token ids, got shape {tuple(tokens.shape)}")
        tokens = tokens.tolist()
    tokens = [int(token) for token in tokens]
    if not tokens:
        raise ValueError(f"{name} must hold at least one token")
    return tokens


def _device_of(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
