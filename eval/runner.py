"""Run the evaluation: replay conversations turn by turn through every mode, side by side.

For each turn, all modes get the same prompt, in an order shuffled by a seeded RNG so that none is
favoured by running first or last on a noisy machine. The baseline's reply goes into the history, so
every mode sees exactly the same prompts; every other mode's greedy tokens are compared with it. Each
mode is warmed up on a prompt that shares no block with the measured ones, then its reuse state is
reset, so the measured run starts cold and the warm-up's one-off costs stay out of the numbers.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import platform
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm

import hf_prefix_cache

from . import metrics, subruns
from .config import DEFAULT_SYSTEM_PROMPT, EvalConfig
from .data import default_system_prompt, load_conversations
from .metrics import TurnRecord
from .models import load_model
from .modes import BASELINE, MODES, ContinuousBatching, Generation, Mode, ModeContext, greedy_config
from .replay import Replay, build_messages, render_prompt
from .report import write_outputs
from .results import EvalResults
from .retention_sim import blocks_for, hashed, working_set
from .retention_trace import round_robin
from .subruns import PlannedTurn
from .timing import load_average

logger = logging.getLogger(__name__)

WARMUP_SYSTEM = "Warm-up session. Answer in one short sentence."
WARMUP_USER = "Warm-up: name three colours of a rainbow and one fruit that shares a name with a colour."


def run_evaluation(config: EvalConfig | None = None, *, model=None, tokenizer=None) -> EvalResults:
    """Replay the configured conversations through every mode and write the results.

    ``model`` and ``tokenizer`` may be passed to reuse an already loaded pair (a notebook); otherwise
    ``config.model`` is loaded with ``models.load_model``.
    """
    config = config or EvalConfig()
    started = time.perf_counter()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    key_prefix = f"hfpc-eval-{stamp}-{os.getpid()}"  # this run's keys on a Redis server
    load_before = load_average()  # other processes' CPU use, before this run adds its own
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    model_name = config.model
    model_spec = subprocess_model_spec(config, passed_in=model is not None)
    if model is None or tokenizer is None:
        model, tokenizer = load_model(
            config.model, device=config.device, dtype=config.dtype, cache_dir=config.model_cache_dir
        )
    else:
        model_name = getattr(model, "name_or_path", "") or type(model).__name__
    conversations = load_conversations(config.dataset, limit=config.conversations, max_turns=config.max_turns)
    if not conversations:
        raise ValueError(f"no conversations to replay in {config.dataset!r}")
    if config.workers is not None and config.workers > len(conversations):
        raise ValueError(
            f"--workers {config.workers} is more than the {len(conversations)} conversation(s) selected: "
            "lower --workers or raise --conversations"
        )
    shared_system = resolve_system_prompt(config.system_prompt)
    if config.pool_fraction is not None:
        config = sized_by_fraction(config, conversations, tokenizer, shared_system)
    context_limit = effective_context_limit(model, config)
    replay = Replay(
        conversations,
        tokenizer,
        system_prompt=shared_system,
        history=config.history,
        max_context_tokens=context_limit,
    )
    context = ModeContext(
        model=model,
        generation_config=greedy_config(model, config.max_new_tokens),
        max_new_tokens=config.max_new_tokens,
        block_size=config.block_size,
        cache_memory=config.cache_memory,
        cache_blocks=config.cache_blocks,
        policy=config.policy,
        tiers=single_process_tiers(config, key_prefix),
        recipe_prefix=recipe_prefix(tokenizer, shared_system),
        max_request_tokens=replay.longest_prompt_estimate(config.max_new_tokens) + config.max_new_tokens,
    )
    if config.worker_thread:
        context.executor = ThreadPoolExecutor(
            1, "generate", initializer=_init_worker, initargs=(config.threads,)
        )
    modes = [MODES[name](context) for name in config.modes]
    records: list[TurnRecord] = []
    turns: list[dict[str, Any]] = []
    plan: list[PlannedTurn] = []  # the prompts and baseline outputs, for the replays in other processes
    try:
        _prepare_modes(modes, tokenizer, shared_system, config.warmup_calls)
        rng = random.Random(config.seed)
        progress = tqdm(total=replay.total_turns, desc="turns", unit="turn", disable=not config.progress)
        with progress:
            for pending in replay:
                outputs = _run_turn(modes, pending.prompt_ids, rng)
                base = outputs[BASELINE][1]
                reply = tokenizer.decode(base.tokens, skip_special_tokens=True).strip()
                replay.record_reply(pending, reply)
                turns.append(
                    {
                        "step": pending.step,
                        "conversation": pending.conversation_id,
                        "turn": pending.turn,
                        "prompt_tokens": len(pending.prompt_ids),
                        "baseline_reply": reply,
                    }
                )
                records.extend(
                    _record(pending, name, position, generation, error, base)
                    for name, (position, generation, error) in outputs.items()
                )
                plan.append(
                    PlannedTurn(
                        pending.step,
                        pending.conversation_id,
                        pending.conversation_index,
                        pending.turn,
                        list(pending.prompt_ids),
                        base.tokens,
                    )
                )
                progress.update(1)
                progress.set_postfix_str(_postfix(outputs), refresh=False)
        _finish_cb_hits(modes, records)
        mode_info = {mode.name: mode.info() for mode in modes}
    finally:
        for mode in reversed(modes):
            try:
                mode.close()
            except Exception:  # closing must not hide the run's own error
                logger.exception("closing %s failed", mode.name)
        if context.executor is not None:
            context.executor.shutdown()
    warmup_prompt = render_prompt(tokenizer, build_messages(WARMUP_SYSTEM, [], WARMUP_USER))
    if config.restart:  # the prefix_cache mode closed above: its disk writes are flushed
        more, info = subruns.run_restart(config, model_spec, plan, warmup_prompt)
        records += more
        mode_info.update(info)
    if config.workers is not None:
        more, info = subruns.run_workers(config, model_spec, plan, warmup_prompt, f"{key_prefix}-workers")
        records += more
        mode_info.update(info)
    results = EvalResults(
        config=config,
        records=records,
        modes=mode_info,
        turns=turns,
        stops=[vars(stop) for stop in replay.stops],
        plan=plan,
        environment={
            **environment(model, model_name, config, replay, context),
            "load_average_before": load_before,
            "load_average_after": load_average(),
        },
    )
    results.wall_s = time.perf_counter() - started
    run_dir = config.run_dir(stamp)
    if run_dir is not None:
        write_outputs(results, run_dir)
    return results


def sized_by_fraction(config: EvalConfig, conversations, tokenizer, shared_system) -> EvalConfig:
    """``config`` with ``cache_blocks`` set to ``pool_fraction`` of the replay's working set (the blocks of
    a round-robin replay with the dataset's replies, ``retention_trace.py``; model replies are about as long)."""
    trace = hashed(round_robin(conversations, tokenizer, system_prompt=shared_system), config.block_size)
    blocks = blocks_for(trace, config.pool_fraction)
    logger.info(
        "pool fraction %.2f of %d working-set blocks: %d blocks",
        config.pool_fraction,
        working_set(trace),
        blocks,
    )
    extra = {**config.extra, "pool_fraction": config.pool_fraction, "working_set_blocks": working_set(trace)}
    return dataclasses.replace(config, cache_blocks=blocks, pool_fraction=None, extra=extra)


