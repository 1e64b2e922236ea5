"""One recurrent-state snapshot (hybrid models) as one verified byte string, for the disk and remote tiers.

Layout (little-endian), state format version 1::

    fixed header  STATE_HEADER (84 bytes): magic b"HFPCST\\r\\n", format version u16, flags u16,
                  token count u32, layer count u32, namespace digest 16s, block hash 16s,
                  payload length u64, checksum 16s
    payload       a safetensors file: "<layer>.<state index>.conv" / ".recurrent" per stored state

The magic differs from a block entry's (``entry.MAGIC``), so a block reader of any version misses on a
state entry and a state reader on a block entry: neither is ever read as the other. Everything else is
checked as in ``entry``: namespace digest, block hash, the layer count and which layers keep state
against the store's layout, the length, and the checksum, or with a ``tier_secret`` the MAC (flag
``FLAG_MAC``; keyed and unkeyed entries are never accepted by the other side). A mismatch raises
``EntryError``: the caller counts a miss and deletes the entry.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..layout import LayerLayout
from ..state_layers import LayerState
from .entry import FLAG_MAC, EntryError, TierKey, _seal

STATE_MAGIC = b"HFPCST\r\n"
STATE_VERSION = 1
STATE_HEADER = struct.Struct("<8sHHII16s16sQ16s")
_CHECKSUM_AT = STATE_HEADER.size - 16
_NO_CHECKSUM = bytes(16)
PARTS = ("conv", "recurrent")


def encode_state(
    namespace: bytes,
    block_hash: bytes,
    tokens: int,
    layers: Sequence[LayerState | None],
    key: TierKey | None = None,
) -> bytes:
    """The entry of the state after ``tokens`` tokens, ending with the block ``block_hash``."""
    tensors = {
        f"{layer}.{index}.{PARTS[part]}": tensor.detach().to("cpu").contiguous()
        for layer, state in enumerate(layers)
        if state
        for index, pair in state.items()
        for part, tensor in enumerate(pair)
        if tensor is not None
    }
    payload = save_safetensors(tensors)
    flags = FLAG_MAC if key is not None else 0
    fields = [STATE_MAGIC, STATE_VERSION, flags, tokens, len(layers), namespace, block_hash, len(payload)]
    header = STATE_HEADER.pack(*fields, _NO_CHECKSUM)
    checksum = _seal([header, payload], key)
    return STATE_HEADER.pack(*fields, checksum) + payload


def decode_state(
    data: bytes,
    namespace: bytes,
    block_hash: bytes,
    layouts: Sequence[LayerLayout],
    key: TierKey | None = None,
) -> tuple[int, list[LayerState | None]]:
    """(tokens, per-layer states) of a verified entry; raises ``EntryError`` on any mismatch."""
    view = memoryview(data)
    if len(view) < STATE_HEADER.size:
        raise EntryError("truncated", f"{len(view)} bytes, shorter than a state header")
    magic, version, flags, tokens, n_layers, space, hashed, payload_len, checksum = STATE_HEADER.unpack_from(
        view
    )
    if magic != STATE_MAGIC:
        raise EntryError("magic", "not a state entry")
    if version != STATE_VERSION:
        raise EntryError("version", f"state format version {version}, this reader reads {STATE_VERSION}")
    if bool(flags & FLAG_MAC) != (key is not None):
        raise EntryError("mac", "authenticated with another secret, or without one")
    if space != namespace or hashed != block_hash:
        raise EntryError("identity", "a state of another namespace or chain")
    if n_layers != len(layouts):
        raise EntryError("layout", f"{n_layers} layers, the model has {len(layouts)}")
    if STATE_HEADER.size + payload_len != len(view):
        raise EntryError("length", f"{len(view)} bytes, the header says {STATE_HEADER.size + payload_len}")
    header = bytearray(view[: STATE_HEADER.size])
    header[_CHECKSUM_AT:] = _NO_CHECKSUM
    if _seal([bytes(header), view[STATE_HEADER.size :]], key) != checksum:
        raise EntryError("mac" if key is not None else "checksum", "the entry's bytes were changed")
    try:
        tensors = load_safetensors(bytes(view[STATE_HEADER.size :]))
    except Exception as error:  # a payload that verifies but does not parse was written by a broken writer
        raise EntryError("payload", f"unreadable safetensors payload ({error})") from error
    layers: list[LayerState | None] = [None] * n_layers
    for name, tensor in tensors.items():
        layer, index, part = name.split(".")
        state = layers[int(layer)] = layers[int(layer)] or {}
        pair = list(state.get(int(index), (None, None)))
        pair[PARTS.index(part)] = tensor
        state[int(index)] = tuple(pair)
    if [bool(state) for state in layers] != [bool(layout.states) for layout in layouts]:
        raise EntryError("layout", "the layers keeping state differ from the model's")
    return tokens, layers
