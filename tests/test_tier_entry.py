"""The entry codec of the lower tiers: a round trip is bit-exact, and every field is verified on read."""

from __future__ import annotations

import struct

import pytest
import torch

from hf_prefix_cache.identity import tier_digest
from hf_prefix_cache.layout import LayerLayout
from hf_prefix_cache.tiers import FORMAT_VERSION, BlockData, BlockRequest, EntryError, decode, encode
from hf_prefix_cache.tiers import entry as entry_module

CPU = torch.device("cpu")


def tier_namespace(namespace, block_size, layouts, extra_keys=()):
    return tier_digest(namespace, block_size, layouts, extra_keys, format_version=FORMAT_VERSION)


LAYOUTS = [LayerLayout(2, 4, torch.float32, CPU), LayerLayout(3, 8, torch.bfloat16, CPU)]
BLOCK = 4
NS = tier_namespace("model/salt", BLOCK, LAYOUTS)


def make_block(seed: int = 0, layouts=LAYOUTS, tokens=(5, 6, 7, 8)) -> BlockData:
    generator = torch.Generator().manual_seed(seed)
    keys, values = [], []
    for layout in layouts:
        shape = (layout.num_heads, len(tokens), layout.head_dim)
        keys.append(torch.randn(shape, generator=generator).to(layout.dtype))
        values.append(torch.randn(shape, generator=generator).to(layout.dtype))
    return BlockData(b"H" * 16, b"P" * 16, tuple(tokens), keys, values)


def request_for(block: BlockData) -> BlockRequest:
    return BlockRequest(block.block_hash, block.parent_hash, block.tokens)


def test_round_trip_is_bit_exact_across_dtypes_and_shapes():
    block = make_block()
    data = encode(NS, block)
    back = decode(data, NS, request_for(block), LAYOUTS)
    assert back.tokens == block.tokens and back.parent_hash == block.parent_hash
    for a, b in zip(block.keys + block.values, back.keys + back.values):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert len(data) >= sum(layout.block_bytes(BLOCK) for layout in LAYOUTS)
    assert data[:8] == entry_module.MAGIC


def _field_offset(name: str) -> int:
    """Byte offset of a header field (layout documented in entry.py)."""
    order = [
        "magic",
        "version",
        "reserved",
        "n_tokens",
        "n_layers",
        "ns",
        "hash",
        "parent",
        "payload",
        "checksum",
    ]
    fmt = entry_module.HEADER.format.lstrip("<")
    sizes = [
        struct.calcsize("<" + code) for code in ["8s", "H", "H", "I", "I", "16s", "16s", "16s", "Q", "16s"]
    ]
    assert fmt == "8sHHII16s16s16sQ16s"
    return sum(sizes[: order.index(name)])


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("truncated", "truncated"),
        ("flip_payload", "checksum"),
        ("flip_token", "checksum"),
        ("empty", "truncated"),
        ("magic", "magic"),
        ("version", "version"),
        ("extended", "truncated"),
    ],
)
def test_damaged_bytes_are_rejected(kind, expected):
    block = make_block()
    data = bytearray(encode(NS, block))
    if kind == "truncated":
        data = data[: len(data) - 7]
    elif kind == "flip_payload":
        data[-100] ^= 0x01
    elif kind == "flip_token":
        data[entry_module.HEADER.size + 1] ^= 0x40
    elif kind == "empty":
        data = bytearray()
    elif kind == "magic":
        data[0:8] = b"GGUF\x00\x00\x00\x00"
    elif kind == "version":
        at = _field_offset("version")
        data[at : at + 2] = struct.pack("<H", FORMAT_VERSION + 1)
    elif kind == "extended":
        data += b"\x00"
    with pytest.raises(EntryError) as error:
        decode(bytes(data), NS, request_for(block), LAYOUTS)
    assert error.value.kind == expected


def test_a_well_formed_entry_of_another_block_or_context_is_rejected():
    """Valid checksums, wrong identity: each field the caller expects is compared."""
    block = make_block()
    data = encode(NS, block)
    cases = {
        "namespace": (tier_namespace("other-model/salt", BLOCK, LAYOUTS), request_for(block), LAYOUTS),
        "hash": (NS, BlockRequest(b"X" * 16, block.parent_hash, block.tokens), LAYOUTS),
        "parent": (NS, BlockRequest(block.block_hash, b"Q" * 16, block.tokens), LAYOUTS),
        "tokens": (NS, BlockRequest(block.block_hash, block.parent_hash, (5, 6, 7, 9)), LAYOUTS),
        "layout": (NS, request_for(block), [LAYOUTS[0], LayerLayout(3, 8, torch.float16, CPU)]),
    }
    for kind, (namespace, request, layouts) in cases.items():
        with pytest.raises(EntryError) as error:
            decode(data, namespace, request, layouts)
        assert error.value.kind == kind, kind
    with pytest.raises(EntryError) as error:
        decode(data, NS, request_for(block), LAYOUTS[:1])
    assert error.value.kind == "layout"


