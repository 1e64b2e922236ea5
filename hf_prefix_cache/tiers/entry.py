"""One block as one self-describing, verified byte string: the unit the disk (and remote) tiers store.

Layout (little-endian), version 4::

    fixed header  HEADER (92 bytes): magic b"HFPCKV\\r\\n", format version u16, flags u16,
                  token count u32, layer count u32, namespace digest 16s, block hash 16s,
                  parent hash 16s, payload length u64, checksum 16s
    tokens        token count x int64
    layer table   layer count x (heads u32, head dim u32, dtype name 16s, e.g. b"torch.float32")
    padding       zeros up to a multiple of 64 bytes, so the tensors are aligned where they are read
    payload       a safetensors file with one tensor per run of consecutive layers of one layout:
                  "kv.<first layer>" of shape [2 * layers, heads, tokens, head dim], K and V interleaved
                  (k0, v0, k1, v1, ...). A model whose layers all look alike has one tensor per entry.

One tensor per layer run, not per layer, because reading is per tensor: a 30-layer block read as 60
tensors spent more time creating tensors than copying bytes.

The checksum is XXH3-128 of the whole entry with the checksum field zeroed (version 2 used MurmurHash3
x64-128, which verified at ~3.5 GB/s: a 2k-token restart spent ~35 ms on it; XXH3 runs at ~25 GB/s). ``decode``
verifies every field against what the caller expects (namespace, hash, parent, tokens, layouts), the
length and the checksum, and raises ``EntryError`` with a ``kind`` on the first mismatch: the caller
counts it as a miss and deletes the entry. The magic catches foreign files, the version older formats.

**Authenticated entries** (version 4): with a ``TierKey`` (the ``tier_secret``), flag ``FLAG_MAC`` is
set and the checksum field holds a MAC instead: HMAC-SHA256 (truncated to 128 bits) keyed by the secret,
over the same bytes. A checksum is only an accident detector: anyone who can write the folder or the
server recomputes it for forged K/V. A MAC can only be made by holders of the secret. A reader with a
key accepts only entries with the flag and its tag; a reader without one only entries without the flag,
so keyed and unkeyed entries (or entries of another secret) are never read as valid by the other side.
Versions 3 and older readers miss on both (the version differs, and so does the namespace digest).
HMAC-SHA256 was chosen by measurement (``eval/bench_mac.py``): with SHA extensions it ran ~1.8 GB/s on a
720 KiB block, 4x keyed BLAKE2b; BLAKE3 ran ~6.5 GB/s but would be a new compiled dependency.

**Bounded verification**: an entry of a layout is its header, tokens and table, a bounded safetensors
header and exactly the layout's K/V bytes (``size_bounds``). ``decode`` checks that from the header
alone, and the disk tier checks the file's ``stat`` size against the bounds before mapping it, both
before any checksum work: a huge or sparse file costs a ``stat``, not a pass over its bytes.

``decode`` copies nothing: the returned K/V are views of ``data`` (a memory-mapped file or a received
value), read once by the promotion into the device pool. It parses the payload's safetensors header
itself (8-byte length, JSON table of dtype, shape and offsets) because the safetensors package only
loads from bytes by copying every tensor; the writer is still ``safetensors.torch.save``.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import struct
import warnings
from array import array
from collections.abc import Sequence

import torch
import xxhash
from safetensors.torch import save as save_safetensors

from ..hashing import HASH_SEED
from ..layout import LayerLayout
from .base import BlockData, BlockRequest

MAGIC = b"HFPCKV\r\n"
FORMAT_VERSION = 4
FLAG_MAC = 1  # the checksum field holds a MAC keyed by the tier secret
HEADER = struct.Struct("<8sHHII16s16s16sQ16s")
LAYER = struct.Struct("<II16s")
ALIGN = 64
_CHECKSUM_AT = HEADER.size - 16
_NO_CHECKSUM = bytes(16)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class EntryError(Exception):
    """A stored entry that must not be served; ``kind`` says which check failed."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


def _checksum(parts: Sequence) -> bytes:
    hasher = xxhash.xxh3_128(seed=HASH_SEED)
    for part in parts:
        hasher.update(part)
    return hasher.digest()


