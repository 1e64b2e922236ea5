"""Storing a finished call: the full blocks of each prompt and, where rows can still be attributed to
``generate()``'s sequences, of each reply, read from the K/V the layers captured."""

from __future__ import annotations

from collections.abc import Hashable

import torch

from .call import CallState
from .hashing import hash_blocks
from .priorities import block_levels
from .prompt_rows import reply_tokens
from .store import BlockStore, WriteBlocks


def record_call(
    layers: list,
    store: BlockStore,
    call: CallState,
    replies: list[list[int]] | None,
    slots: int,
    extra_keys: tuple[Hashable, ...],
    on_chain=None,
) -> None:
    """Store every row's prompt (+ reply) blocks whose K/V exist in the first ``slots`` slots;
    ``on_chain(cache row, its referenced chain, its stored tokens)`` sees each chain before release."""
    for index, row in enumerate(call.rows):
        for source in range(index * call.expand, (index + 1) * call.expand):
            tokens = row.tokens + replies[source] if replies else row.tokens
            tokens = tokens[: slots - row.pad]
            hashes = extend_hashes(call.root, row.hashes, tokens, store.block_size, extra_keys)
            writer = block_writer(layers, store, source, row.pad)
            chain = store.extend_chain(call.namespace, tokens, hashes, row.hits, writer, extra_keys)
            try:
                if call.priority is not None:
                    store.prioritize(chain, block_levels(call.priority, len(chain), store.block_size))
                if on_chain is not None:
                    on_chain(source, chain, tokens)
            finally:
                store.release(chain[len(row.hits) :])
            if not replies:
                break  # without replies every expanded row holds the same prompt


def as_sequences(sequences) -> tuple[torch.Tensor | None, str | None]:
    """``generate()``'s sequences as a ``[rows, length]`` tensor (one row may come 1-D), or why not."""
    if sequences is None:
        return None, None
    if not isinstance(sequences, torch.Tensor):
        try:
            sequences = torch.as_tensor(sequences)
        except (TypeError, ValueError, RuntimeError):
            return None, "the sequences given to commit() are not a tensor of token ids"
    if sequences.dim() == 1:
        sequences = sequences.unsqueeze(0)
    if sequences.dim() != 2:
        return (
            None,
            f"the sequences given to commit() have shape {tuple(sequences.shape)}, not [rows, length]",
        )
    return sequences, None


def prompt_mismatch(call: CallState, sequences: torch.Tensor) -> str | None:
    """Why ``sequences`` are not the output of this prepared call: each of its rows must start with the
    prepared ``input_ids`` row (pads included) that it continues. ``num_return_sequences`` / beams give
    every prompt the same number of rows, at most ``call.expand``, in prompt order; beam search reorders
    rows only within a prompt's group, whose prompt part is the same."""
    prompts = len(call.prompt_ids)
    count = sequences.shape[0]
    if count == 0 or count % prompts or count // prompts > call.expand:
        return (
            f"commit() got {count} sequences for the {prompts} prompt(s) prepared "
            f"(x{call.expand}): they belong to another call"
        )
    if sequences.shape[1] < call.width:
        return (
            f"commit() got sequences of {sequences.shape[1]} tokens, shorter than the {call.width} of the "
            "prepared prompt: they belong to another call"
        )
    per = count // prompts
    for source, prompt in enumerate(sequences[:, : call.width].tolist()):
        if prompt != call.prompt_ids[source // per]:
            return (
                f"row {source} of the sequences given to commit() does not start with the prompt that "
                "prepare() looked up: they belong to another call, whose K/V the layers hold"
            )
    return None


def replies_of(call: CallState, sequences, stop_ids: set[int], pad_id: int | None) -> list[list[int]] | None:
    """Reply tokens per cache row, or None when rows can no longer be attributed to ``sequences``
    (whose prompts ``prompt_mismatch`` checked)."""
    if sequences is None or call.rows_reordered:
        return None
    if sequences.shape[0] != len(call.rows) * call.expand:
        return None
    generated = sequences[:, call.width :].tolist()
    return [reply_tokens(tokens, stop_ids, pad_id) for tokens in generated]


def extend_hashes(root: bytes, hashes: list[bytes], tokens: list[int], block_size: int, extra_keys) -> list:
    """Hashes of all full blocks of ``tokens``, continuing the chain ``hashes`` of its first blocks."""
    done = min(len(hashes), len(tokens) // block_size)
    parent = hashes[done - 1] if done else root
    return hashes[:done] + hash_blocks(parent, tokens[done * block_size :], block_size, extra_keys)


def block_writer(layers: list, store: BlockStore, source: int, pad: int) -> WriteBlocks:
    """Copies the captured K/V of cache row ``source`` for the given chain positions into the pool."""
    size = store.block_size

    def write(positions: list[int], block_ids: list[int]) -> None:
        contiguous = positions == list(range(positions[0], positions[0] + len(positions)))
        slots = [pad + position * size + i for position in positions for i in range(size)]
        for index, layer in enumerate(layers):
            keys, values, first = layer.captured()
            if keys is None:  # a layer without K/V (recurrent state only: snapshots keep it)
                continue
            if contiguous:  # views: the pool write is the only copy
                span = slice(slots[0] - first, slots[-1] + 1 - first)
                picked_k, picked_v = keys[source, :, span], values[source, :, span]
            else:
                where = torch.tensor(slots, device=keys.device) - first
                picked_k, picked_v = (
                    keys[source].index_select(1, where),
                    values[source].index_select(1, where),
                )
            store.kv.write(index, block_ids, picked_k, picked_v)

    return write
