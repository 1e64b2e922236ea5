"""Per-block cost of verifying a tier entry: the unkeyed checksum (XXH3-128) beside the keyed MACs a
``tier_secret`` could use (keyed BLAKE2b-128 and HMAC-SHA256 from hashlib; BLAKE3 when installed), on
entries of the sizes the disk and Redis tiers hold. Single-threaded, best of ``--repeats`` timings.

``--ttft`` adds a side-by-side restart-warm TTFT on SmolLM2-135M-Instruct: two disk folders filled with
the same ``--prefix-tokens`` prefix, one with a ``tier_secret`` and one without; each repetition (in
random order) makes a fresh ``PrefixCache`` (empty pool, page cache warm) over one folder and times
``generate(max_new_tokens=1)`` on the prefix plus new tokens.

Run: ``python -m hf_prefix_cache_eval.bench_mac`` (``--sizes`` in KiB), ``... --ttft --repeats 5``.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import hmac
import os
import random
import statistics
import tempfile
import time

import xxhash

# KiB: a 16-token block of a 2-layer toy model; SmolLM2-135M fp32 (720 KiB = 30 layers x 16 tokens x 1.5 KiB);
# a 16-token block of an 8B model in bf16 (32 layers x 8 heads x 128 dim x 2 x 2 bytes x 16 tokens = 2 MiB)
DEFAULT_SIZES_KIB = (4, 720, 2048)
KEY = os.urandom(32)


def candidates() -> dict:
    found = {
        "xxh3_128 (unkeyed checksum)": lambda data: xxhash.xxh3_128_digest(data),
        "blake2b-128 keyed": lambda data: hashlib.blake2b(data, digest_size=16, key=KEY).digest(),
        "hmac-sha256": lambda data: hmac.digest(KEY, data, "sha256"),
    }
    try:
        import blake3

        found["blake3 keyed (1 thread)"] = lambda data: blake3.blake3(data, key=KEY).digest(16)
        found["blake3 keyed (all threads)"] = lambda data: blake3.blake3(
            data, key=KEY, max_threads=blake3.blake3.AUTO
        ).digest(16)
    except ImportError:
        pass
    return found


def best_time(fn, data: bytes, repeats: int) -> float:
    rounds = max(1, (8 << 20) // len(data))  # about 8 MiB hashed per timing
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(rounds):
            fn(data)
        best = min(best, (time.perf_counter() - started) / rounds)
    return best


def ttft_side_by_side(prefix_tokens: int, new_tokens: int, repeats: int, seed: int = 0) -> dict:
    """Median first-call TTFT of a fresh cache over a keyed and an unkeyed disk folder (see the docstring)."""
    import torch

    from hf_prefix_cache import CACHE_KWARG, PrefixCache, hashing
    from hf_prefix_cache.tiers import BlockRequest

    from .bench_common import real_text_ids
    from .models import load_model

    model, tokenizer = load_model("smollm2")
    prefix = real_text_ids(tokenizer, prefix_tokens)
    prompts = [
        torch.tensor([prefix + real_text_ids(tokenizer, new_tokens, skip=prefix_tokens + i * new_tokens)])
        for i in range(repeats + 1)
    ]
    secrets = {"no secret": None, "tier_secret": os.urandom(32).hex()}
    times: dict[str, list[float]] = {name: [] for name in secrets}
    hits: dict[str, list[int]] = {name: [] for name in secrets}
    reads: dict[str, list[float]] = {name: [] for name in secrets}
    with tempfile.TemporaryDirectory() as root:
        folders = {name: os.path.join(root, name.replace(" ", "_")) for name in secrets}

        def cache_for(name):
            return PrefixCache(model, max_memory="256MiB", disk=folders[name], tier_secret=secrets[name])

        for name in secrets:
            filler = cache_for(name)
            model.generate(prompts[0], max_new_tokens=1, do_sample=False, **{CACHE_KWARG: filler})
            assert filler.flush(120)
            del filler
        order = [(i, name) for i in range(1, repeats + 1) for name in secrets]
        random.Random(seed).shuffle(order)
        for index, name in order:
            cache = cache_for(name)
            started = time.perf_counter()
            model.generate(prompts[index], max_new_tokens=1, do_sample=False, **{CACHE_KWARG: cache})
            times[name].append(time.perf_counter() - started)
            hits[name].append(cache.last_call.hit_tokens_by_tier.get("disk", 0))
            # The disk tier's part alone: map and verify the whole cached chain (no prefill, no promotion).
            tier, namespace = cache.store.tiers.tiers[0], cache.namespace
            root_hash = hashing.root_hash(namespace)
            hashes = hashing.hash_blocks(root_hash, prefix, cache.block_size)
            size = cache.block_size
            requests = [
                BlockRequest(h, hashes[i - 1] if i else root_hash, tuple(prefix[i * size : (i + 1) * size]))
                for i, h in enumerate(hashes)
            ]
            digest = cache.store.tiers.namespace(namespace)
            started = time.perf_counter()
            assert len(tier.get(digest, requests)) == len(requests)
            reads[name].append(time.perf_counter() - started)
            del cache
            gc.collect()
    return {
        name: {
            "median_s": statistics.median(times[name]),
            "min_s": min(times[name]),
            "times_s": times[name],
            "disk_hit_tokens": hits[name],
            "chain_read_min_s": min(reads[name]),
            "chain_read_median_s": statistics.median(reads[name]),
            "blocks": prefix_tokens // 16,
        }
        for name in secrets
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES_KIB, help="entry sizes in KiB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--ttft", action="store_true", help="also time restart-warm TTFT with/without a secret"
    )
    parser.add_argument("--prefix-tokens", type=int, default=2000)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    names = candidates()
    print(f"{'entry':>9} " + " ".join(f"{name:>28}" for name in names))
    for kib in args.sizes:
        data = os.urandom(kib << 10)
        cells = []
        for fn in names.values():
            seconds = best_time(fn, data, args.repeats)
            cells.append(f"{seconds * 1e6:9.1f} us {len(data) / seconds / 1e9:6.2f} GB/s")
        print(f"{kib:>5} KiB " + " ".join(f"{cell:>28}" for cell in cells))
    if args.ttft:
        result = ttft_side_by_side(args.prefix_tokens, args.new_tokens, args.repeats)
        for name, row in result.items():
            runs = " ".join(f"{t * 1000:.0f}" for t in row["times_s"])
            print(
                f"restart-warm TTFT, {name:>11}: median {row['median_s'] * 1000:.0f} ms, min "
                f"{row['min_s'] * 1000:.0f} ms (runs {runs} ms; "
                f"disk hit tokens {row['disk_hit_tokens']})"
            )
        for name, row in result.items():
            print(
                f"disk tier read of the {row['blocks']}-block chain, {name:>11}: min "
                f"{row['chain_read_min_s'] * 1000:.1f} ms, median {row['chain_read_median_s'] * 1000:.1f} ms"
            )
        plain, keyed = result["no secret"]["median_s"], result["tier_secret"]["median_s"]
        print(f"tier_secret adds {(keyed - plain) * 1000:+.0f} ms ({keyed / plain - 1:+.1%}) to the median")
        plain, keyed = result["no secret"]["min_s"], result["tier_secret"]["min_s"]
        print(
            f"tier_secret adds {(keyed - plain) * 1000:+.0f} ms ({keyed / plain - 1:+.1%}) to the fastest run"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
