"""Replays in other processes, after the single-process run: a restart, and N workers sharing a server.

* ``restart`` (``--disk DIR --restart``): the first turn of every conversation, in one fresh process
  whose ``PrefixCache`` has ``disk=DIR``, the folder the run's ``prefix_cache`` mode just filled (and
  flushed). A warm first turn is the point of a disk tier: this is the cold start it saves.
* ``worker<i>`` (``--workers N --remote URL``): the selected conversations split round-robin into N
  disjoint sets, each replayed (every turn) by its own process whose ``PrefixCache`` has ``remote=URL``.
  They share the system prompt, so a worker's first turn can hit blocks another worker stored.

Each process runs ``hf_prefix_cache_eval.worker`` on a job file. The turns' prompts are the ones the
single-process run sent (the same token ids), and every output is compared with the baseline's.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .metrics import TurnRecord, tier_hits
from .modes import shown_tiers

logger = logging.getLogger(__name__)

RESTART = "restart"
WORKER_PREFIX = "worker"
START_TIMEOUT_S = 600.0  # loading the model and warming up, per process
RUN_TIMEOUT_S = 3600.0


@dataclass
class PlannedTurn:
    """A turn of the single-process run, as a later process replays it."""

    step: int
    conversation: str
    conversation_index: int
    turn: int
    prompt_ids: list[int]
    baseline_tokens: list[int]


def worker_name(index: int) -> str:
    return f"{WORKER_PREFIX}{index}"


def first_turns(plan: list[PlannedTurn]) -> list[PlannedTurn]:
    return [turn for turn in plan if turn.turn == 1]


def split_round_robin(plan: list[PlannedTurn], workers: int) -> list[list[PlannedTurn]]:
    """Worker ``i`` gets conversations ``i, i + N, i + 2N, ...`` of the selection, all of their turns, in
    the run's interleaved order: disjoint sets that together cover the selection."""
    return [[turn for turn in plan if turn.conversation_index % workers == index] for index in range(workers)]


def cache_spec(config, tiers: dict[str, Any]) -> dict[str, Any]:
    """The sizing of the single-process ``prefix_cache`` mode, with the given lower tiers."""
    return {
        "block_size": config.block_size,
        "cache_memory": None if config.cache_blocks is not None else config.cache_memory,
        "cache_blocks": config.cache_blocks,
        "tiers": tiers,
    }


def restart_tiers(config) -> dict[str, Any]:
    """A restarted process has the run's host and disk tiers (the host tier starts empty, the disk full)."""
    tiers = {"host_memory": config.host_memory, "disk": config.disk, "disk_size": config.disk_size}
    return {key: value for key, value in tiers.items() if value is not None}


def worker_tiers(config, key_prefix: str) -> dict[str, Any]:
    """Workers share the Redis server, under this run's own ``key_prefix``: earlier runs' entries (and
    other users of the server) are neither seen nor cleared."""
    tiers = {"remote": config.remote, "key_prefix": key_prefix, "remote_min_tokens": config.remote_min_tokens}
    return {key: value for key, value in tiers.items() if value is not None}


def make_job(config, model_spec: dict[str, Any], tiers: dict[str, Any], turns: list[PlannedTurn], **extra):
    return {
        "model": model_spec,
        "cache": cache_spec(config, tiers),
        "max_new_tokens": config.max_new_tokens,
        "warmup_calls": config.warmup_calls,
        "worker_thread": config.worker_thread,
        "turns": [{"step": t.step, "prompt_ids": t.prompt_ids} for t in turns],
        **extra,
    }


def run_restart(config, model_spec, plan, warmup_prompt, *, disk: str | None = None):
    """The first turns in one fresh process over the disk tier (``disk`` overrides ``config.disk``)."""
    tiers = restart_tiers(config)
    if disk is not None:
        tiers["disk"] = disk
    turns = first_turns(plan)
    job = make_job(config, model_spec, tiers, turns, warmup_prompt=warmup_prompt, threads=config.threads)
    (result,) = run_processes([job], start="together")
    return _records(RESTART, turns, result), {RESTART: _info(RESTART, result, tiers, turns)}