def test_an_old_format_version_is_rejected_even_with_a_valid_checksum(monkeypatch):
    block = make_block()
    monkeypatch.setattr(entry_module, "FORMAT_VERSION", FORMAT_VERSION + 1)
    data = encode(NS, block)  # a future (or past) writer, internally consistent
    monkeypatch.undo()
    with pytest.raises(EntryError) as error:
        decode(data, NS, request_for(block), LAYOUTS)
    assert error.value.kind == "version"


def test_the_namespace_digest_covers_everything_that_changes_kv():
    base = tier_namespace("fp/salt", 16, LAYOUTS)
    variants = [
        tier_namespace("other-fp/salt", 16, LAYOUTS),
        tier_namespace("fp/other-salt", 16, LAYOUTS),
        tier_namespace("fp/salt", 32, LAYOUTS),
        tier_namespace("fp/salt", 16, [LAYOUTS[0], LayerLayout(3, 8, torch.float16, CPU)]),
        tier_namespace("fp/salt", 16, [LAYOUTS[0], LayerLayout(2, 8, torch.bfloat16, CPU)]),
        tier_namespace("fp/salt", 16, [LAYOUTS[0], LayerLayout(3, 16, torch.bfloat16, CPU)]),
        tier_namespace("fp/salt", 16, LAYOUTS[:1]),
        tier_namespace("fp/salt", 16, LAYOUTS, extra_keys=("lora-a",)),
    ]
    assert len({base, *variants}) == len(variants) + 1
    assert tier_namespace("fp/salt", 16, LAYOUTS) == base  # deterministic
    assert len(base) == 16


def test_the_namespace_digest_covers_the_format_version():
    base = tier_namespace("fp/salt", 16, LAYOUTS)
    assert tier_digest("fp/salt", 16, LAYOUTS, format_version=FORMAT_VERSION + 1) != base


def test_the_namespace_digest_is_stable_across_processes():
    import subprocess
    import sys

    code = (
        "import torch; from hf_prefix_cache.layout import LayerLayout as L;"
        "from hf_prefix_cache.identity import tier_digest as t;"
        f"print(t('fp/salt', 16, [L(2, 4, torch.float32, torch.device('cpu'))], format_version={FORMAT_VERSION}).hex())"
    )
    here = tier_namespace("fp/salt", 16, [LAYOUTS[0]]).hex()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == here


def _resign(data: bytearray) -> bytes:
    """``data`` with a checksum that matches its (edited) bytes: only the field checks can catch it."""
    at = entry_module._CHECKSUM_AT
    data[at : at + 16] = bytes(16)
    data[at : at + 16] = entry_module._checksum((bytes(data),))
    return bytes(data)


def test_decoded_kv_are_views_of_the_entry_bytes_not_copies():
    """A read costs one pass (the promotion into the pool): decode itself copies no tensor."""
    block = make_block()
    flat = torch.frombuffer(bytearray(encode(NS, block)), dtype=torch.uint8)
    back = decode(flat, NS, request_for(block), LAYOUTS)
    storage = flat.untyped_storage().data_ptr()
    for tensor in back.keys + back.values:
        assert tensor.untyped_storage().data_ptr() == storage
    assert len(entry_module.pack(block.keys, block.values)) == 2  # one tensor per run of alike layers


def test_a_payload_of_other_tensors_is_rejected_even_with_a_valid_checksum(monkeypatch):
    block = make_block()

    def per_layer(keys, values):  # format 1's naming: one tensor per layer and kind
        return {**{f"k.{i}": k for i, k in enumerate(keys)}, **{f"v.{i}": v for i, v in enumerate(values)}}

    monkeypatch.setattr(entry_module, "pack", per_layer)
    data = encode(NS, block)
    monkeypatch.undo()
    with pytest.raises(EntryError) as error:
        decode(data, NS, request_for(block), LAYOUTS)
    assert error.value.kind == "payload"


@pytest.mark.parametrize("edit", ["past_the_end", "wrong_dtype", "not_json"])
def test_a_malformed_safetensors_header_is_rejected_even_with_a_valid_checksum(edit):
    block = make_block()
    data = bytearray(encode(NS, block))
    payload_at = len(data) - struct.unpack_from("<Q", data, _field_offset("payload"))[0]
    (length,) = struct.unpack_from("<Q", data, payload_at)
    header = bytes(data[payload_at + 8 : payload_at + 8 + length])
    if edit == "past_the_end":
        new = header.replace(b'"data_offsets":[0,', b'"data_offsets":[9,', 1)
    elif edit == "wrong_dtype":
        new = header.replace(b'"F32"', b'"I32"', 1)
    else:
        new = b"{" + header[1:-1] + b"?"
    assert new != header and len(new) == len(header)
    data[payload_at + 8 : payload_at + 8 + length] = new
    with pytest.raises(EntryError) as error:
        decode(_resign(data), NS, request_for(block), LAYOUTS)
    assert error.value.kind == "payload"
