"""Fetch or recompute over a slow link: TTFT of recomputing everything, of fetching every stored block,
and of the cost model's choice, per link bandwidth, measured side by side (SmolLM2-135M-Instruct,
2000 cached + 32 new tokens).

A redis-server holds the prefix (a filler cache stores it directly); every cache under test reaches it
through ``throttle_proxy`` (a separate process limiting bytes/s per direction), whose rate the sweep
changes while connections stay open. Two scenarios:

* ``remote``: the whole prefix is only on the server. ``fetch_all`` forces the fetch
  (``remote_min_tokens=0``), ``cost_model`` decides (the default); ``recompute_all`` is plain
  ``generate()``. Fetching is all-or-nothing here: recomputing a later token costs more than an earlier
  one, so the best cut of one tier is at one of its ends.
* ``split``: the first half of the prefix is in the host tier, the second half only on the server
  (``split_fetch_all`` fetches both, ``split_cost_model`` decides): on a slow link the best call takes
  the host half and recomputes the rest, which beats both extremes.

The device pool is emptied before every timed call. At each rate the cost-model caches first make
``--warmups`` untimed calls, so that they measure the link at its new speed (a deployment's link does
not change every call). The sweep goes from fast to slow. Targets: ``cost_model`` TTFT <= 1.05x the
better of ``recompute_all`` and ``fetch_all`` at every rate; ``split_cost_model`` below both where the
split wins. Run: ``python -m hf_prefix_cache_eval.bench_fetch_or_recompute``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from hf_prefix_cache import CACHE_KWARG, PrefixCache

from .bench_common import add_prompt_options, finish, prompts_for
from .bench_remote import redis_server
from .models import load_model
from .throttle_proxy import ThrottleProxy

RATES = (1e9, 3e8, 1e8, 3e7, 1e7)  # bytes/s: 1 GB/s down to 0.01 GB/s
MODES = ("recompute_all", "fetch_all", "cost_model", "split_fetch_all", "split_cost_model")
TARGET = 1.05


def run_benchmark(prefix_tokens, new_tokens, repeats, warmups, rates, latency, seed=0) -> dict:
    model, tokenizer = load_model("smollm2")
    prompts = prompts_for(tokenizer, prefix_tokens, new_tokens, repeats + warmups + 1)

    def generate(ids, cache=None):
        kwargs = {CACHE_KWARG: cache} if cache is not None else {}
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, **kwargs
        )

    with redis_server("4gb") as url:
        port = url.rsplit(":", 1)[1].split("/")[0]
        filler = PrefixCache(model, max_memory="256MiB", remote=url)
        generate(prompts[0], filler)
        assert filler.flush(120)
        proxy = ThrottleProxy(f"127.0.0.1:{port}", rates[0], latency)
        try:
            slow_url = f"redis://127.0.0.1:{proxy.port}/0"
            options = dict(max_memory="256MiB", remote=slow_url, remote_timeout=30)
            caches = {
                "fetch_all": PrefixCache(model, remote_min_tokens=0, **options),
                "cost_model": PrefixCache(model, **options),
                "split_fetch_all": PrefixCache(model, host_memory="1GiB", remote_min_tokens=0, **options),
                "split_cost_model": PrefixCache(model, host_memory="1GiB", **options),
            }
            half = prefix_tokens // 2 // filler.block_size
            references: dict[int, torch.Tensor] = {}
            mismatches = set()

            def call(mode: str, ids: torch.Tensor) -> float:
                cache = caches.get(mode)
                if cache is not None:
                    cache.store.tiers.spill_device()
                    if mode.startswith("split"):
                        forget_host_after(cache, ids, half)
                start = time.perf_counter()
                out = generate(ids, cache)
                seconds = time.perf_counter() - start
                if cache is not None:
                    cache.flush(60)
                    if id(ids) not in references:
                        references[id(ids)] = generate(ids)
                    if not torch.equal(out, references[id(ids)]):
                        mismatches.add(mode)
                return seconds

            for mode in caches:  # stores nothing new on the server; fills the host tiers
                call(mode, prompts[0])
            order = random.Random(seed)
            sweep = []
            for rate in rates:
                proxy.set(rate, latency)
                for index in range(warmups):  # the fixed policies have nothing to learn
                    for mode in ("cost_model", "split_cost_model"):
                        call(mode, prompts[1 + index])
                times: dict[str, list[float]] = {mode: [] for mode in MODES}
                plans: dict[str, list] = {"cost_model": [], "split_cost_model": []}
                for index in range(repeats):
                    ids = prompts[1 + warmups + index]
                    modes = list(MODES)
                    order.shuffle(modes)
                    for mode in modes:
                        times[mode].append(call(mode, ids))
                        if mode in plans:
                            plans[mode].append(caches[mode].last_call.fetch)
                median = {mode: statistics.median(values) for mode, values in times.items()}
                best = min(median["recompute_all"], median["fetch_all"])
                split_best = min(median["recompute_all"], median["split_fetch_all"])
                sweep.append(
                    {
                        "rate_bytes_per_s": rate,
                        "median_seconds": median,
                        "seconds": times,
                        "cost_model / best": median["cost_model"] / best,
                        "split_cost_model / best": median["split_cost_model"] / split_best,
                        "plans": plans,
                    }
                )
        finally:
            proxy.close()
    return {
        "prompt_tokens": prefix_tokens + new_tokens,
        "latency_s": latency,
        "sweep": sweep,
        "mismatches": sorted(mismatches),
        "threads": torch.get_num_threads(),
    }


def forget_host_after(cache: PrefixCache, ids: torch.Tensor, blocks: int) -> None:
    """Leave only the first ``blocks`` blocks of ``ids`` in the host tier (the rest: only on the server)."""
    tiers = cache.store.tiers
    digest = tiers.namespace(cache.namespace, cache.extra_keys)
    for block_hash in cache.block_hashes(ids[0].tolist())[blocks:]:
        tiers.host.delete(digest, block_hash)


def summary(plans: list) -> str:
    """What the cost model fetched in the timed calls, e.g. ``remote 2000 x3``."""
    seen: dict[str, int] = {}
    for plan in plans:
        fetched = plan[0]["fetch"] if plan else {}
        text = "+".join(f"{tier} {tokens}" for tier, tokens in fetched.items()) or "recompute"
        seen[text] = seen.get(text, 0) + 1
    return ", ".join(f"{text} x{count}" for text, count in seen.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_prompt_options(parser, 2, "timed repetitions per mode and rate")
    parser.add_argument("--warmups", type=int, default=2, help="untimed calls per cache at each rate")
    parser.add_argument("--rates", type=float, nargs="+", default=list(RATES), help="bytes/s, fast first")
    parser.add_argument("--latency", type=float, default=0.0, help="one-way link latency in seconds")
    args = parser.parse_args(argv)
    result = run_benchmark(
        args.prefix_tokens, args.new_tokens, args.repeats, args.warmups, args.rates, args.latency
    )
    print(f"\nSmolLM2-135M-Instruct, {result['prompt_tokens']} prompt tokens, {result['threads']} threads")
    header = " ".join(f"{mode:>17s}" for mode in MODES)
    print(f"{'GB/s':>6s} {header}   cost/best  split cost/best")
    for point in result["sweep"]:
        cells = " ".join(f"{point['median_seconds'][mode] * 1000:14.0f} ms" for mode in MODES)
        ratio, split = point["cost_model / best"], point["split_cost_model / best"]
        print(
            f"{point['rate_bytes_per_s'] / 1e9:6.2f} {cells}   {ratio:6.3f}{' ok' if ratio <= TARGET else ' MISSED'}"
            f"  {split:6.3f}{' ok' if split <= TARGET else ' MISSED'}"
        )
        print(
            f"       cost_model: {summary(point['plans']['cost_model'])}; "
            f"split_cost_model: {summary(point['plans']['split_cost_model'])}"
        )
    if result["mismatches"]:
        print(f"OUTPUT MISMATCH in {result['mismatches']}")
    return finish(result, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