def run_workers(config, model_spec, plan, warmup_prompt, key_prefix: str):
    """Every turn, split round-robin over ``config.workers`` processes sharing ``config.remote``."""
    tiers = worker_tiers(config, key_prefix)
    threads = config.threads or max(1, (os.cpu_count() or 1) // config.workers)
    shares = [share for share in split_round_robin(plan, config.workers) if share]
    jobs = [
        make_job(config, model_spec, tiers, share, warmup_prompt=warmup_prompt, threads=threads)
        for share in shares
    ]
    results = run_processes(jobs, start=config.worker_start)
    records, infos = [], {}
    for index, (share, result) in enumerate(zip(shares, results, strict=True)):
        name = worker_name(index)
        records += _records(name, share, result)
        infos[name] = _info(name, result, tiers, share)
    starts = [result["turns"][0]["started_at"] for result in results]
    for info, result in zip(infos.values(), results, strict=True):
        first = result["turns"][0]
        by_tier = first["hit_tokens_by_tier"] or {}
        info["first_turn"] = {
            "conversation": share_conversation(plan, first["step"]),
            "started_after_s": first["started_at"] - min(starts),
            "ttft_s": first["ttft_s"],
            "hit_tokens": first["hit_tokens"],
            "hit_tokens_by_tier": by_tier,
        }
        info["notes"].append(
            f"first turn started {first['started_at'] - min(starts):.2f} s after the first worker's, "
            f"hit {first['hit_tokens']} tokens ({_by_tier_text(by_tier)})"
        )
    return records, infos


def share_conversation(plan: list[PlannedTurn], step: int) -> str:
    return next(turn.conversation for turn in plan if turn.step == step)


def _by_tier_text(by_tier: dict[str, int]) -> str:
    parts = [f"{tier} {tokens}" for tier, tokens in by_tier.items() if tokens]
    return ", ".join(parts) if parts else "none"


def _records(name: str, turns: list[PlannedTurn], result: dict[str, Any]) -> list[TurnRecord]:
    by_step = {turn.step: turn for turn in turns}
    records = []
    for out in result["turns"]:
        planned = by_step[out["step"]]
        prompt = len(planned.prompt_ids)
        hits = float(out["hit_tokens"])
        records.append(
            TurnRecord(
                step=planned.step,
                conversation=planned.conversation,
                turn=planned.turn,
                mode=name,
                run_position=-1,  # its own process, not in the single-process run's shuffled order
                prompt_tokens=prompt,
                hit_tokens=hits,
                computed_tokens=prompt - hits,
                hit_rate=hits / prompt,
                ttft_s=out["ttft_s"],
                e2e_s=out["e2e_s"],
                new_tokens=len(out["tokens"]),
                match=out["tokens"] == planned.baseline_tokens,
                **tier_hits(out["hit_tokens_by_tier"]),
            )
        )
    return records


def _info(
    name: str, result: dict[str, Any], tiers: dict[str, Any], turns: list[PlannedTurn]
) -> dict[str, Any]:
    shown = shown_tiers(tiers)
    return {
        "label": f"fresh process ({name}), PrefixCache with {shown}",
        "available": True,
        "reason": None,
        "setup_s": 0.0,
        "notes": [f"process {result['pid']}, {result['torch_threads']} torch threads, lower tiers {shown}"],
        "conversations": sorted(
            {turn.conversation for turn in turns}, key=[t.conversation for t in turns].index
        ),
        "stats": result["stats"],
    }


def run_processes(jobs: list[dict[str, Any]], *, start: str) -> list[dict[str, Any]]:
    """Run one worker process per job and return their results in order.

    Every process loads and warms up, then waits at a start line. ``together`` releases them all at
    once (the realistic case: whoever computes the shared system prompt first stores it, the others hit
    it only if it landed before their lookup); ``staggered`` releases each one when the previous one
    has finished (and flushed) its first turn, so later workers find the system prompt on the server.
    """
    with tempfile.TemporaryDirectory(prefix="hfpc-eval-") as folder:
        root = Path(folder)
        processes = []
        for index, job in enumerate(jobs):
            barrier = {name: str(root / f"{name}-{index}") for name in ("ready", "go", "first_done")}
            job_path, out_path = root / f"job-{index}.json", root / f"out-{index}.json"
            job_path.write_text(json.dumps({**job, "barrier": barrier}), encoding="utf-8")
            log = open(root / f"log-{index}.txt", "wb")  # noqa: SIM115 - the child writes to it
            command = [sys.executable, "-m", "hf_prefix_cache_eval.worker", str(job_path), str(out_path)]
            processes.append(
                (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), barrier, out_path)
            )
            log.close()
        try:
            for index, (process, barrier, _) in enumerate(processes):
                _wait_for(Path(barrier["ready"]), process, root / f"log-{index}.txt", START_TIMEOUT_S)
            for index, (process, barrier, _) in enumerate(processes):
                Path(barrier["go"]).touch()
                if start == "staggered" and index + 1 < len(processes):
                    _wait_for(Path(barrier["first_done"]), process, root / f"log-{index}.txt", RUN_TIMEOUT_S)
            results = []
            for index, (process, _, out_path) in enumerate(processes):
                code = process.wait(RUN_TIMEOUT_S)
                if code != 0 or not out_path.exists():
                    raise RuntimeError(
                        f"worker process {index} failed (exit {code}):\n{_tail(root / f'log-{index}.txt')}"
                    )
                results.append(json.loads(out_path.read_text(encoding="utf-8")))
            return results
        finally:
            for process, _, _ in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait(30)


def _wait_for(path: Path, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None and not path.exists():
            raise RuntimeError(
                f"worker process exited (code {process.returncode}) before {path.name}:\n{_tail(log)}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"worker process gave no {path.name} signal within {timeout:.0f} s:\n{_tail(log)}"
            )
        time.sleep(0.01)


def _tail(log: Path, chars: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"