class TierKey:
    """The MAC key derived from a ``tier_secret``. It never shows the secret: not in ``repr``, ``str``,
    stats or messages, and it refuses to be pickled (a pickle would carry it into logs or files)."""

    __slots__ = ("_key",)
    MIN_SECRET_BYTES = 16

    def __init__(self, secret: str | bytes):
        if isinstance(secret, str):
            secret = secret.encode()
        if not isinstance(secret, (bytes, bytearray)):
            raise TypeError(
                f"tier_secret must be a str or bytes (e.g. secrets.token_hex(32)), not {type(secret).__name__}"
            )
        if len(secret) < self.MIN_SECRET_BYTES:
            raise ValueError(
                f"tier_secret is {len(secret)} bytes; use at least {self.MIN_SECRET_BYTES} random bytes, e.g. "
                "python -c 'import secrets; print(secrets.token_hex(32))'"
            )
        self._key = hashlib.sha256(b"hf_prefix_cache tier entry MAC\0" + bytes(secret)).digest()

    def tag(self, parts: Sequence) -> bytes:
        return _mac(self._key, parts)

    def __repr__(self) -> str:
        return "TierKey(<secret>)"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("a TierKey is not picklable (it would carry the tier secret)")


def _mac(key: bytes, parts: Sequence) -> bytes:
    """HMAC-SHA256 of ``parts`` under ``key``, truncated to the 16 bytes of the checksum field."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(part)
    return mac.digest()[:16]


def _seal(parts: Sequence, key: TierKey | None) -> bytes:
    """The checksum field: the MAC under ``key``, or the XXH3 checksum without one."""
    return key.tag(parts) if key is not None else _checksum(parts)


def _dtype_name(dtype: torch.dtype) -> bytes:
    return str(dtype).encode()


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def layer_runs(shapes: Sequence[tuple]) -> list[tuple[int, int]]:
    """(first layer, layer count) of each run of consecutive layers whose ``shapes`` entries are equal."""
    runs: list[tuple[int, int]] = []
    for index, shape in enumerate(shapes):
        if runs and shapes[runs[-1][0]] == shape:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((index, 1))
    return runs


def pack(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-layer K/V as one contiguous tensor per layer run (see the module docstring)."""
    shapes = [(k.shape, k.dtype, k.device) for k in keys]
    packed = {}
    for first, count in layer_runs(shapes):
        pairs = [t for i in range(first, first + count) for t in (keys[i], values[i])]
        packed[f"kv.{first}"] = torch.stack(pairs)
    return packed


