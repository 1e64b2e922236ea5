"""Does a lower-tier read of one view slow down another view's device hits? Two threads, one store.

* ``warm`` view: prompts of ``--prefix-tokens`` cached in the device pool, each with its own
  ``--new-tokens`` (device-warm TTFT, as ``bench_tiers``'s ``device_warm``);
* ``fetch`` view (a second thread, the same store): prompts of ``--prefix-tokens`` that only the disk tier
  holds, so every call reads them from disk, verifies and promotes them. Its prefixes rotate over
  ``FETCH_SALTS`` namespaces and the pool holds the warm prefix plus two of them, so LRU always evicts the
  one needed next (the warm prefix, touched in between, stays).

The warm view's TTFT is timed in three modes, alternating in blocks of ``--repeats`` calls: ``solo``;
``same_store``, while the fetch view reads through the same store; ``other_store``, while the same fetch
work runs on a store of its own (the control: what the two threads cost each other in cores and memory
bandwidth, with no lock in common). The ratios of the medians are printed. Each thread runs torch with one intra-op
thread, so on a 2-core machine the two views do not compete for cores within torch. Issue 21's target:
same_store / solo <= 1.1 (before, the store's lock was held across the read and the warm view waited).
Run: ``python -m hf_prefix_cache_eval.bench_concurrency``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading

import torch

from hf_prefix_cache import CACHE_KWARG, PrefixCache

from .bench_common import add_prompt_options, finish, print_ratios, prompts_for, timed
from .models import load_model

FETCH_SALTS = 4
BLOCK_SIZE = 16
MODES = ("solo", "same_store", "other_store")
TARGETS = {"same_store / solo": ("<=", 1.1)}


def generate(model, ids, cache):
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, **{CACHE_KWARG: cache}
    )


def run(prefix_tokens: int, new_tokens: int, repeats: int, rounds: int) -> dict:
    torch.set_num_threads(1)
    model, tokenizer = load_model("smollm2")
    prompts = prompts_for(tokenizer, prefix_tokens, new_tokens, 1 + len(MODES) * rounds * repeats)
    fetch_prompts = prompts_for(tokenizer, prefix_tokens, new_tokens, 2)
    folder = tempfile.TemporaryDirectory(prefix="hfpc-concurrency-")
    blocks = -(-(prefix_tokens + new_tokens) // BLOCK_SIZE) + 1  # one prompt and its reply
    # the warm prefix plus about two fetch prefixes: LRU then always evicts the fetch prefix needed next
    warm = PrefixCache(model, block_size=BLOCK_SIZE, num_blocks=int(3.5 * blocks), disk=folder.name)
    # the control: the same fetch work on a store of its own (what two views cost each other in CPU and
    # memory bandwidth alone, with no lock in common)
    apart = tempfile.TemporaryDirectory(prefix="hfpc-concurrency-apart-")
    other = PrefixCache(model, block_size=BLOCK_SIZE, num_blocks=int(2.5 * blocks), disk=apart.name)
    fetchers = {
        "same_store": [
            PrefixCache(model, store=warm.store, cache_salt=f"fetch-{i}") for i in range(FETCH_SALTS)
        ],
        "other_store": [
            PrefixCache(model, store=other.store, cache_salt=f"fetch-{i}") for i in range(FETCH_SALTS)
        ],
    }
    reference = {id(ids): generate(model, ids, None) for ids in (prompts[0], fetch_prompts[0])}
    mismatches = []
    if not torch.equal(generate(model, prompts[0], warm), reference[id(prompts[0])]):
        mismatches.append("warm (first call)")
    for fetcher in [*fetchers["same_store"], *fetchers["other_store"]]:  # every fetch namespace on disk
        if not torch.equal(generate(model, fetch_prompts[0], fetcher), reference[id(fetch_prompts[0])]):
            mismatches.append(f"fetch {fetcher.cache_salt} (first call)")
    warm.flush()
    other.flush()

    stop = threading.Event()
    fetch_calls: list[dict] = []

    def fetch_loop(views):
        turn = 0
        while not stop.is_set():
            fetcher = views[turn % FETCH_SALTS]
            out = generate(model, fetch_prompts[0], fetcher)
            fetch_calls.append(dict(fetcher.last_call.hit_tokens_by_tier))
            if not torch.equal(out, reference[id(fetch_prompts[0])]):
                mismatches.append(f"fetch {fetcher.cache_salt}")
            turn += 1

    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    warm_hits: list[int] = []
    queue = iter(prompts[1:])
    for _ in range(rounds):
        for mode in MODES:
            worker = None
            if mode != "solo":
                stop.clear()
                started = len(fetch_calls)
                worker = threading.Thread(target=fetch_loop, args=(fetchers[mode],), daemon=True)
                worker.start()
                while len(fetch_calls) == started:  # the fetch view is under way (its first call done)
                    threading.Event().wait(0.01)
            for _ in range(repeats):
                ids = next(queue)
                times[mode].append(timed(lambda ids=ids: generate(model, ids, warm)))
                warm_hits.append(warm.last_call.hit_tokens)
            if worker is not None:
                stop.set()
                worker.join()
    median = {mode: statistics.median(values) for mode, values in times.items()}
    tiers_used = [call for call in fetch_calls if call.get("disk", 0) > 0]
    return {
        "prompt_tokens": prompts[0].shape[1],
        "median_seconds": median,
        "seconds": times,
        "ratios": {
            "same_store / solo": median["same_store"] / median["solo"],
            "other_store / solo": median["other_store"] / median["solo"],
            "same_store / other_store": median["same_store"] / median["other_store"],
        },
        "warm_hit_tokens": warm_hits,
        "fetch_calls": len(fetch_calls),
        "fetch_calls_from_disk": len(tiers_used),
        "fetch_hits_by_tier": fetch_calls[:4],
        "mismatches": mismatches,
        "threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_prompt_options(parser, repeats=6, repeats_help="warm calls per block")
    parser.add_argument("--rounds", type=int, default=4, help="solo/concurrent blocks each (default 4)")
    args = parser.parse_args(argv)
    result = run(args.prefix_tokens, args.new_tokens, args.repeats, args.rounds)
    print(
        f"device-warm TTFT, {result['prompt_tokens']} tokens ({args.prefix_tokens} cached), "
        f"{result['threads']} torch thread per view"
    )
    for mode in MODES:
        runs = ", ".join(f"{t * 1000:.0f}" for t in result["seconds"][mode])
        print(f"  {mode:10s} median {result['median_seconds'][mode] * 1000:7.1f} ms   [{runs}]")
    print(
        f"  fetch view: {result['fetch_calls']} calls, {result['fetch_calls_from_disk']} read from disk "
        f"(first: {result['fetch_hits_by_tier'][:2]})"
    )
    print_ratios(result["ratios"], TARGETS, 26)
    return finish(result, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
