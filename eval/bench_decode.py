"""What a PrefixCache costs and saves besides the prefill, measured side by side in one run.

Sections (SmolLM2-135M-Instruct fp32 on CPU unless said otherwise; the machine is shared, so every
section records the load average, and only ratios measured in the same run mean anything):

* ``construction`` - ``PrefixCache(model, max_memory=...)`` time and resident memory (RSS) after
  construction at 256MiB / 1GiB / 8GiB and after storing 100 blocks; the first cache on the model (layout
  read from the config), the first with a host tier (which runs the probe forward) and the probe alone;
* ``ttft``         - ``bench_ttft``: TTFT at ~2k tokens for no cache, the deepcopy ideal, warm and cold
  (cold = a new ``PrefixCache`` constructed inside the timed call);
* ``decode``       - ms per generated token at 1000/2000/4000/8000 tokens of context: plain ``generate()``
  (``DynamicCache``), ``cache_implementation="static"`` and a warm ``PrefixCache``; the step time is the
  median gap between consecutive tokens inside one call, so the prefill is excluded;
* ``lockstep``     - the same three caches, each prefilled once, then decoded one step at a time in
  turn (model forward passes, greedy), so all three see the same moments of the shared machine; the
  step ratios are per-step (ours / the other at the same step), medians over the steps;
* ``masks``        - the decode-mask threshold (``hf_prefix_cache.decode_masks``): decode steps of one warm
  call alternate with and without the mask at 1000..8000 tokens, so both halves see the same machine;
* ``overhead``     - ``lookup_s`` / ``store_s`` at 2k/8k (SmolLM2) and 32k (a tiny Llama) prompt tokens,
  ``WeightsWatch.changed()`` on the parameter and buffer tensors of SmolLM2 and of a 40-layer tiny Llama,
  ``hash_blocks`` tokens/s, and the cost of one cache ``update()`` per layer per decode step (the
  cache's own work, without the model) for ``DynamicCache``, ``StaticCache`` and ``PrefixCache``.

Run ``python -m hf_prefix_cache_eval.bench_decode [--quick] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import statistics
import time

import torch
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    LlamaConfig,
    StaticCache,
    StoppingCriteria,
    StoppingCriteriaList,
)

from hf_prefix_cache import CACHE_KWARG, PrefixCache, decode_masks
from hf_prefix_cache.fingerprint import WeightsWatch
from hf_prefix_cache.hashing import hash_blocks, root_hash
from hf_prefix_cache.layout import run_probe

from . import bench_ttft
from .bench_common import real_text_corpus
from .models import load_model
from .timing import load_average


def resident_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def text_ids(tokenizer, count: int, skip: int = 0) -> list[int]:
    """``count`` ids of real text; the corpus is repeated when it is shorter."""
    corpus = real_text_corpus(tokenizer)
    repeated = corpus * (1 + (skip + count) // len(corpus))
    return repeated[skip : skip + count]


# -- construction ----------------------------------------------------------------------------------
def bench_construction(model, tokenizer, budgets: list[str], repeats: int) -> dict:
    out: dict = {"load_before": load_average(), "budgets": {}}
    start = time.perf_counter()
    PrefixCache(model, max_memory="256MiB", install=False)  # the first on this model: layout from the config
    out["first_construct_ms"] = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    PrefixCache(model, max_memory="256MiB", host_memory="256MiB", install=False)  # tiers: the probe runs
    out["first_tiered_construct_ms"] = (time.perf_counter() - start) * 1000
    probes = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_probe(model)
        probes.append(time.perf_counter() - start)
    out["probe_forward_ms"] = statistics.median(probes) * 1000
    for budget in budgets:
        times, rss_growth = [], []
        for _ in range(repeats):
            gc.collect()
            before = resident_mib()
            start = time.perf_counter()
            cache = PrefixCache(model, max_memory=budget, install=False)
            times.append(time.perf_counter() - start)
            rss_growth.append(resident_mib() - before)
            del cache
        out["budgets"][budget] = {
            "construct_ms": statistics.median(times) * 1000,
            "construct_ms_all": [t * 1000 for t in times],
            "rss_growth_mib": statistics.median(rss_growth),
        }
    gc.collect()
    before = resident_mib()
    cache = PrefixCache(model, max_memory="8GiB")
    constructed = resident_mib()
    prompt = torch.tensor([text_ids(tokenizer, 100 * cache.block_size + 1)])
    model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=1,
        do_sample=False,
        **{CACHE_KWARG: cache},
    )
    for layer in cache.layers:
        if hasattr(layer, "release_buffers"):
            layer.release_buffers()
    gc.collect()
    stats = cache.stats
    out["fill_8GiB"] = {
        "stored_blocks": stats.stored_blocks,
        "rss_after_construction_mib": constructed - before,
        "rss_after_100_blocks_mib": resident_mib() - before,
        "committed_mib": stats.committed_bytes / 2**20,
        "capacity_mib": stats.capacity_bytes / 2**20,
        "block_kib": stats.capacity_bytes / stats.num_blocks / 1024,
    }
    out["load_after"] = load_average()
    return out


# -- decode ----------------------------------------------------------------------------------------
def store_all_but_last(model, tokenizer, cache: PrefixCache, ids: list[int]) -> None:
    """Store ``ids`` with its last token swapped for EOS: a later call on ``ids`` then hits on every full
    block but the one holding the last token, which is always computed."""
    warm_prompt = torch.tensor([[*ids[:-1], tokenizer.eos_token_id]])
    model.generate(
        warm_prompt,
        attention_mask=torch.ones_like(warm_prompt),
        max_new_tokens=1,
        do_sample=False,
        **{CACHE_KWARG: cache},
    )


class StepClock(StoppingCriteria):
    """Timestamps every generated token (the stopping criteria run once per step)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    def step_ms(self) -> float:
        gaps = [b - a for a, b in zip(self.times, self.times[1:])]
        return statistics.median(gaps) * 1000