def single_process_tiers(config: EvalConfig, key_prefix: str) -> dict[str, Any]:
    """The lower tiers of the single-process ``prefix_cache`` mode. ``--remote`` alone adds the Redis
    tier, under this run's own key prefix (its warm-up clear deletes only this run's keys); with
    ``--workers`` the server belongs to the workers."""
    tiers = dict(host_memory=config.host_memory, disk=config.disk, disk_size=config.disk_size)
    if config.remote is not None and config.workers is None:
        tiers.update(remote=config.remote, key_prefix=key_prefix, remote_min_tokens=config.remote_min_tokens)
    return {key: value for key, value in tiers.items() if value is not None}


def subprocess_model_spec(config: EvalConfig, *, passed_in: bool) -> dict[str, Any] | None:
    """How a restart or worker process loads the model: by ``config.model``, as this run does."""
    if not (config.restart or config.workers):
        return None
    if passed_in and not Path(config.model).is_dir():
        raise ValueError(
            "restart and workers replay in fresh processes that load config.model: give a model folder "
            "(save_pretrained), 'smollm2' or a hub id there, and do not pass model= to run_evaluation"
        )
    return {
        "name": config.model,
        "device": config.device,
        "dtype": config.dtype,
        "cache_dir": None if config.model_cache_dir is None else os.fspath(config.model_cache_dir),
    }


