"""remote-warm on a 3-master Redis Cluster against remote-warm on one Redis server, interleaved in one
run (``python -m hf_prefix_cache_eval.bench_remote --cluster``; target: cluster <= 1.1x one server).

1. A local 3-master cluster and one redis-server start on free localhost ports (or ``--url`` and
   ``--cluster-url`` name existing ones).
2. A filler subprocess (``bench_remote --fill``) stores the ~2000-token prefix on each.
3. Per repetition (each with a new 32-token suffix), in a shuffled order: ``no_cache``, ``remote_warm``
   (a brand-new ``PrefixCache`` on the server) and ``cluster_warm`` (a brand-new one on the cluster);
   making the caches is not timed.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
from contextlib import ExitStack

import torch

from hf_prefix_cache import CACHE_KWARG, PrefixCache

from .bench_common import finish, print_modes, prompts_for, timed, verdict
from .local_redis import keys_per_master, local_cluster, local_server
from .models import load_model

TARGET = 1.1
MODES = ("no_cache", "remote_warm", "cluster_warm")


def fill(url: str, prefix_tokens: int) -> dict:
    filler = subprocess.run(
        [sys.executable, "-m", "hf_prefix_cache_eval.bench_remote", "--fill", url,
         "--prefix-tokens", str(prefix_tokens)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    if filler.returncode != 0:
        raise SystemExit(f"the filler process failed:\n{filler.stderr[-3000:]}")
    return json.loads(filler.stdout.strip().splitlines()[-1])


def run_benchmark(urls: dict[str, str], prefix_tokens: int, new_tokens: int, repeats: int, seed=0) -> dict:
    """``urls``: mode -> the URL its fresh caches use (``remote_warm`` and ``cluster_warm``)."""
    filled = {mode: fill(url, prefix_tokens) for mode, url in urls.items()}
    model, tokenizer = load_model("smollm2")
    prompts = prompts_for(tokenizer, prefix_tokens, new_tokens, repeats + 1)
    caches: list[PrefixCache] = []

    def generate(ids, **kwargs):
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, **kwargs
        )

    def warm(ids):
        return generate(ids, **{CACHE_KWARG: caches[-1]})

    def fresh_cache(url: str) -> None:
        caches.clear()  # the previous pool is freed first
        caches.append(PrefixCache(model, max_memory="256MiB", remote=url))

    reference = generate(prompts[0])
    mismatches = []
    for mode, url in urls.items():  # one untimed warm-up call each
        fresh_cache(url)
        if not torch.equal(warm(prompts[0]), reference):
            mismatches.append(mode)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    hits: dict[str, list[dict]] = {mode: [] for mode in urls}
    read = {mode: [0, 0.0] for mode in urls}
    order = random.Random(seed)
    for ids in prompts[1:]:
        modes = list(MODES)
        order.shuffle(modes)
        outputs = {}
        for mode in modes:
            if mode in urls:
                fresh_cache(urls[mode])

            def call(mode=mode, ids=ids, outputs=outputs):
                outputs[mode] = warm(ids) if mode in urls else generate(ids)

            times[mode].append(timed(call))
            if mode in urls:
                hits[mode].append(dict(caches[-1].last_call.hit_tokens_by_tier))
                remote = caches[-1].stats.tiers["remote"]
                read[mode][0] += remote["bytes_read"]
                read[mode][1] += remote["read_s"]
        for mode in urls:
            if not torch.equal(outputs[mode], outputs["no_cache"]) and mode not in mismatches:
                mismatches.append(mode)
    caches.clear()
    median = {mode: statistics.median(values) for mode, values in times.items()}
    return {
        "prompt_tokens": prefix_tokens + new_tokens,
        "filler": filled,
        "hits_by_tier": hits,
        "keys_per_master": keys_per_master(urls["cluster_warm"]),
        "median_seconds": median,
        "seconds": times,
        "ratio": median["cluster_warm"] / median["remote_warm"],
        # the same ratio per repetition (both ran back to back), then its median: less swayed by load
        "paired_ratio": statistics.median(c / r for c, r in zip(times["cluster_warm"], times["remote_warm"])),
        "speedup_vs_no_cache": {mode: median["no_cache"] / median[mode] for mode in urls},
        "read_bytes_per_s": {mode: b / s if s else 0.0 for mode, (b, s) in read.items()},
        "mismatches": mismatches,
        "threads": torch.get_num_threads(),
    }


def main(args) -> int:
    """``bench_remote --cluster``: start what ``--url`` / ``--cluster-url`` do not name, run, print."""
    with ExitStack() as stack:
        server = args.url or stack.enter_context(local_server())
        cluster = args.cluster_url or stack.enter_context(local_cluster(3))
        result = run_benchmark(
            {"remote_warm": server, "cluster_warm": cluster},
            args.prefix_tokens,
            args.new_tokens,
            args.repeats,
        )
    MiB = 1024 * 1024
    print(f"\nSmolLM2-135M-Instruct, {result['prompt_tokens']} prompt tokens, {result['threads']} threads")
    print(f"cluster keys per master: {result['keys_per_master']}")
    for mode, hits in result["hits_by_tier"].items():
        print(f"{mode} hit tokens by tier per repetition: {hits}")
    print_modes(result, MODES, 12)
    for mode, speedup in result["speedup_vs_no_cache"].items():
        rate = result["read_bytes_per_s"][mode] / MiB
        print(f"  no_cache / {mode:12s} {speedup:7.2f}   (read throughput {rate:.0f} MiB/s)")
    print(f"  cluster_warm / remote_warm {result['ratio']:7.2f}{verdict(result['ratio'], ('<=', TARGET))}")
    print(f"  median of the per-repetition ratios {result['paired_ratio']:.2f}")
    return finish(result, args.json)
