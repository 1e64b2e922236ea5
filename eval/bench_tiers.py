"""Time to first token from the lower tiers: host-warm and restart-warm (disk), beside no cache and a
warm device pool, measured side by side in one run (SmolLM2-135M-Instruct, 2000 cached + 32 new tokens).

Modes timed in this process, interleaved in a random order per repetition:

* ``no_cache``     - plain ``generate()`` over the whole prompt;
* ``device_warm``  - the prefix is in the device pool (as ``bench_ttft``'s ``warm``);
* ``host_warm``    - the device pool is emptied before each call (its blocks written back to the host
                     tier), so the prefix is promoted from host RAM. Its pool (like ``disk_warm``'s) is
                     256 MiB and cycled through untimed first, so its pages are committed as in a
                     long-running process whose pool is full (the only case a lower tier serves); the
                     first touch of fresh pool memory is what the restart modes measure;
* ``disk_warm``    - device pool emptied, no host tier: promoted from the disk tier (OS page cache warm);
* ``disk_cold``    - the same after ``posix_fadvise(DONTNEED)`` on every entry file (page cache dropped
                     for them; reported only where the OS honours it).

Then ``restart_warm`` / ``restart_cold``: a fresh interpreter per repetition loads the model, makes a
``PrefixCache(disk=...)`` over the folder this run filled, warms up generate() on 4 unrelated tokens, and
times its first cached call, a no-cache call on the same prompt, and a device-warm call (another suffix:
the prefix is on its device by then), side by side. Its no-cache ratio is the restart figure; its first
call is compared with this process's device-warm median and with its own device-warm call (the one
taken moments apart in the same process, free of the drift between processes). Run: ``python -m hf_prefix_cache_eval.bench_tiers --prefix-tokens 2000 --new-tokens 32``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from hf_prefix_cache import PrefixCache

from .bench_common import add_prompt_options, fill_pool, finish, print_modes, print_ratios, prompts_for, timed
from .models import load_model

SPILLED_POOL = "256MiB"  # device pool of the host/disk modes: small, so a few promotions commit it all
MODES = ("no_cache", "device_warm", "host_warm", "disk_warm", "disk_cold")
TARGETS = {
    "restart_warm: no_cache / cached": (">=", 10.0),
    "host_warm / device_warm": ("<=", 1.05),
    "disk_warm / device_warm": ("<=", 1.3),
    "restart_warm / device_warm": ("<=", 1.3),
    "restart_warm / its own device_warm": ("<=", 1.3),
}


def drop_page_cache(folder: Path) -> bool:
    """Ask the OS to forget the cached pages of every entry file; False where that is unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in folder.rglob("*.kvb"):
        with open(path, "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return True


def generate(model, ids, **kwargs):
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, **kwargs
    )


def disk_read_throughput(cache: PrefixCache, ids: torch.Tensor, cold: bool) -> dict:
    """Bytes and seconds of reading + verifying the prefix's chain straight from the disk tier."""
    from hf_prefix_cache.hashing import hash_blocks, root_hash
    from hf_prefix_cache.tiers import BlockRequest

    tiers = cache.store.tiers
    disk = tiers.tiers[-1]
    tokens = ids[0].tolist()
    size = cache.block_size
    hashes = hash_blocks(root_hash(cache.namespace), tokens, size)
    root = root_hash(cache.namespace)
    requests = [
        BlockRequest(h, hashes[i - 1] if i else root, tuple(tokens[i * size : (i + 1) * size]))
        for i, h in enumerate(hashes)
    ]
    digest = tiers.namespace(cache.namespace)
    if cold:
        drop_page_cache(disk.folder)
    before = disk.counters.bytes_read
    start = time.perf_counter()
    blocks = disk.get(digest, requests)
    seconds = time.perf_counter() - start
    read = disk.counters.bytes_read - before
    return {"blocks": len(blocks), "bytes": read, "seconds": seconds, "MB_per_s": read / seconds / 1e6}


