"""One block as one self-describing, verified byte string: the unit the disk (and remote) tiers store.

Layout (little-endian), version 1::

    fixed header  HEADER (92 bytes): magic b"HFPCKV\\r\\n", format version u16, reserved u16,
                  token count u32, layer count u32, namespace digest 16s, block hash 16s,
                  parent hash 16s, payload length u64, checksum 16s
    tokens        token count x int64
    layer table   layer count x (heads u32, head dim u32, dtype name 16s, e.g. b"torch.float32")
    payload       a safetensors file holding "k.<layer>" and "v.<layer>", each [heads, tokens, head dim]

The checksum is MurmurHash3 x64-128 of the whole entry with the checksum field zeroed. ``decode``
verifies every field against what the caller expects (namespace, hash, parent, tokens, layouts), the
length and the checksum, and raises ``EntryError`` with a ``kind`` on the first mismatch: the caller
counts it as a miss and deletes the entry. The magic catches foreign files, the version older formats.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Sequence

import mmh3
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..hashing import HASH_SEED
from ..layout import LayerLayout
from .base import BlockData, BlockRequest

MAGIC = b"HFPCKV\r\n"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sHHII16s16s16sQ16s")
LAYER = struct.Struct("<II16s")
_CHECKSUM_AT = HEADER.size - 16
_NO_CHECKSUM = bytes(16)


class EntryError(Exception):
    """A stored entry that must not be served; ``kind`` says which check failed."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


def _checksum(parts: Sequence[bytes | memoryview]) -> bytes:
    hasher = mmh3.mmh3_x64_128(seed=HASH_SEED)
    for part in parts:
        hasher.update(part)
    return hasher.digest()


def _dtype_name(dtype: torch.dtype) -> bytes:
    return str(dtype).encode()


def encode(namespace: bytes, block: BlockData) -> bytes:
    """The entry bytes for ``block`` (CPU tensors) in ``namespace``."""
    tensors = {}
    table = b""
    for index, (keys, values) in enumerate(zip(block.keys, block.values)):
        tensors[f"k.{index}"] = keys.contiguous()
        tensors[f"v.{index}"] = values.contiguous()
        heads, _, head_dim = keys.shape
        table += LAYER.pack(heads, head_dim, _dtype_name(keys.dtype))
    payload = save_safetensors(tensors)
    tokens = array("q", block.tokens).tobytes()
    fields = (
        MAGIC,
        FORMAT_VERSION,
        0,
        len(block.tokens),
        len(block.keys),
        namespace,
        block.block_hash,
        block.parent_hash,
        len(payload),
    )
    unsigned = HEADER.pack(*fields, _NO_CHECKSUM)
    checksum = _checksum((unsigned, tokens, table, payload))
    return b"".join((HEADER.pack(*fields, checksum), tokens, table, payload))


def decode(
    data: bytes | bytearray | memoryview,
    namespace: bytes,
    request: BlockRequest,
    layouts: Sequence[LayerLayout],
) -> BlockData:
    """The verified block in ``data``; raises ``EntryError`` unless every field is what the caller expects."""
    view = memoryview(data)
    if len(view) < HEADER.size:
        raise EntryError("truncated", f"{len(view)} bytes, shorter than the {HEADER.size}-byte header")
    magic, version, _, n_tokens, n_layers, ns, block_hash, parent, payload_len, checksum = HEADER.unpack_from(
        view
    )
    if magic != MAGIC:
        raise EntryError("magic", "not an hf_prefix_cache block entry")
    if version != FORMAT_VERSION:
        raise EntryError("version", f"format version {version}, this library reads {FORMAT_VERSION}")
    tokens_at = HEADER.size
    table_at = tokens_at + 8 * n_tokens
    payload_at = table_at + LAYER.size * n_layers
    if len(view) != payload_at + payload_len:
        raise EntryError("truncated", f"{len(view)} bytes, the header says {payload_at + payload_len}")
    unsigned = bytes(view[:_CHECKSUM_AT]) + _NO_CHECKSUM
    if _checksum((unsigned, view[HEADER.size :])) != checksum:
        raise EntryError("checksum", "the checksum does not match the bytes")
    if ns != namespace:
        raise EntryError("namespace", "written by another model, salt, layout or block size")
    if block_hash != request.block_hash:
        raise EntryError("hash", "holds another block hash than its name says")
    if parent != request.parent_hash:
        raise EntryError("parent", "chained to another parent block")
    tokens = tuple(array("q", bytes(view[tokens_at:table_at])))
    if tokens != tuple(request.tokens):
        raise EntryError("tokens", "holds other token ids")
    expected = [LAYER.pack(x.num_heads, x.head_dim, _dtype_name(x.dtype)) for x in layouts]
    if bytes(view[table_at:payload_at]) != b"".join(expected) or n_layers != len(layouts):
        raise EntryError("layout", "layer count, heads, head dim or dtype differ from the model's")
    try:
        tensors = load_safetensors(bytes(view[payload_at:]))
        keys = [tensors[f"k.{i}"] for i in range(n_layers)]
        values = [tensors[f"v.{i}"] for i in range(n_layers)]
    except Exception as error:  # safetensors raises its own error types
        raise EntryError("payload", f"unreadable safetensors payload ({error})") from error
    for layout, k, v in zip(layouts, keys, values):
        shape = (layout.num_heads, n_tokens, layout.head_dim)
        if (
            tuple(k.shape) != shape
            or tuple(v.shape) != shape
            or k.dtype != layout.dtype
            or v.dtype != layout.dtype
        ):
            raise EntryError("payload", "tensor shapes or dtypes differ from the layer table")
    return BlockData(block_hash, parent, tokens, keys, values)


def entry_size(block_size: int, layouts: Sequence[LayerLayout]) -> int:
    """Approximate bytes of one entry (header, tokens, table and K/V; the safetensors header is extra)."""
    return (
        HEADER.size
        + 8 * block_size
        + LAYER.size * len(layouts)
        + sum(layout.block_bytes(block_size) for layout in layouts)
    )
