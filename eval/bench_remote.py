"""remote-warm: time to first token in a process whose only source of K/V is a Redis tier that another
process filled, against plain generate() in the same process, interleaved (only ratios measured side by
side mean anything on a shared machine).

1. A redis-server is started on a free localhost port (``maxmemory`` + ``allkeys-lru``, no persistence),
   unless ``--url`` names one.
2. A filler subprocess loads SmolLM2, runs the ~2000-token prefix through a ``PrefixCache(remote=url)``
   and exits (its queued writes are flushed at exit).
3. This process loads the model and, per repetition (each with a new 32-token suffix), times
   ``generate(max_new_tokens=1)``: ``no_cache``, ``device_warm`` (the prefix in a device pool, as in
   ``bench_tiers``), ``remote_warm`` with a brand-new ``PrefixCache`` (empty device pool: every hit
   comes from the server; making it is not timed, but its pool's pages are touched for the first time
   in the call), and ``remote_spilled``: one long-lived cache whose 256 MiB pool was cycled through
   first and is emptied (untimed) before each call, as ``bench_tiers``' ``disk_warm`` (a long-running
   process whose pool is full, the only case a lower tier serves).

Prints the TTFT ratios (no cache / remote warm, target >= 8x; remote warm / device warm, target
<= 1.3x), the bytes per block on the server and the achieved Redis read throughput (bytes fetched /
seconds in MGET, decode excluded). Run:
``python -m hf_prefix_cache_eval.bench_remote --prefix-tokens 2000 --new-tokens 32``.
``--cluster`` instead compares remote-warm on a local 3-master Redis Cluster with remote-warm on one
server, interleaved (``bench_cluster.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import torch

from hf_prefix_cache import CACHE_KWARG, PrefixCache

from .bench_common import (
    add_prompt_options,
    fill_pool,
    finish,
    print_modes,
    prompts_for,
    real_text_ids,
    timed,
    verdict,
)
from .models import load_model

TARGET = 8.0
DEVICE_TARGET = 1.3  # remote_warm / device_warm (issue 24)
MODES = ("no_cache", "device_warm", "remote_warm", "remote_spilled")


@contextmanager
def redis_server(maxmemory: str = "2gb"):
    """A throw-away redis-server on a free localhost port; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server), or pass --url")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder = tempfile.mkdtemp(prefix="bench-redis-")
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--maxmemory", maxmemory, "--maxmemory-policy", "allkeys-lru", "--dir", folder],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("redis-server did not start") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def fill(url: str, prefix_tokens: int) -> dict:
    """The filler process: store the prefix on the server, then report what was written."""
    model, tokenizer = load_model("smollm2")
    prefix = real_text_ids(tokenizer, prefix_tokens)
    cache = PrefixCache(model, max_memory="256MiB", remote=url)
    ids = torch.tensor([[*prefix, tokenizer.eos_token_id]])
    model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, **{CACHE_KWARG: cache}
    )
    flushed = cache.flush(120)
    remote = cache.stats.tiers["remote"]
    return {"flushed": flushed, **{k: remote[k] for k in ("puts", "bytes_written", "write_s", "errors")}}


