"""Reading a (left-padded) batch of prompts into per-row real tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .block_pool import Block
from .hashing import BlockHash


@dataclass
class PromptRow:
    """One prompt of the batch: ``pad`` slots of left padding, then ``tokens``."""

    pad: int
    tokens: list[int]
    hashes: list[BlockHash] = field(default_factory=list)
    hits: list[Block] = field(default_factory=list)  # referenced until the call ends


def as_batch(input_ids) -> torch.Tensor:
    """``input_ids`` as a 2-D tensor; accepts a tensor, a list of ids or a list of lists."""
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must be a non-empty [batch, length] tensor, got shape {tuple(ids.shape)}"
        )
    return ids


def is_left_padded(attention_mask: torch.Tensor) -> bool:
    """Every row is zeros then at least one one."""
    mask = attention_mask.bool()
    return bool(mask[:, -1].all()) and bool((mask[:, 1:] >= mask[:, :-1]).all())


def split_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[PromptRow]:
    """Real tokens of each row; refuses any padding that is not on the left."""
    if attention_mask is None:
        return [PromptRow(0, row) for row in input_ids.tolist()]
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )
    if not is_left_padded(attention_mask):
        raise ValueError(
            "PrefixCache needs left padding: every row of attention_mask must be zeros then ones. "
            "Set tokenizer.padding_side = 'left' (right or middle padding cannot be reused exactly)."
        )
    pads = (attention_mask == 0).sum(dim=1).tolist()
    return [PromptRow(pad, ids[pad:]) for ids, pad in zip(input_ids.tolist(), pads)]


def reply_tokens(generated: list[int], stop_ids: set[int], pad_id: int | None) -> list[int]:
    """The real part of a generated reply: up to and including the first stop token, never padding.

    A row that stopped (EOS, stop string, stopping criterion) is filled with pad tokens to the end, so a
    trailing run of pad tokens is padding; a pad token the model generated mid-reply is text.
    """
    for index, token in enumerate(generated):
        if token in stop_ids:
            return generated[: index + 1]
    end = len(generated)
    while end and generated[end - 1] == pad_id:
        end -= 1
    return generated[:end]
