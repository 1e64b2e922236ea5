"""``PrefixCache.pin`` / ``unpin``: a prompt's full blocks, computed if missing, held by the store's pins.

A pin is keyed by the namespace, the extra keys and the hash of the prompt's last full block, so the
same prompt unpins it and a changed model (another namespace) never finds a stale pin.
"""

from __future__ import annotations

import logging
import math

import torch

from .prompt_rows import as_batch

logger = logging.getLogger(__name__)


def prompt_tokens(cache, prompt, tokenizer) -> list[int]:
    """``prompt`` as token ids: ids, a 1-row tensor, or text read with ``tokenizer`` (as ``tokenizer(text)``
    reads it for generate(); for a chat template pass the ids ``apply_chat_template`` gives)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("pass tokenizer= to pin a text prompt, or pass its token ids")
        tokens = list(tokenizer(prompt)["input_ids"])
    else:
        batch = as_batch(prompt)
        if batch.shape[0] != 1:
            raise ValueError(f"pin() takes one prompt, got a batch of {batch.shape[0]}; pin each row")
        tokens = batch[0].tolist()
    vocab = vocabulary_size(cache.model)
    bad = [t for t in tokens if not 0 <= t < vocab] if vocab else []
    if bad:
        raise ValueError(
            f"token ids {bad[:5]} are outside the model's vocabulary (0..{vocab - 1}): the prompt was "
            "tokenized for another model; tokenize it with this model's tokenizer"
        )
    return tokens


def vocabulary_size(model) -> int | None:
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, TypeError, NotImplementedError):
        return getattr(model.config.get_text_config(decoder=True), "vocab_size", None)


def pin_key(cache, hashes):
    return (cache.namespace, cache.extra_keys, hashes[-1])


def pin_prefix(cache, prompt, tokenizer, ttl) -> int:
    """See ``PrefixCache.pin``."""
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0
                            or not math.isfinite(ttl)):  # fmt: skip
        raise ValueError(f"ttl must be a positive number of seconds or None (until unpin), got {ttl!r}")
    tokens = prompt_tokens(cache, prompt, tokenizer)
    store = cache.store
    if store is None:
        raise ValueError(f"nothing can be pinned: prefix reuse is off for this model ({cache.fallback})")
    size = store.block_size
    hashes = cache.block_hashes(tokens)
    if not hashes:
        raise ValueError(f"a pin keeps whole blocks: the prompt has {len(tokens)} tokens, fewer than one "
                         f"block ({size}); pin a longer prefix")  # fmt: skip
    found = store.match(cache.namespace, tokens, hashes, len(hashes), cache.extra_keys).blocks
    if len(found) < len(hashes):  # compute and store the rest, then take it
        store.release(found)
        cache.score(torch.tensor([tokens[: len(hashes) * size]]))
        found = store.match(cache.namespace, tokens, hashes, len(hashes), cache.extra_keys).blocks
        if len(found) < len(hashes):
            logger.warning("pin(): only %d of %d blocks could be stored and pinned", len(found), len(hashes))
    store.pins.pin(pin_key(cache, hashes), found, ttl)  # takes over the references (or releases them)
    return len(found) * size


def unpin_prefix(cache, prompt, tokenizer) -> bool:
    """See ``PrefixCache.unpin``."""
    tokens = prompt_tokens(cache, prompt, tokenizer)
    if cache.store is None:
        return False
    hashes = cache.block_hashes(tokens)
    if not hashes:
        return False
    return cache.store.pins.unpin(pin_key(cache, hashes))
