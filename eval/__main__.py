"""``python -m hf_prefix_cache_eval``: the multi-turn TTFT evaluation from the command line.

With no options it runs the README's default: SmolLM2-135M-Instruct, 10 MT-Bench conversations with the
shared ~1000-token system prompt, all four modes side by side; it prints the table and where the plots are.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import DEFAULT_SYSTEM_PROMPT, MODE_NAMES, EvalConfig
from .modes import MODES

_DEFAULTS = EvalConfig()


def _count_or_all(text: str) -> int | None:
    if text.lower() in {"all", "none", "0"}:
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'all', got {text!r}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _modes(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [n for n in names if n not in MODES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {unknown}; choose from {', '.join(MODE_NAMES)}")
    return names


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except empty ones (None, False) whose help text already says what happens."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    modes_help = "; ".join(f"{name} = {cls.label}" for name, cls in MODES.items())
    parser = argparse.ArgumentParser(
        prog="python -m hf_prefix_cache_eval",
        description=(
            "Replay multi-turn conversations through generate() and measure time to first token with no "
            "reuse, transformers' deepcopy recipe, transformers' continuous batching with block sharing, "
            "and hf_prefix_cache, side by side on the same prompts."
        ),
        formatter_class=_HelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default=_DEFAULTS.model,
        help="'smollm2' (packaged GGUF, converted once), 'qwen3_5-random' (a hybrid: Gated DeltaNet + attention, random weights), a local folder or a hub id",
    )
    model.add_argument(
        "--model-cache-dir",
        default=None,
        help="where the converted SmolLM2 (or hub downloads) live; default $HF_PREFIX_CACHE_HOME or ~/.cache/hf_prefix_cache",
    )
    model.add_argument("--device", default=_DEFAULTS.device, help="torch device, e.g. cpu, cuda, cuda:1")
    model.add_argument("--dtype", default=_DEFAULTS.dtype, help="float32, bfloat16, float16 or auto")
    model.add_argument(
        "--threads", type=_positive, default=None, help="torch CPU threads (default: torch's choice)"
    )

    model.add_argument(
        "--main-thread",
        action="store_true",
        help="run generate() on the main thread instead of one worker thread (continuous batching always "
        "computes on its own thread; CPU threading differs between the two, so the default keeps them alike)",
    )

    data = parser.add_argument_group("conversations")
    data.add_argument(
        "--dataset",
        default=_DEFAULTS.dataset,
        help="'mtbench', 'sharegpt', a local .json/.jsonl file (ShareGPT, OpenAI messages or MT-Bench rows) or a hub dataset id",
    )
    data.add_argument(
        "--conversations",
        type=_count_or_all,
        default=_DEFAULTS.conversations,
        help="how many conversations to replay ('all' for every one)",
    )
    data.add_argument(
        "--max-turns", type=_count_or_all, default=None, help="turns kept per conversation (default: all)"
    )
    data.add_argument(
        "--max-context-tokens",
        type=_count_or_all,
        default=_DEFAULTS.max_context_tokens,
        help="stop a conversation's replay at the first turn whose prompt would be longer ('all' for no limit; the model's positions always cap it)",
    )
    system = data.add_mutually_exclusive_group()
    system.add_argument(
        "--system-prompt-file",
        type=Path,
        default=None,
        help="shared system prompt prepended to every conversation, read from this file (default: the built-in ~1000-token product-support prompt)",
    )
    system.add_argument(
        "--no-system-prompt",
        action="store_true",
        help="no shared system prompt (the deepcopy recipe then has nothing to reuse and is skipped)",
    )
    data.add_argument(
        "--history",
        choices=("model", "dataset"),
        default=_DEFAULTS.history,
        help="assistant messages kept in the history: the model's own replies (exercises reuse of generated tokens) or the dataset's replies (falls back to the model's where the dataset has none)",
    )

    run = parser.add_argument_group("run")
    run.add_argument(
        "--modes",
        type=_modes,
        default=",".join(_DEFAULTS.modes),
        help=f"comma-separated modes to measure; baseline is always included ({modes_help})",
    )
    run.add_argument(
        "--max-new-tokens",
        type=_positive,
        default=_DEFAULTS.max_new_tokens,
        help="greedy tokens generated per turn (they feed the history)",
    )
    run.add_argument(
        "--warmup-calls",
        type=int,
        default=_DEFAULTS.warmup_calls,
        help="throwaway calls per mode before measuring, on a prompt that shares nothing with the measured ones",
    )
    run.add_argument(
        "--seed", type=int, default=_DEFAULTS.seed, help="seed of the per-turn mode order shuffle"
    )

    cache = parser.add_argument_group("prefix stores")
    cache.add_argument(
        "--block-size",
        type=_positive,
        default=_DEFAULTS.block_size,
        help="tokens per block for PrefixCache, and page size for continuous batching",
    )
    cache.add_argument(
        "--cache-memory",
        default=_DEFAULTS.cache_memory,
        help="PrefixCache store size (e.g. 512MiB); continuous batching gets as many blocks, plus room for the request being computed (its paged cache also holds live requests)",
    )
    cache.add_argument(
        "--cache-blocks",
        type=_positive,
        default=None,
        help="store size in blocks instead of --cache-memory; make it small (e.g. 100 with the default run) to force eviction",
    )
    cache.add_argument(
        "--pool-fraction",
        type=float,
        default=None,
        help="store size as a fraction of the replay's working set (e.g. 0.25: a quarter of the distinct "
        "blocks the conversations need, with the dataset's replies as history), instead of --cache-blocks",
    )
    cache.add_argument(
        "--policy",
        choices=("retain", "lru"),
        default=None,
        help="PrefixCache eviction policy (default: the library's, retain)",
    )
    cache.add_argument(
        "--host-memory",
        default=None,
        help="PrefixCache host-RAM tier size (e.g. 4GiB): device-pool evictions spill there (default: none)",
    )
    cache.add_argument(
        "--disk",
        default=None,
        help="PrefixCache disk tier folder: blocks are written there and survive restarts (default: none)",
    )
    cache.add_argument(
        "--disk-size", default=None, help="most the disk tier folder may hold (default 16GiB with --disk)"
    )

    cache.add_argument(
        "--remote",
        default=None,
        help="PrefixCache Redis/Valkey tier URL (redis://HOST:PORT/DB, or redis+cluster://H:P,H:P,... for a "
        "cluster): alone, the single-process "
        "prefix_cache mode gets it; with --workers, the workers share it (keys under this run's own prefix)",
    )
    cache.add_argument(
        "--remote-min-tokens",
        type=int,
        default=None,
        help="shortest remote hit worth fetching (default: the library's)",
    )
    others = parser.add_argument_group("other processes (after the single-process run)")
    others.add_argument(
        "--restart",
        action="store_true",
        help="with --disk: replay the first turn of every conversation in a fresh process whose "
        "PrefixCache reads the disk tier this run filled (mode 'restart')",
    )
    others.add_argument(
        "--workers",
        type=_positive,
        default=None,
        help="with --remote: replay the conversations split round-robin over N worker processes that "
        "share the Redis server (modes 'worker0', 'worker1', ...)",
    )
    others.add_argument(
        "--worker-start",
        choices=("together", "staggered"),
        default=_DEFAULTS.worker_start,
        help="release the loaded, warmed-up workers all at once, or each one after the previous one's "
        "first turn is on the server",
    )

    out = parser.add_argument_group("output")
    out.add_argument(
        "--output-dir", default=str(_DEFAULTS.output_dir), help="parent folder of the run folder"
    )
    out.add_argument("--run-name", default=None, help="run folder name (default: <dataset>-<timestamp>)")
    out.add_argument(
        "--bin-tokens",
        type=_positive,
        default=None,
        help="width of the context-length bins in the speedup table and plot (default: the smallest power of two giving at most 8 bins)",
    )
    out.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    return parser


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    if args.no_system_prompt:
        system_prompt = None
    elif args.system_prompt_file is not None:
        system_prompt = args.system_prompt_file.read_text(encoding="utf-8").strip() or None
    else:
        system_prompt = DEFAULT_SYSTEM_PROMPT
    return EvalConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        model_cache_dir=args.model_cache_dir,
        dataset=args.dataset,
        conversations=args.conversations,
        max_turns=args.max_turns,
        max_context_tokens=args.max_context_tokens,
        system_prompt=system_prompt,
        history=args.history,
        max_new_tokens=args.max_new_tokens,
        modes=args.modes,
        block_size=args.block_size,
        cache_memory=args.cache_memory,
        cache_blocks=args.cache_blocks,
        pool_fraction=args.pool_fraction,
        policy=args.policy,
        host_memory=args.host_memory,
        disk=args.disk,
        disk_size=args.disk_size,
        remote=args.remote,
        remote_min_tokens=args.remote_min_tokens,
        restart=args.restart,
        workers=args.workers,
        worker_start=args.worker_start,
        warmup_calls=args.warmup_calls,
        seed=args.seed,
        context_bin_tokens=args.bin_tokens,
        threads=args.threads,
        worker_thread=not args.main_thread,
        output_dir=args.output_dir,
        run_name=args.run_name,
        plots=not args.no_plots,
        progress=not args.no_progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    from .runner import run_evaluation  # heavy imports only once the arguments are valid

    results = run_evaluation(config)
    print()
    print(results.table())
    print()
    print(f"wall time {results.wall_s:.0f} s")
    if results.output_dir is not None:
        print(f"results: {results.files['json']} and {results.files['csv']}")
        if "summary" in results.plot_paths:
            print(f"plot:    {results.plot_paths['summary']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