def _init_worker(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def resolve_system_prompt(value: str | None) -> str | None:
    """``"default"`` means ``data.default_system_prompt()``; None or "" means no shared prompt."""
    if value == DEFAULT_SYSTEM_PROMPT:
        return default_system_prompt()
    return value or None


def effective_context_limit(model, config: EvalConfig) -> int:
    """The configured limit, lowered so that prompt plus reply fit the model's positions."""
    limit = config.max_context_tokens or 1 << 30
    positions = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if positions:
        limit = min(limit, positions - config.max_new_tokens)
    if limit < 1:
        raise ValueError(f"max_new_tokens={config.max_new_tokens} leaves no room for a prompt")
    return limit


def recipe_prefix(tokenizer, system: str | None) -> list[int] | None:
    """Tokens of the system message alone, as the deepcopy recipe would prefill it once."""
    if not system:
        return None
    return render_prompt(tokenizer, [{"role": "system", "content": system}], add_generation_prompt=False)


def _prepare_modes(modes: list[Mode], tokenizer, shared_system: str | None, calls: int) -> None:
    """Set each mode up, run it on a throwaway prompt, then reset its reuse state.

    The baseline goes first, so one-off costs of the process (first forward pass, allocator growth)
    land in its warm-up and not in another mode's setup time. The warm-up prompt has its own system
    message, so it shares no full block with the measured prompts: even a store that cannot be emptied
    (the continuous batching manager's) holds nothing useful afterwards. The deepcopy recipe is warmed
    up on its own prefix, which is all it can use.
    """
    fresh = render_prompt(tokenizer, build_messages(WARMUP_SYSTEM, [], WARMUP_USER))
    shared = (
        render_prompt(tokenizer, build_messages(shared_system, [], WARMUP_USER)) if shared_system else fresh
    )
    for mode in sorted(modes, key=lambda m: m.name != BASELINE):
        try:
            mode.setup()
            if not mode.available:
                continue
            prompt = shared if mode.name == "deepcopy" else fresh
            for _ in range(calls):
                mode.generate(prompt)
            mode.reset_after_warmup()
        except Exception as error:
            if mode.name == BASELINE:
                raise
            mode.disable(f"setup or warm-up failed: {type(error).__name__}: {error}")


def _run_turn(
    modes: list[Mode], prompt_ids: list[int], rng: random.Random
) -> dict[str, tuple[int, Generation | None, str | None]]:
    """Every available mode on one prompt, in a shuffled order: ``{name: (position, output, error)}``."""
    order = [mode for mode in modes if mode.available]
    rng.shuffle(order)
    outputs: dict[str, tuple[int, Generation | None, str | None]] = {}
    for position, mode in enumerate(order):
        try:
            outputs[mode.name] = (position, mode.generate(prompt_ids), None)
        except Exception as error:
            if mode.name == BASELINE:
                raise
            message = f"{type(error).__name__}: {error}"
            outputs[mode.name] = (position, None, message)
            mode.disable(f"failed on a measured turn, not run afterwards ({message})")
    return outputs


def _record(pending, name: str, position: int, out: Generation | None, error: str | None, base: Generation):
    prompt = len(pending.prompt_ids)
    if out is None:
        nan = math.nan
        return TurnRecord(
            pending.step, pending.conversation_id, pending.turn, name, position, prompt, nan, nan, nan, nan, nan, 0,
            False, error,
        )  # fmt: skip
    hits = math.nan if out.hit_tokens is None else float(out.hit_tokens)
    return TurnRecord(
        step=pending.step,
        conversation=pending.conversation_id,
        turn=pending.turn,
        mode=name,
        run_position=position,
        prompt_tokens=prompt,
        hit_tokens=hits,
        computed_tokens=prompt - hits,
        hit_rate=hits / prompt,
        ttft_s=out.ttft_s,
        e2e_s=out.e2e_s,
        new_tokens=len(out.tokens),
        match=out.tokens == base.tokens,
        **metrics.tier_hits(out.hit_tokens_by_tier),
    )


def _finish_cb_hits(modes: list[Mode], records: list[TurnRecord]) -> None:
    """Continuous batching's hits come from its debug log; if it never logged one, they are unknown."""
    cb = next((m for m in modes if isinstance(m, ContinuousBatching)), None)
    if cb is None or cb.hits_seen:
        return
    for record in records:
        if record.mode == cb.name:
            record.hit_tokens = record.computed_tokens = record.hit_rate = math.nan
    cb.notes.append("no prefix hit was logged: hit counts unknown (NaN)")


def _postfix(outputs: dict[str, tuple[int, Generation | None, str | None]]) -> str:
    parts = [f"{name} {out.ttft_s:.2f}s" for name, (_, out, _) in sorted(outputs.items()) if out is not None]
    return "TTFT " + ", ".join(parts)


def environment(
    model, model_name: str, config: EvalConfig, replay: Replay, context: ModeContext
) -> dict[str, Any]:
    """Versions and machine facts that a reader needs to judge the numbers."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "generate_thread": "worker" if config.worker_thread else "main",
        "transformers": transformers.__version__,
        "hf_prefix_cache": hf_prefix_cache.__version__,
        "model": model_name,
        "model_class": type(model).__name__,
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(model.dtype),
        "device": str(model.device),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "recipe_prefix_tokens": len(context.recipe_prefix or []),
        "context_limit_tokens": replay.max_context_tokens,
        "dataset_reply_fallbacks": replay.dataset_fallbacks,
    }
