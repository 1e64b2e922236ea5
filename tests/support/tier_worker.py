"""A separate interpreter for the disk-tier process tests (restart, crash, concurrency).

python tests/support/tier_worker.py generate FOLDER FAMILY:WEIGHT_SEED:SALT[,...] PROMPT_SEED...
    per spec, one tiny model (WEIGHT_SEED "0e": seed 0 with one k_proj element of layer 0 edited)
    and one PrefixCache over FOLDER; per prompt: generate() without and with
    the cache. Prints one JSON line per spec: per call equal / hit tokens / hits by tier, and tier
    errors. Does NOT flush: interpreter exit must (atexit).
python tests/support/tier_worker.py write FOLDER FIRST COUNT [slow]
    writes synthetic chains FIRST..FIRST+COUNT-1 through a DiskTier; with "slow" each file is written
    half, then the writer sleeps (so a test can SIGKILL it mid-write).
python tests/support/tier_worker.py queue FOLDER COUNT DELAY [EXIT_FLUSH_S]
    puts chains 0..COUNT-1 through a DiskTier whose every file write first sleeps DELAY seconds
    ("hang": forever), prints how many blocks are still queued, and exits WITHOUT flushing: only the
    interpreter-exit flush can land them, bounded by EXIT_FLUSH_S (patched when given).
python tests/support/tier_worker.py read FOLDER COUNT SECONDS
    decodes every entry of chains 0..COUNT-1 it finds, again and again for SECONDS; prints how many
    were valid, missing and invalid (a partial or wrong entry accepted would be a bug).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: support.*, mutants.*

CHAIN_TOKENS = 3 * 4  # 3 blocks of 4 tokens per synthetic chain


def chain_tokens(index: int) -> list[int]:
    return [1000 + index, *list(range(1, CHAIN_TOKENS))]


def generate(folder, specs, *prompt_seeds):
    for spec in specs.split(","):
        generate_one(folder, *spec.split(":"), *prompt_seeds)


def generate_one(folder, family, weight_seed, salt, *prompt_seeds):
    import torch

    from hf_prefix_cache import PrefixCache
    from support.models import random_ids, tiny_model

    model = tiny_model(family, seed=int(weight_seed.removesuffix("e")))
    if weight_seed.endswith("e"):  # "0e": seed 0 with ONE weight element edited (test_identity)
        with torch.no_grad():
            model.model.layers[0].self_attn.k_proj.weight[0, 1] += 5.0
    cache = PrefixCache(model, block_size=4, num_blocks=64, disk=folder, cache_salt=salt or None)
    calls = []
    for seed in prompt_seeds:
        ids = random_ids(37, int(seed))
        ref = model.generate(ids, do_sample=False, max_new_tokens=6)
        out = model.generate(ids, do_sample=False, max_new_tokens=6, cache=cache)
        calls.append(
            {
                "equal": bool(torch.equal(ref, out)),
                "hit_tokens": cache.last_call.hit_tokens,
                "by_tier": cache.last_call.hit_tokens_by_tier,
            }
        )
    print(json.dumps({"calls": calls, "tier_errors": cache.stats.tier_errors}), flush=True)


def write(folder, first, count, slow=""):
    from hf_prefix_cache.tiers import DiskTier
    from hf_prefix_cache.tiers import disk as disk_module
    from support.tiers import LAYOUT, synthetic_chain, tier_ns

    if slow:

        def slow_write(path, data, fsync):
            with open(path, "xb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                print("HALF", path, flush=True)
                time.sleep(60)
                handle.write(data[len(data) // 2 :])

        disk_module.write_file = slow_write
    tier = DiskTier(folder, LAYOUT, max_queued_blocks=10_000, fsync=False)
    for index in range(int(first), int(first) + int(count)):
        tier.put(tier_ns(), synthetic_chain(chain_tokens(index), value=float(index + 1))[1])
    tier.flush(120)
    print(json.dumps({"done": True}), flush=True)


def queue(folder, count, delay, exit_flush_s=""):
    from hf_prefix_cache.tiers import DiskTier
    from hf_prefix_cache.tiers import disk as disk_module
    from hf_prefix_cache.tiers import writer as writer_module
    from support.tiers import LAYOUT, synthetic_chain, tier_ns

    real_write = disk_module.write_file

    def slow_write(path, data, fsync):
        time.sleep(1e9 if delay == "hang" else float(delay))
        real_write(path, data, fsync)

    disk_module.write_file = slow_write
    if exit_flush_s:
        writer_module.EXIT_FLUSH_S = float(exit_flush_s)
    tier = DiskTier(folder, LAYOUT, max_queued_blocks=10_000, fsync=False)
    for index in range(int(count)):
        tier.put(tier_ns(), synthetic_chain(chain_tokens(index), value=float(index + 1))[1])
    print(json.dumps({"queued": tier.writer.pending}), flush=True)


def read(folder, count, seconds):
    from hf_prefix_cache.tiers import DiskTier, EntryError, decode
    from support.tiers import LAYOUT, slot_values, synthetic_chain, tier_ns

    tier = DiskTier(folder, LAYOUT)
    chains = [synthetic_chain(chain_tokens(i), value=float(i + 1))[0] for i in range(int(count))]
    valid = missing = invalid = 0
    problems = []
    deadline = time.monotonic() + float(seconds)
    while True:
        for index, requests in enumerate(chains):
            expected = slot_values(chain_tokens(index), float(index + 1))
            for position, request in enumerate(requests):
                try:
                    data = tier.path(tier_ns(), request.block_hash).read_bytes()
                except FileNotFoundError:
                    missing += 1
                    continue
                try:
                    block = decode(data, tier_ns(), request, LAYOUT)
                except EntryError as error:
                    invalid += 1
                    problems.append(str(error))
                    continue
                part = expected[:, position * 4 : (position + 1) * 4]
                if all(torch_equal(t, part) for t in block.keys + block.values):
                    valid += 1
                else:
                    invalid += 1
                    problems.append("wrong K/V")
        if time.monotonic() > deadline:
            break
    print(
        json.dumps({"valid": valid, "missing": missing, "invalid": invalid, "problems": problems[:5]}),
        flush=True,
    )


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


if __name__ == "__main__":
    if os.environ.get("HF_PREFIX_CACHE_MUTANT"):  # tests/test_mutants.py: the mutant applies here too
        from mutants.catalog import by_name

        by_name(os.environ["HF_PREFIX_CACHE_MUTANT"]).patch()
    mode, *args = sys.argv[1:]
    {"generate": generate, "write": write, "queue": queue, "read": read}[mode](*args)