def bench_decode(
    model, tokenizer, contexts: list[int], new_tokens: int, seed: int = 0, repeats: int = 1
) -> dict:
    """Per context, ``repeats`` rounds of the three modes in a new random order each; medians per mode."""
    cache = PrefixCache(model, max_memory="2GiB")
    modes = ("no_cache", "static", "prefix_cache")
    order = random.Random(seed)
    results: dict = {}
    for context in contexts:
        ids = text_ids(tokenizer, context)
        torch.manual_seed(0)
        store_all_but_last(model, tokenizer, cache, ids)
        prompt = torch.tensor([ids])
        kwargs = dict(
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
        )
        extra = {
            "no_cache": {},
            "static": {"cache_implementation": "static"},
            "prefix_cache": {CACHE_KWARG: cache},
        }
        row: dict = {"load": load_average()}
        outputs, steps = {}, {mode: [] for mode in modes}
        for _ in range(repeats):
            shuffled = list(modes)
            order.shuffle(shuffled)
            for mode in shuffled:
                clock = StepClock()
                outputs[mode] = model.generate(
                    prompt, stopping_criteria=StoppingCriteriaList([clock]), **kwargs, **extra[mode]
                )
                steps[mode].append(clock.step_ms())
        for mode in modes:
            row[mode], row[f"{mode}_all"] = statistics.median(steps[mode]), steps[mode]
        row["hit_tokens"] = cache.last_call.hit_tokens
        row["same_tokens"] = all(torch.equal(outputs[m], outputs["no_cache"]) for m in modes)
        row["prefix_cache / no_cache"] = row["prefix_cache"] / row["no_cache"]
        row["prefix_cache / static"] = row["prefix_cache"] / row["static"]
        results[context] = row
        print(
            f"  decode at {context:5d}: no cache {row['no_cache']:.2f}  static {row['static']:.2f}  "
            f"ours {row['prefix_cache']:.2f} ms/token; ours/no cache {row['prefix_cache / no_cache']:.3f}, "
            f"ours/static {row['prefix_cache / static']:.3f}  (load {row['load']:.2f})",
            flush=True,
        )
    return results


