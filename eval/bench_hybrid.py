"""Time to first token on a hybrid model (Gated DeltaNet + attention): no cache vs warm vs cold, one run.

The model is ``--model qwen3_5-random`` (``models.random_hybrid``: Qwen3.5-shaped, random weights, about
330 MB in fp32, the torch reference kernels on CPU). Four ways are timed on the same prompts, interleaved
in a random order per repetition (only ratios measured side by side mean anything here):

* ``no_cache`` - plain ``generate()`` over the whole prompt;
* ``warm``     - a ``PrefixCache`` holding the prefix and its state snapshot (each repetition: a new suffix);
* ``cold``     - a new ``PrefixCache`` made inside the timed call (construction, a probe forward, 0% hits);
* ``split``    - a view with a new salt on an existing store (0% hits): what stopping the prefill at the
                 snapshot positions (the ladder and the prompt's last block boundary) and storing costs.

TTFT is one ``generate(max_new_tokens=1)`` call, storing included. Also printed: the bytes of one state
snapshot against one K/V block. Run: ``python -m hf_prefix_cache_eval.bench_hybrid``.
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch
from tqdm import tqdm

from hf_prefix_cache import CACHE_KWARG, PrefixCache

from .bench_common import add_prompt_options, finish, print_modes, print_ratios, real_text_ids, timed
from .models import load_model

MODES = ("no_cache", "warm", "cold", "split")
TARGETS = {
    "no_cache / warm": (">=", 5.0),
    "cold / no_cache": ("<=", 1.05),
}


def run_benchmark(prefix_tokens: int = 2000, new_tokens: int = 32, repeats: int = 3, seed: int = 0) -> dict:
    model, tokenizer = load_model("qwen3_5-random")
    prefix = real_text_ids(tokenizer, prefix_tokens)
    suffixes = [
        real_text_ids(tokenizer, new_tokens, skip=prefix_tokens + i * new_tokens) for i in range(repeats + 1)
    ]
    prompts = [torch.tensor([prefix + suffix]) for suffix in suffixes]

    def generate(ids, **kwargs):
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, **kwargs
        )

    warm_cache = PrefixCache(model, max_memory="1GiB")
    generate(torch.tensor([[*prefix, tokenizer.eos_token_id]]), **{CACHE_KWARG: warm_cache})  # stores it
    shared = PrefixCache(model, max_memory="1GiB")
    salts = iter(range(10**6))

    def cold(ids):  # a new cache per call: its construction is timed too
        return generate(ids, **{CACHE_KWARG: PrefixCache(model, max_memory="1GiB")})

    def split(ids):  # a new namespace on an existing store: nothing hits, everything is stored
        view = PrefixCache(model, store=shared.store, cache_salt=f"run {next(salts)}")
        return generate(ids, **{CACHE_KWARG: view})

    calls = {
        "no_cache": lambda ids: generate(ids),
        "warm": lambda ids: generate(ids, **{CACHE_KWARG: warm_cache}),
        "cold": cold,
        "split": split,
    }
    outputs = {mode: calls[mode](prompts[0]) for mode in MODES}  # warm-up, not timed
    mismatches = [mode for mode in MODES if not torch.equal(outputs[mode], outputs["no_cache"])]
    warm_hits = []
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    order = random.Random(seed)
    for ids in tqdm(prompts[1:], desc="repetitions"):
        modes = list(MODES)
        order.shuffle(modes)
        for mode in modes:
            times[mode].append(timed(lambda mode=mode, ids=ids: calls[mode](ids)))
            if mode == "warm":
                warm_hits.append(warm_cache.last_call.hit_tokens)
    median = {mode: statistics.median(values) for mode, values in times.items()}
    stats = warm_cache.stats
    snapshot_bytes = stats.snapshot_bytes // max(1, stats.snapshots)
    block_bytes = warm_cache.store.kv.block_bytes()
    return {
        "prompt_tokens": prefix_tokens + new_tokens,
        "parameters": sum(p.numel() for p in model.parameters()),
        "warm_hit_tokens": warm_hits,
        "median_seconds": median,
        "seconds": times,
        "ratios": {
            "no_cache / warm": median["no_cache"] / median["warm"],
            "cold / no_cache": median["cold"] / median["no_cache"],
            "split / no_cache": median["split"] / median["no_cache"],
        },
        "bytes_per_snapshot": snapshot_bytes,
        "bytes_per_block": block_bytes,
        "block_size": warm_cache.block_size,
        "snapshots_held": stats.snapshots,
        "mismatches": mismatches,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_prompt_options(parser, 3, "timed repetitions per mode")
    args = parser.parse_args(argv)
    result = run_benchmark(args.prefix_tokens, args.new_tokens, args.repeats)
    print(
        f"\nrandom Qwen3.5-shaped hybrid ({result['parameters'] / 1e6:.0f}M parameters, fp32), "
        f"{result['prompt_tokens']} prompt tokens, {result['threads']} threads"
    )
    print(f"warm hit tokens per repetition: {result['warm_hit_tokens']}")
    print(
        f"one state snapshot: {result['bytes_per_snapshot']:,} bytes; one K/V block of "
        f"{result['block_size']} tokens: {result['bytes_per_block']:,} bytes "
        f"({result['bytes_per_snapshot'] / result['bytes_per_block']:.1f} blocks)"
    )
    print_modes(result, MODES, 9)
    print_ratios(result["ratios"], TARGETS, 16)
    return finish(result, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