def run_benchmark(prefix_tokens=2000, new_tokens=32, repeats=3, restarts=2, seed=0, folder=None) -> dict:
    model, tokenizer = load_model("smollm2")
    prompts = prompts_for(tokenizer, prefix_tokens, new_tokens, repeats + 1)
    folder = Path(folder or tempfile.mkdtemp(prefix="hf_prefix_cache_bench_"))
    device = PrefixCache(model, max_memory="1GiB")
    host = PrefixCache(model, max_memory=SPILLED_POOL, host_memory="1GiB")
    disk = PrefixCache(model, max_memory=SPILLED_POOL, disk=folder)
    for cache in (device, host, disk):
        generate(model, prompts[0], cache=cache)  # stores the prefix (and warms up)
    assert disk.flush(120)
    for cache in (host, disk):
        fill_pool(cache, partial(generate, model, cache=cache), prompts[0])
    entries = sorted(folder.rglob("*.kvb"))
    bytes_per_entry = statistics.median(path.stat().st_size for path in entries)
    kv_bytes_per_block = sum(layout.block_bytes(device.block_size) for layout in device.store.layouts)

    def spilled(cache, cold=False):
        def call(ids):
            cache.store.tiers.spill_device()
            if cold:
                drop_page_cache(folder)
            return generate(model, ids, cache=cache)

        return call

    calls = {
        "no_cache": lambda ids: generate(model, ids),
        "device_warm": lambda ids: generate(model, ids, cache=device),
        "host_warm": spilled(host),
        "disk_warm": spilled(disk),
        "disk_cold": spilled(disk, cold=True),
    }
    reference = generate(model, prompts[0])
    mismatches = [mode for mode in MODES if not torch.equal(calls[mode](prompts[0]), reference)]
    hits: dict[str, list] = {mode: [] for mode in MODES}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    owners = {"device_warm": device, "host_warm": host, "disk_warm": disk, "disk_cold": disk}
    order = random.Random(seed)
    for ids in prompts[1:]:
        modes = list(MODES)
        order.shuffle(modes)
        for mode in modes:
            if mode in ("host_warm", "disk_warm", "disk_cold"):
                owners[mode].store.tiers.spill_device()  # untimed here; the call spills again (cheap)
            times[mode].append(timed(lambda mode=mode, ids=ids: calls[mode](ids)))
            if mode in owners:
                hits[mode].append(dict(owners[mode].last_call.hit_tokens_by_tier))
    median = {mode: statistics.median(values) for mode, values in times.items()}
    throughput = {
        "page_cache_warm": disk_read_throughput(disk, prompts[1], cold=False),
        "page_cache_cold": disk_read_throughput(disk, prompts[1], cold=True),
    }
    restart = run_restarts(folder, prefix_tokens, new_tokens, restarts)
    ratios = {
        "no_cache / device_warm": median["no_cache"] / median["device_warm"],
        "no_cache / host_warm": median["no_cache"] / median["host_warm"],
        "host_warm / device_warm": median["host_warm"] / median["device_warm"],
        "no_cache / disk_warm": median["no_cache"] / median["disk_warm"],
        "disk_warm / device_warm": median["disk_warm"] / median["device_warm"],
        "no_cache / disk_cold": median["no_cache"] / median["disk_cold"],
        **{f"{kind}: no_cache / cached": value["ratio"] for kind, value in restart.items()},
        # a fresh process's first call against this process's device-warm calls (issue 24's target)
        **{
            f"{kind} / device_warm": value["cached_s"] / median["device_warm"]
            for kind, value in restart.items()
        },
        # the same first call over a device-warm call in the same fresh process (side by side)
        **{f"{kind} / its own device_warm": value["over_own_device_warm"] for kind, value in restart.items()},
    }
    return {
        "prompt_tokens": prompts[0].shape[1],
        "bytes_per_entry": bytes_per_entry,
        "kv_bytes_per_block": kv_bytes_per_block,
        "entries": len(entries),
        "hits": hits,
        "median_seconds": median,
        "seconds": times,
        "disk_read": throughput,
        "restart": restart,
        "ratios": ratios,
        "mismatches": mismatches + [k for k, v in restart.items() if not v["equal"]],
        "threads": torch.get_num_threads(),
        "folder": str(folder),
    }