# -- per-call overhead -----------------------------------------------------------------------------
LOCKSTEP_MODES = ("no_cache", "static", "prefix_cache")


@torch.no_grad()
def bench_decode_lockstep(model, tokenizer, contexts: list[int], steps: int, seed: int = 0) -> dict:
    """Per context: prefill a DynamicCache, a StaticCache and a warm PrefixCache on the same prompt, then
    run ``steps`` greedy decode steps of each, the three modes in a new random order at every step."""
    cache = PrefixCache(model, max_memory="2GiB")
    order = random.Random(seed)
    results: dict = {}
    for context in contexts:
        ids = text_ids(tokenizer, context)
        store_all_but_last(model, tokenizer, cache, ids)
        prompt = torch.tensor([ids])
        caches = {
            "no_cache": DynamicCache(config=model.config),
            "static": StaticCache(config=model.config, max_cache_len=context + steps + 1),
            "prefix_cache": cache.prepare(prompt, max_new_tokens=steps + 1),
        }
        try:
            tokens, times = {}, {mode: [] for mode in LOCKSTEP_MODES}
            for mode, kv in caches.items():
                fed = prompt[:, kv.get_seq_length() :]  # the PrefixCache holds the stored prefix already
                logits = model(input_ids=fed, use_cache=True, **{CACHE_KWARG: kv}).logits
                tokens[mode] = [logits[:, -1].argmax(-1, keepdim=True)]
            for _ in range(steps):
                shuffled = list(LOCKSTEP_MODES)
                order.shuffle(shuffled)
                for mode in shuffled:
                    started = time.perf_counter()
                    logits = model(
                        input_ids=tokens[mode][-1], use_cache=True, **{CACHE_KWARG: caches[mode]}
                    ).logits
                    tokens[mode].append(logits[:, -1].argmax(-1, keepdim=True))
                    times[mode].append(time.perf_counter() - started)
        finally:
            cache.release()
        row: dict = {"load": load_average(), "hit_tokens": cache.last_call.hit_tokens}
        for mode in LOCKSTEP_MODES:
            row[mode] = statistics.median(times[mode]) * 1000
        for other in ("no_cache", "static"):
            per_step = [a / b for a, b in zip(times["prefix_cache"], times[other])]
            row[f"prefix_cache / {other}"] = statistics.median(per_step)
        row["same_tokens"] = all(
            torch.equal(torch.cat(tokens[mode]), torch.cat(tokens["no_cache"])) for mode in LOCKSTEP_MODES
        )
        results[context] = row
        print(
            f"  lockstep at {context:5d}: no cache {row['no_cache']:.2f}  static {row['static']:.2f}  "
            f"ours {row['prefix_cache']:.2f} ms/step; ours/no cache {row['prefix_cache / no_cache']:.3f}, "
            f"ours/static {row['prefix_cache / static']:.3f}  (load {row['load']:.2f})",
            flush=True,
        )
    return results


class AlternateMasks(StepClock):
    """Flips decode masks on/off after every token (via the threshold), recording which way each step ran."""

    NEVER = 2**62

    def __init__(self):
        super().__init__()
        self.masked: list[bool] = []

    def __call__(self, input_ids, scores, **kwargs):
        masked_next = decode_masks.MIN_CONTEXT_TOKENS != 0  # the step that just ran was unmasked
        decode_masks.MIN_CONTEXT_TOKENS = 0 if masked_next else self.NEVER
        self.masked.append(masked_next)
        return super().__call__(input_ids, scores, **kwargs)