def unpack(packed: dict[str, torch.Tensor], n_layers: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The per-layer K and V views of ``pack``'s tensors."""
    keys: list[torch.Tensor | None] = [None] * n_layers
    values: list[torch.Tensor | None] = [None] * n_layers
    for name, tensor in packed.items():
        first = int(name.split(".", 1)[1])
        parts = tensor.unbind(0)
        for offset in range(len(parts) // 2):
            keys[first + offset] = parts[2 * offset]
            values[first + offset] = parts[2 * offset + 1]
    return keys, values


class _Unpacked:
    """``unpack`` of one block, done on first use: a hit the pool takes whole never needs the per-layer
    views (making 60 of them per block was a visible share of a tier read)."""

    def __init__(self, packed: dict[str, torch.Tensor], n_layers: int):
        self.packed, self.n_layers, self.views = packed, n_layers, None

    def get(self, which: int) -> list[torch.Tensor]:
        if self.views is None:
            self.views = unpack(self.packed, self.n_layers)
        return self.views[which]


class LazyLayers(Sequence):
    """The per-layer K (``which`` 0) or V (1) views of a packed block, made when first read."""

    def __init__(self, unpacked: _Unpacked, which: int):
        self._unpacked, self._which = unpacked, which

    def __len__(self) -> int:
        return self._unpacked.n_layers

    def __getitem__(self, index):
        return self._unpacked.get(self._which)[index]

    def __iter__(self):
        return iter(self._unpacked.get(self._which))

    def __add__(self, other) -> list[torch.Tensor]:
        return list(self) + list(other)

    def __radd__(self, other) -> list[torch.Tensor]:
        return list(other) + list(self)


def lazy_unpack(packed: dict[str, torch.Tensor], n_layers: int) -> tuple[LazyLayers, LazyLayers]:
    """``unpack``'s K and V lists, each made only when something reads it."""
    unpacked = _Unpacked(packed, n_layers)
    return LazyLayers(unpacked, 0), LazyLayers(unpacked, 1)


def encode(namespace: bytes, block: BlockData, key: TierKey | None = None) -> bytes:
    """The entry bytes for ``block`` (CPU tensors) in ``namespace``; authenticated with ``key`` if given."""
    table = b"".join(LAYER.pack(keys.shape[0], keys.shape[2], _dtype_name(keys.dtype)) for keys in block.keys)
    payload = save_safetensors(block.packed if block.packed is not None else pack(block.keys, block.values))
    tokens = array("q", block.tokens).tobytes()
    unpadded = HEADER.size + len(tokens) + len(table)
    padding = bytes(_aligned(unpadded) - unpadded)
    fields = (
        MAGIC,
        FORMAT_VERSION,
        FLAG_MAC if key is not None else 0,
        len(block.tokens),
        len(block.keys),
        namespace,
        block.block_hash,
        block.parent_hash,
        len(payload),
    )
    unsigned = HEADER.pack(*fields, _NO_CHECKSUM)
    checksum = _seal((unsigned, tokens, table, padding, payload), key)
    return b"".join((HEADER.pack(*fields, checksum), tokens, table, padding, payload))


def as_byte_tensor(data: bytes | bytearray | memoryview | torch.Tensor) -> torch.Tensor:
    """``data`` as a flat uint8 CPU tensor sharing its memory (read-only buffers are never written)."""
    if isinstance(data, torch.Tensor):
        return data.view(torch.uint8).reshape(-1)
    if len(data) == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():  # bytes are read-only; the tensor is only ever read
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=torch.uint8)


def decode(
    data: bytes | bytearray | memoryview | torch.Tensor,
    namespace: bytes,
    request: BlockRequest,
    layouts: Sequence[LayerLayout],
    key: TierKey | None = None,
) -> BlockData:
    """The verified block in ``data``; raises ``EntryError`` unless every field is what the caller expects.

    With ``key``, only an entry carrying that key's MAC is valid; without, only an unkeyed one. A size
    other than the layout's is refused from the header alone, before any checksum work.
    The K/V returned are views of ``data`` (no copy): keep ``data`` unchanged while they are used.
    """
    flat = as_byte_tensor(data)
    view = memoryview(flat.numpy())
    if len(view) < HEADER.size:
        raise EntryError("truncated", f"{len(view)} bytes, shorter than the {HEADER.size}-byte header")
    magic, version, flags, n_tokens, n_layers, ns, block_hash, parent, payload_len, checksum = (
        HEADER.unpack_from(view)
    )
    if magic != MAGIC:
        raise EntryError("magic", "not an hf_prefix_cache block entry")
    if version != FORMAT_VERSION:
        raise EntryError("version", f"format version {version}, this library reads {FORMAT_VERSION}")
    tokens_at = HEADER.size
    table_at = tokens_at + 8 * n_tokens
    payload_at = _aligned(table_at + LAYER.size * n_layers)
    if len(view) != payload_at + payload_len:
        raise EntryError("truncated", f"{len(view)} bytes, the header says {payload_at + payload_len}")
    if n_layers != len(layouts):
        raise EntryError("layout", f"{n_layers} layers, the model has {len(layouts)}")
    if n_tokens != len(request.tokens):
        raise EntryError("tokens", f"{n_tokens} tokens, the block has {len(request.tokens)}")
    _check_size(view, payload_at, payload_len, n_tokens, layouts)
    if key is not None and not flags & FLAG_MAC:
        raise EntryError("mac", "not authenticated: written without the tier secret (or forged)")
    if key is None and flags & FLAG_MAC:
        raise EntryError("mac", "written with a tier secret; this reader has none (pass tier_secret=)")
    unsigned = bytes(view[:_CHECKSUM_AT]) + _NO_CHECKSUM
    if key is not None:
        if not hmac.compare_digest(key.tag((unsigned, view[HEADER.size :])), checksum):
            raise EntryError("mac", "the MAC does not match: forged, or written with another tier secret")
    elif _checksum((unsigned, view[HEADER.size :])) != checksum:
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
    if bytes(view[table_at : table_at + LAYER.size * n_layers]) != _layer_table(_frozen(layouts)):
        raise EntryError("layout", "layer count, heads, head dim or dtype differ from the model's")
    packed = _read_payload(flat, view, payload_at)
    _check_payload(packed, layouts, n_tokens)
    keys, values = lazy_unpack(packed, n_layers)
    return BlockData(block_hash, parent, tokens, keys, values, packed=packed)


class _Frozen(tuple):
    """Layouts as a tuple whose hash is computed once: ``decode`` looks facts of the layout up several
    times per block, and hashing 30 layer layouts each time was a visible share of a tier read."""

    def __new__(cls, layouts):
        frozen = super().__new__(cls, layouts)
        frozen._hash = tuple.__hash__(frozen)
        return frozen

    def __hash__(self) -> int:
        return self._hash


_FROZEN: dict[int, tuple[Sequence[LayerLayout], _Frozen]] = {}


def _frozen(layouts: Sequence[LayerLayout]) -> _Frozen:
    """``layouts`` as a ``_Frozen``, the same object for the same list (a tier passes its own each time)."""
    known = _FROZEN.get(id(layouts))
    if known is not None and known[0] is layouts:
        return known[1]
    if len(_FROZEN) >= 64:
        _FROZEN.clear()
    frozen = _Frozen(layouts)
    _FROZEN[id(layouts)] = (layouts, frozen)  # holds the list, so its id is not reused meanwhile
    return frozen


@functools.lru_cache(maxsize=64)
def _layer_table(layouts: tuple[LayerLayout, ...]) -> bytes:
    """The layer table an entry of ``layouts`` carries (made once per layout, not per block read)."""
    return b"".join(LAYER.pack(x.num_heads, x.head_dim, _dtype_name(x.dtype)) for x in layouts)


@functools.lru_cache(maxsize=64)
def _data_bytes(layouts: tuple[LayerLayout, ...], n_tokens: int) -> int:
    return sum(layout.block_bytes(n_tokens) for layout in layouts)


def _check_size(view: memoryview, payload_at: int, payload_len: int, n_tokens: int, layouts) -> None:
    """Before any pass over the bytes, so a huge or sparse file costs nothing: the payload must be a
    bounded safetensors header plus exactly the layout's K/V bytes."""
    data_bytes = _data_bytes(_frozen(layouts), n_tokens)
    (json_len,) = struct.unpack_from("<Q", view, payload_at) if payload_len >= 8 else (None,)
    if json_len is None or json_len > _max_json(len(layouts)) or payload_len != 8 + json_len + data_bytes:
        low, high = size_bounds(n_tokens, layouts)
        raise EntryError("size", f"{len(view)} bytes, an entry of this layout has {low} to {high}")


def _read_payload(flat: torch.Tensor, view: memoryview, at: int) -> dict[str, torch.Tensor]:
    """The safetensors payload at ``at`` as views of ``flat`` (format: 8-byte header length, JSON
    header of dtype, shape and data offsets, then the data)."""
    try:
        (length,) = struct.unpack_from("<Q", view, at)
        header = json.loads(bytes(view[at + 8 : at + 8 + length]))
        data_at = at + 8 + length
        tensors = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES[meta["dtype"]]
            shape = [int(x) for x in meta["shape"]]
            begin, end = (int(x) for x in meta["data_offsets"])
            numel = 1
            for size in shape:
                numel *= size
            itemsize = dtype.itemsize
            if not 0 <= begin <= end <= len(view) - data_at or end - begin != numel * itemsize:
                raise ValueError(f"tensor {name!r} lies outside the payload or has the wrong size")
            tensors[name] = flat[data_at + begin : data_at + end].view(dtype).view(shape)
        return tensors
    except Exception as error:  # malformed JSON, keys, dtypes, offsets or alignment
        raise EntryError("payload", f"unreadable safetensors payload ({error!r})") from error


def _check_payload(packed: dict[str, torch.Tensor], layouts: Sequence[LayerLayout], n_tokens: int) -> None:
    """Exactly the tensors ``pack`` writes for ``layouts``, with their shapes and dtypes."""
    expected = _expected_payload(_frozen(layouts), n_tokens)
    got = {name: (tuple(t.shape), t.dtype) for name, t in packed.items()}
    if got != expected:
        raise EntryError("payload", "tensor names, shapes or dtypes differ from the layer table")


@functools.lru_cache(maxsize=64)
def _expected_payload(layouts: tuple[LayerLayout, ...], n_tokens: int) -> dict:
    runs = layer_runs([(x.num_heads, x.head_dim, x.dtype) for x in layouts])
    return {
        f"kv.{first}": (
            (2 * count, layouts[first].num_heads, n_tokens, layouts[first].head_dim),
            layouts[first].dtype,
        )
        for first, count in runs
    }


def _max_json(n_layers: int) -> int:
    """The most bytes the payload's safetensors header may take (about 100 per layer run is typical)."""
    return 4096 + 256 * n_layers


def size_bounds(n_tokens: int, layouts: Sequence[LayerLayout]) -> tuple[int, int]:
    """The fewest and most bytes an entry of ``n_tokens`` tokens in ``layouts`` can take (keyed or not);
    only the safetensors header's length varies between them, and ``decode`` checks it exactly."""
    fixed = _aligned(HEADER.size + 8 * n_tokens + LAYER.size * len(layouts)) + 8
    data = _data_bytes(_frozen(layouts), n_tokens)
    return fixed + data, fixed + data + _max_json(len(layouts))


def entry_size(block_size: int, layouts: Sequence[LayerLayout]) -> int:
    """Approximate bytes of one entry (header, tokens, table and K/V; the safetensors header is extra)."""
    return _aligned(HEADER.size + 8 * block_size + LAYER.size * len(layouts)) + sum(
        layout.block_bytes(block_size) for layout in layouts
    )