def run_benchmark(url: str, prefix_tokens: int, new_tokens: int, repeats: int, seed: int = 0) -> dict:
    filler = subprocess.run(
        [sys.executable, "-m", "hf_prefix_cache_eval.bench_remote", "--fill", url,
         "--prefix-tokens", str(prefix_tokens)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    if filler.returncode != 0:
        raise SystemExit(f"the filler process failed:\n{filler.stderr[-3000:]}")
    filled = json.loads(filler.stdout.strip().splitlines()[-1])

    model, tokenizer = load_model("smollm2")
    prompts = prompts_for(tokenizer, prefix_tokens, new_tokens, repeats + 1)

    def generate(ids, **kwargs):
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, **kwargs
        )

    caches: list[PrefixCache] = []

    def remote_warm(ids):
        return generate(ids, **{CACHE_KWARG: caches[-1]})

    def fresh_cache() -> None:
        caches.clear()  # the previous pool is freed first
        caches.append(PrefixCache(model, max_memory="256MiB", remote=url))

    device = PrefixCache(model, max_memory="1GiB")
    spilled = PrefixCache(model, max_memory="256MiB", remote=url)
    calls = {
        "no_cache": generate,
        "device_warm": lambda ids: generate(ids, **{CACHE_KWARG: device}),
        "remote_warm": remote_warm,
        "remote_spilled": lambda ids: generate(ids, **{CACHE_KWARG: spilled}),
    }
    calls["device_warm"](prompts[0])  # stores the prefix in the device pool
    fill_pool(spilled, calls["remote_spilled"], prompts[0])
    fresh_cache()
    reference = generate(prompts[0])
    mismatches = ["remote_warm"] if not torch.equal(remote_warm(prompts[0]), reference) else []
    spilled.store.tiers.spill_device()
    if not torch.equal(calls["remote_spilled"](prompts[0]), reference):
        mismatches.append("remote_spilled")
    spilled_hits = []
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    hits, fetched, fetch_s, blocks = [], 0, 0.0, 0
    order = random.Random(seed)
    for ids in prompts[1:]:
        modes = list(MODES)
        order.shuffle(modes)
        outputs = {}
        for mode in modes:
            if mode == "remote_warm":
                fresh_cache()
            if mode == "remote_spilled":
                spilled.store.tiers.spill_device()

            def call(mode=mode, ids=ids, outputs=outputs):
                outputs[mode] = calls[mode](ids)

            times[mode].append(timed(call))
            if mode == "remote_warm":
                cache = caches[-1]
                hits.append(dict(cache.last_call.hit_tokens_by_tier))
                remote = cache.stats.tiers["remote"]
                fetched += remote["bytes_read"]
                fetch_s += remote["read_s"]
                blocks += remote["hits"]
            if mode == "remote_spilled":
                spilled_hits.append(dict(spilled.last_call.hit_tokens_by_tier))
        for mode in ("device_warm", "remote_warm", "remote_spilled"):
            if not torch.equal(outputs[mode], outputs["no_cache"]) and mode not in mismatches:
                mismatches.append(mode)
    median = {mode: statistics.median(values) for mode, values in times.items()}
    return {
        "prompt_tokens": prefix_tokens + new_tokens,
        "filler": filled,
        "remote_warm_hits_by_tier": hits,
        "median_seconds": median,
        "seconds": times,
        "ratio": median["no_cache"] / median["remote_warm"],
        "remote_over_device": median["remote_warm"] / median["device_warm"],
        "spilled_over_device": median["remote_spilled"] / median["device_warm"],
        "remote_spilled_hits_by_tier": spilled_hits,
        "bytes_per_block": fetched / blocks if blocks else 0,
        "read_bytes_per_s": fetched / fetch_s if fetch_s else 0.0,
        "fetch_s_per_call": fetch_s / len(hits) if hits else 0.0,
        "write_bytes_per_s": filled["bytes_written"] / filled["write_s"] if filled["write_s"] else 0.0,
        "mismatches": mismatches,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_prompt_options(parser, 5, "timed repetitions per mode")
    parser.add_argument("--url", help="an existing Redis/Valkey server (default: start a throw-away one)")
    parser.add_argument("--fill", metavar="URL", help=argparse.SUPPRESS)  # the filler subprocess
    parser.add_argument(
        "--cluster", action="store_true", help="remote-warm on a 3-master cluster vs on one server"
    )
    parser.add_argument("--cluster-url", help="with --cluster: an existing redis+cluster:// cluster")
    args = parser.parse_args(argv)
    if args.fill:
        print(json.dumps(fill(args.fill, args.prefix_tokens)), flush=True)
        return 0
    if args.cluster:
        from .bench_cluster import main as cluster_main

        return cluster_main(args)
    if args.url:
        result = run_benchmark(args.url, args.prefix_tokens, args.new_tokens, args.repeats)
    else:
        with redis_server() as url:
            result = run_benchmark(url, args.prefix_tokens, args.new_tokens, args.repeats)
    MiB = 1024 * 1024
    filled = result["filler"]
    print(f"\nSmolLM2-135M-Instruct, {result['prompt_tokens']} prompt tokens, {result['threads']} threads")
    print(
        f"filler process: {filled['puts']} blocks, {filled['bytes_written'] / MiB:.1f} MiB written at "
        f"{result['write_bytes_per_s'] / MiB:.0f} MiB/s, flushed={filled['flushed']}"
    )
    print(f"remote_warm hit tokens by tier per repetition: {result['remote_warm_hits_by_tier']}")
    print_modes(result, MODES, 11)
    print(f"  no_cache / remote_warm {result['ratio']:7.2f}{verdict(result['ratio'], ('>=', TARGET))}")
    over = result["remote_over_device"]
    print(f"  remote_warm / device_warm {over:7.3f}{verdict(over, ('<=', DEVICE_TARGET))}")
    print(
        f"  remote_spilled / device_warm {result['spilled_over_device']:7.3f}   (a long-running process's "
        f"pool, pages committed; hits by tier {result['remote_spilled_hits_by_tier'][-1]})"
    )
    print(
        f"  bytes per block {result['bytes_per_block'] / 1024:.0f} KiB; Redis read throughput "
        f"{result['read_bytes_per_s'] / MiB:.0f} MiB/s ({result['fetch_s_per_call'] * 1000:.0f} ms of "
        f"fetching per call)"
    )
    return finish(result, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