def bench_decode_masks(model, tokenizer, contexts: list[int], new_tokens: int) -> dict:
    """Per context, one warm call whose steps alternate with / without the decode mask: the ratio of each
    masked step to the mean of its two neighbours (paired, so machine drift cancels) and both medians."""
    cache = PrefixCache(model, max_memory="2GiB")
    threshold = decode_masks.MIN_CONTEXT_TOKENS
    results: dict = {}
    try:
        for context in contexts:
            ids = text_ids(tokenizer, context)
            store_all_but_last(model, tokenizer, cache, ids)
            prompt = torch.tensor([ids])
            decode_masks.MIN_CONTEXT_TOKENS = AlternateMasks.NEVER
            clock = AlternateMasks()
            model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                stopping_criteria=StoppingCriteriaList([clock]),
                **{CACHE_KWARG: cache},
            )
            steps = [(clock.masked[i], b - a) for i, (a, b) in enumerate(zip(clock.times, clock.times[1:]))]
            paired = [
                steps[i][1] * 2 / (steps[i - 1][1] + steps[i + 1][1])
                for i in range(1, len(steps) - 1)
                if steps[i][0]
            ]
            row = {
                "load": load_average(),
                "masked_ms": statistics.median(t * 1000 for m, t in steps if m),
                "unmasked_ms": statistics.median(t * 1000 for m, t in steps if not m),
                "masked / unmasked (paired median)": statistics.median(paired),
                "pairs": len(paired),
            }
            results[context] = row
            print(
                f"  decode masks at {context:5d}: with {row['masked_ms']:.1f}, without {row['unmasked_ms']:.1f} "
                f"ms/token; with / without {row['masked / unmasked (paired median)']:.3f} over "
                f"{row['pairs']} pairs (load {row['load']:.2f})",
                flush=True,
            )
    finally:
        decode_masks.MIN_CONTEXT_TOKENS = threshold
    results["threshold_tokens"] = threshold
    return results


