"""Time to first token with a long cached prefix: no cache vs the ideal copy vs PrefixCache, in one run.

Four ways are timed on the same prompts, interleaved in a random order per repetition (this machine is
shared and noisy, so only ratios measured side by side mean anything):

* ``no_cache``   - plain ``generate()`` over the whole prompt;
* ``ideal``      - an exact precomputed ``DynamicCache`` of the prefix, ``copy.deepcopy``-ed per call
                   (transformers' documented recipe; the best any prefix reuse can do);
* ``warm``       - ``PrefixCache`` whose store holds the prefix (each repetition has a new suffix);
* ``cold``       - a new ``PrefixCache`` made inside the timed call (0% hits: the cost of constructing,
                   looking up and storing).

TTFT is one ``generate(max_new_tokens=1)`` call, storing included. Run:
``python -m hf_prefix_cache_eval.bench_ttft --prefix-tokens 2000 --new-tokens 32``.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics

import torch
from tqdm import tqdm
from transformers import DynamicCache

from hf_prefix_cache import CACHE_KWARG, PrefixCache

from .bench_common import add_prompt_options, finish, print_modes, print_ratios, real_text_ids, timed
from .models import load_model

MODES = ("no_cache", "ideal", "warm", "cold")
TARGETS = {
    "no_cache / warm": (">=", 10.0),
    "warm / ideal": ("<=", 1.10),
    "cold / no_cache": ("<=", 1.03),
}


def run_benchmark(prefix_tokens: int = 2000, new_tokens: int = 32, repeats: int = 5, seed: int = 0) -> dict:
    model, tokenizer = load_model("smollm2")
    prefix = real_text_ids(tokenizer, prefix_tokens)
    suffixes = [
        real_text_ids(tokenizer, new_tokens, skip=prefix_tokens + i * new_tokens) for i in range(repeats + 1)
    ]
    prompts = [torch.tensor([prefix + suffix]) for suffix in suffixes]

    def generate(ids, **kwargs):
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, **kwargs
        )

    ideal_prefix = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.tensor([prefix]), use_cache=True, **{CACHE_KWARG: ideal_prefix})
    warm_cache = PrefixCache(model, max_memory="1GiB")
    generate(torch.tensor([[*prefix, tokenizer.eos_token_id]]), **{CACHE_KWARG: warm_cache})  # stores it

    def cold(ids):  # a new cache per call: its construction is timed too
        return generate(ids, **{CACHE_KWARG: PrefixCache(model, max_memory="1GiB")})

    calls = {
        "no_cache": lambda ids: generate(ids),
        "ideal": lambda ids: generate(ids, **{CACHE_KWARG: copy.deepcopy(ideal_prefix)}),
        "warm": lambda ids: generate(ids, **{CACHE_KWARG: warm_cache}),
        "cold": cold,
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
    ratios = {
        "no_cache / warm": median["no_cache"] / median["warm"],
        "warm / ideal": median["warm"] / median["ideal"],
        "cold / no_cache": median["cold"] / median["no_cache"],
    }
    return {
        "prompt_tokens": prefix_tokens + new_tokens,
        "warm_hit_tokens": warm_hits,
        "median_seconds": median,
        "seconds": times,
        "ratios": ratios,
        "mismatches": mismatches,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_prompt_options(parser, 5, "timed repetitions per mode")
    args = parser.parse_args(argv)
    result = run_benchmark(args.prefix_tokens, args.new_tokens, args.repeats)
    print(f"\nSmolLM2-135M-Instruct, {result['prompt_tokens']} prompt tokens, {result['threads']} threads")
    print(f"warm hit tokens per repetition: {result['warm_hit_tokens']}")
    print_modes(result, MODES, 9)
    print_ratios(result["ratios"], TARGETS, 16)
    return finish(result, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
