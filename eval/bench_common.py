"""What the benchmarks share: real-text prompts, a timer, the common options, how a mode's timings and a
ratio against its target are printed, and how a run ends."""

from __future__ import annotations

import argparse
import json
import time

import torch

from .data import default_system_prompt, load_conversations


def real_text_corpus(tokenizer) -> list[int]:
    """Token ids of the system prompt, then every MT-Bench question."""
    text = (
        default_system_prompt()
        + "\n\n"
        + "\n\n".join(
            turn.user for conversation in load_conversations("mtbench") for turn in conversation.turns
        )
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def real_text_ids(tokenizer, count: int, skip: int = 0) -> list[int]:
    """``count`` token ids of real text (the system prompt, then MT-Bench questions), from offset ``skip``."""
    ids = real_text_corpus(tokenizer)
    if len(ids) < skip + count:
        raise ValueError(f"only {len(ids)} tokens of text available, asked for {skip + count}")
    return ids[skip : skip + count]


def prompts_for(tokenizer, prefix_tokens: int, new_tokens: int, count: int) -> list[torch.Tensor]:
    """``count`` one-row prompts: the same ``prefix_tokens`` of real text, each followed by its own
    ``new_tokens`` (so every prompt shares exactly the prefix)."""
    prefix = real_text_ids(tokenizer, prefix_tokens)
    return [
        torch.tensor([prefix + real_text_ids(tokenizer, new_tokens, skip=prefix_tokens + i * new_tokens)])
        for i in range(count)
    ]


def timed(call) -> float:
    """Seconds one ``call()`` took."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def fill_pool(cache, call, ids: torch.Tensor) -> None:
    """Empty ``cache``'s device pool and ``call(ids)`` (promoting ``ids`` from the lower tiers) until every
    pool page was written once: a long-running process's full pool, the only case a lower tier serves
    (fresh pages would add their first touch to the timed calls)."""
    for _ in range(cache.store.pool.num_blocks * cache.block_size // ids.shape[1] + 1):
        cache.store.tiers.spill_device()
        call(ids)


def add_prompt_options(parser: argparse.ArgumentParser, repeats: int, repeats_help: str) -> None:
    """The prompt shape, the repetitions and ``--json``."""
    parser.add_argument("--prefix-tokens", type=int, default=2000, help="cached prefix length (default 2000)")
    parser.add_argument("--new-tokens", type=int, default=32, help="uncached tokens after it (default 32)")
    parser.add_argument("--repeats", type=int, default=repeats, help=f"{repeats_help} (default {repeats})")
    parser.add_argument("--json", help="also write the results to this JSON file")


def print_modes(result: dict, modes, width: int) -> None:
    """Each mode's median TTFT and every repetition's, in milliseconds."""
    for mode in modes:
        runs = ", ".join(f"{t * 1000:.0f}" for t in result["seconds"][mode])
        print(f"  {mode:{width}s} median TTFT {result['median_seconds'][mode] * 1000:8.1f} ms   [{runs}]")


def print_ratios(ratios: dict[str, float], targets: dict, width: int) -> None:
    """Each ratio, with its target and whether it was met where it has one."""
    for name, value in ratios.items():
        print(f"  {name:{width}s} {value:7.3f}{verdict(value, targets.get(name))}")


def verdict(value: float, target: tuple[str, float] | None) -> str:
    """``   target >= 10   ok`` (or ``MISSED``); empty for a ratio without a target."""
    if target is None:
        return ""
    op, bound = target
    met = value >= bound if op == ">=" else value <= bound
    return f"   target {op} {bound}   {'ok' if met else 'MISSED'}"


def finish(result: dict, json_path: str | None) -> int:
    """Say which modes gave other outputs than no cache, write the JSON, and return the exit status
    (1 when any output differed)."""
    print(f"  outputs different from no_cache: {result['mismatches'] or 'none'}")
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(result, handle, indent=2)
    return 1 if result["mismatches"] else 0