def tiny_llama(layers: int = 2, positions: int = 40000):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def call_overhead(model, tokens: int, repeats: int) -> dict:
    """lookup_s (cold and warm) and store_s for one ``tokens``-long prompt; K/V fed through ``update``."""
    cache = PrefixCache(
        model, max_memory=f"{int(tokens * 1.2) * _bytes_per_token(model) + 2**20}", install=False
    )
    ids = torch.randint(3, 500, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    layouts = cache.store.layouts
    kv = [torch.randn(1, x.num_heads, tokens, x.head_dim, dtype=x.dtype) for x in layouts]
    cold, warm, store = [], [], []
    for repeat in range(repeats + 1):
        cache.clear()
        for phase in ("cold", "warm"):
            cache.prepare(ids, max_new_tokens=1)
            lookup = cache.last_call.lookup_s
            loaded = cache.get_seq_length()
            for index in range(len(cache.layers)):  # through the cache, which vouches for the K/V
                cache.update(kv[index][:, :, loaded:], kv[index][:, :, loaded:], index)
            stats = cache.commit()
            if phase == "cold" and stats.stored_blocks * cache.block_size < tokens - cache.block_size:
                raise RuntimeError(f"the cold call stored {stats.stored_blocks} blocks: {stats.refused}")
            if repeat:  # the first round warms the allocator up
                (cold if phase == "cold" else warm).append(lookup)
                if phase == "cold":
                    store.append(stats.store_s)
    return {
        "tokens": tokens,
        "lookup_cold_ms": statistics.median(cold) * 1000,
        "lookup_warm_ms": statistics.median(warm) * 1000,
        "store_ms": statistics.median(store) * 1000,
        "load": load_average(),
    }


def _bytes_per_token(model) -> int:
    probe = PrefixCache(model, num_blocks=1, install=False)
    return probe.stats.capacity_bytes // probe.block_size


def weights_watch_ms(model, repeats: int = 200) -> dict:
    watch = WeightsWatch(model)
    watch.changed()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        watch.changed()
        times.append(time.perf_counter() - start)
    return {"parameters": len(watch.parameters), "ms": statistics.median(times) * 1000}


def update_overhead(model, context: int, steps: int = 64, rounds: int = 5) -> dict:
    """Microseconds per layer per decode step spent in ``cache.update`` (the cache's own work: bookkeeping
    and appending one slot), for each cache on the model's K/V shapes, interleaved round by round."""
    cache = PrefixCache(model, num_blocks=1, install=False)
    layouts = cache.store.layouts
    prefill = [torch.randn(1, x.num_heads, context, x.head_dim, dtype=x.dtype) for x in layouts]
    step = [torch.randn(1, x.num_heads, 1, x.head_dim, dtype=x.dtype) for x in layouts]
    prompt = torch.ones(1, context, dtype=torch.long)

    def make(kind):
        if kind == "dynamic":
            return DynamicCache(config=model.config)
        if kind == "static":
            return StaticCache(config=model.config, max_cache_len=context + steps)
        return cache.prepare(prompt, max_new_tokens=steps)

    times: dict[str, list[float]] = {"dynamic": [], "static": [], "prefix_cache": []}
    for _ in range(rounds):
        for kind in times:
            target = make(kind)
            for index, kv in enumerate(prefill):
                target.update(kv, kv, index)
            start = time.perf_counter()
            for _ in range(steps):
                for index, kv in enumerate(step):
                    target.update(kv, kv, index)
            times[kind].append((time.perf_counter() - start) / steps / len(layouts))
            if kind == "prefix_cache":
                cache.release()
    out = {kind: statistics.median(values) * 1e6 for kind, values in times.items()}
    return {"context": context, "layers": len(layouts), "us_per_layer_step": out, "load": load_average()}


def hashing_rate(tokens: int = 32768, block_size: int = 16, repeats: int = 20) -> dict:
    ids = list(range(tokens))
    root = root_hash("bench")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        hash_blocks(root, ids, block_size)
        times.append(time.perf_counter() - start)
    best = statistics.median(times)
    return {"tokens": tokens, "block_size": block_size, "ms": best * 1000, "tokens_per_s": tokens / best}


def bench_overhead(smollm2, quick: bool) -> dict:
    out: dict = {"calls": []}
    lengths = [(smollm2, "smollm2", 2048), (smollm2, "smollm2", 8192)]
    tiny = tiny_llama()
    lengths += [(tiny, "tiny-llama", 2048), (tiny, "tiny-llama", 8192), (tiny, "tiny-llama", 32768)]
    for model, name, tokens in lengths:
        if quick and tokens > 8192:
            continue
        row = {"model": name, **call_overhead(model, tokens, repeats=2 if quick else 3)}
        out["calls"].append(row)
        print(
            f"  {name:10s} {tokens:6d} tokens: lookup cold {row['lookup_cold_ms']:.1f} ms, warm "
            f"{row['lookup_warm_ms']:.1f} ms, store {row['store_ms']:.1f} ms (load {row['load']:.2f})",
            flush=True,
        )
    out["weights_watch"] = [
        {"model": "smollm2", **weights_watch_ms(smollm2)},
        {"model": "tiny-llama-40-layers", **weights_watch_ms(tiny_llama(layers=40, positions=128))},
    ]
    out["hash_blocks"] = hashing_rate()
    out["update_per_step"] = [update_overhead(smollm2, context) for context in (1000, 8000)]
    out["load"] = load_average()
    return out


DECODE_CONTEXTS = [1000, 2000, 4000, 8000]


def contexts_of(args, full: list[int]) -> list[int]:
    """The context lengths a decode section runs: ``--contexts``, else 1k and 2k with ``--quick``, else ``full``."""
    if args.contexts:
        return [int(c) for c in args.contexts.split(",")]
    return [1000, 2000] if args.quick else full


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats, contexts 1k and 2k only")
    parser.add_argument(
        "--new-tokens", type=int, default=32, help="decode steps per measurement (default 32)"
    )
    parser.add_argument(
        "--decode-repeats",
        type=int,
        default=1,
        help="rounds of the three decode modes per context (default 1)",
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument(
        "--sections",
        default="construction,ttft,decode,lockstep,masks,overhead",
        help="comma-separated subset of construction,ttft,decode,lockstep,masks,overhead (default: all)",
    )
    parser.add_argument("--contexts", help="decode context lengths, e.g. 1000,4000 (default 1000..8000)")
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))
    model, tokenizer = load_model("smollm2")
    result: dict = {"threads": torch.get_num_threads(), "load_start": load_average()}
    print(f"SmolLM2-135M-Instruct fp32, {result['threads']} threads, load {result['load_start']:.2f}")

    if "construction" in sections:
        print("construction", flush=True)
        result["construction"] = bench_construction(
            model, tokenizer, ["256MiB", "1GiB", "8GiB"], 3 if args.quick else 5
        )
        built = result["construction"]
        print(
            f"  first PrefixCache on the model (layout from the config, no forward): "
            f"{built['first_construct_ms']:.1f} ms; the first with a host tier (probe forward): "
            f"{built['first_tiered_construct_ms']:.1f} ms; the probe forward alone {built['probe_forward_ms']:.1f} ms"
        )
        for budget, row in result["construction"]["budgets"].items():
            print(
                f"  PrefixCache(max_memory={budget!r}): {row['construct_ms']:.1f} ms, RSS +{row['rss_growth_mib']:.1f} MiB"
            )
        fill = result["construction"]["fill_8GiB"]
        print(
            f"  8GiB store: RSS +{fill['rss_after_construction_mib']:.1f} MiB after construction, "
            f"+{fill['rss_after_100_blocks_mib']:.1f} MiB after {fill['stored_blocks']} blocks "
            f"({fill['committed_mib']:.1f} MiB committed of {fill['capacity_mib']:.0f} MiB)"
        )

    if "ttft" in sections:
        print("TTFT at ~2k tokens", flush=True)
        ttft = bench_ttft.run_benchmark(2000, 32, 3 if args.quick else 5)
        ttft["load"] = load_average()
        result["ttft"] = ttft
        for mode in bench_ttft.MODES:
            print(f"  {mode:9s} median TTFT {ttft['median_seconds'][mode] * 1000:8.1f} ms")
        for name, value in ttft["ratios"].items():
            print(f"  {name:16s} {value:7.3f}")

    if "decode" in sections:
        print("decode", flush=True)
        result["decode"] = bench_decode(
            model, tokenizer, contexts_of(args, DECODE_CONTEXTS), args.new_tokens, repeats=args.decode_repeats
        )

    if "lockstep" in sections:
        print("decode in lockstep (one step of each cache in turn)", flush=True)
        contexts = contexts_of(args, DECODE_CONTEXTS)
        result["lockstep"] = bench_decode_lockstep(model, tokenizer, contexts, max(args.new_tokens, 24))

    if "masks" in sections:
        print(f"decode masks (used from {decode_masks.MIN_CONTEXT_TOKENS} cached tokens on)", flush=True)
        contexts = contexts_of(args, [1000, 2000, 3000, 4000, 6000, 8000])
        result["masks"] = bench_decode_masks(model, tokenizer, contexts, 1 + 2 * max(args.new_tokens, 20))

    if "overhead" in sections:
        print("per-call overhead", flush=True)
        result["overhead"] = bench_overhead(model, args.quick)
        for row in result["overhead"]["weights_watch"]:
            print(f"  WeightsWatch.changed() on {row['parameters']} tensors: {row['ms']:.3f} ms")
        for row in result["overhead"]["update_per_step"]:
            us = row["us_per_layer_step"]
            print(
                f"  update() per layer per decode step at {row['context']}: DynamicCache {us['dynamic']:.1f} us, "
                f"StaticCache {us['static']:.1f} us, PrefixCache {us['prefix_cache']:.1f} us (load {row['load']:.2f})"
            )
        rate = result["overhead"]["hash_blocks"]
        print(
            f"  hash_blocks: {rate['tokens_per_s'] / 1e6:.1f} M tokens/s ({rate['ms']:.2f} ms for {rate['tokens']} tokens)"
        )

    result["load_end"] = load_average()
    mismatches = [c for c, row in result.get("decode", {}).items() if not row["same_tokens"]]
    mismatches += [f"lockstep {c}" for c, row in result.get("lockstep", {}).items() if not row["same_tokens"]]
    mismatches += result.get("ttft", {}).get("mismatches", [])
    print(
        f"outputs different from no cache: {mismatches or 'none'}; load at the end {result['load_end']:.2f}"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2, default=str)
    return 1 if mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())