def run_restarts(folder: Path, prefix_tokens: int, new_tokens: int, count: int) -> dict:
    """Fresh interpreters over ``folder``: ``count`` with the page cache as it is, ``count`` dropped."""
    results: dict[str, dict] = {}
    for kind in ("restart_warm", "restart_cold"):
        runs = []
        for index in range(count):
            if kind == "restart_cold" and not drop_page_cache(folder):
                break
            command = [
                sys.executable,
                "-m",
                "hf_prefix_cache_eval.bench_tiers",
                "--child",
                str(folder),
                "--prefix-tokens",
                str(prefix_tokens),
                "--new-tokens",
                str(new_tokens),
                "--suffix",
                str(10 + index),
            ]
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        if runs:
            cached = statistics.median(run["cached_s"] for run in runs)
            plain = statistics.median(run["no_cache_s"] for run in runs)
            results[kind] = {
                "runs": runs,
                "cached_s": cached,
                "no_cache_s": plain,
                "device_warm_s": statistics.median(run["device_warm_s"] for run in runs),
                # per run, the first call over that same process's device-warm call moments later
                "over_own_device_warm": statistics.median(
                    run["cached_s"] / run["device_warm_s"] for run in runs
                ),
                "ratio": plain / cached,
                "equal": all(run["equal"] for run in runs),
            }
    return results


def child(folder: str, prefix_tokens: int, new_tokens: int, suffix: int) -> None:
    """One restart: a new process whose only source is the disk tier an earlier process filled."""
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2")
    loaded = time.perf_counter() - start
    prompts = prompts_for(tokenizer, prefix_tokens, new_tokens, suffix + 2)
    ids, other = prompts[suffix], prompts[suffix + 1]
    start = time.perf_counter()
    cache = PrefixCache(model, max_memory="1GiB", disk=folder)
    made = time.perf_counter() - start
    generate(model, torch.tensor([ids[0, -4:].tolist()]))  # warm-up on 4 unrelated tokens
    start = time.perf_counter()
    cached = generate(model, ids, cache=cache)
    cached_s = time.perf_counter() - start
    by_tier = dict(cache.last_call.hit_tokens_by_tier)
    start = time.perf_counter()
    plain = generate(model, ids)
    no_cache_s = time.perf_counter() - start
    equal = torch.equal(cached, plain)
    start = time.perf_counter()  # the prefix is on the device now: this process's own device-warm call
    generate(model, other, cache=cache)
    device_warm_s = time.perf_counter() - start
    result = {
        "model_load_s": loaded,
        "cache_init_s": made,
        "cached_s": cached_s,
        "no_cache_s": no_cache_s,
        "device_warm_s": device_warm_s,
        "hit_tokens_by_tier": by_tier,
        "equal": bool(equal),
    }
    print(json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_prompt_options(parser, 3, "timed repetitions per in-process mode")
    parser.add_argument("--restarts", type=int, default=2, help="fresh processes per restart mode")
    parser.add_argument("--folder", help="disk tier folder (default: a new temporary folder)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--suffix", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.prefix_tokens, args.new_tokens, args.suffix)
        return 0
    folder = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix="hf_prefix_cache_bench_"))
    try:
        result = run_benchmark(
            args.prefix_tokens, args.new_tokens, args.repeats, args.restarts, folder=folder
        )
    finally:
        if not args.folder:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"\nSmolLM2-135M-Instruct, {result['prompt_tokens']} prompt tokens, {result['threads']} threads")
    print(
        f"K/V per 16-token block {result['kv_bytes_per_block'] / 1024:.0f} KiB; "
        f"disk entry {result['bytes_per_entry'] / 1024:.1f} KiB; {result['entries']} entries"
    )
    for name, value in result["disk_read"].items():
        print(f"  disk read+verify, {name:16s} {value['MB_per_s']:8.0f} MB/s ({value['blocks']} blocks)")
    print_modes(result, MODES, 12)
    for kind, value in result["restart"].items():
        print(
            f"  {kind:12s} first call {value['cached_s'] * 1000:8.1f} ms vs no cache "
            f"{value['no_cache_s'] * 1000:.1f} ms and device warm {value['device_warm_s'] * 1000:.1f} ms in the "
            f"same fresh process"
        )
    print_ratios(result["ratios"], TARGETS, 32)
    return finish(result, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
