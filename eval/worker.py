"""A fresh process that replays turns through its own ``PrefixCache``: a restart, or one of N workers.

``python -m hf_prefix_cache_eval.worker JOB.json OUT.json``: the job (written by ``subruns``) names the
model to load, the cache's sizing and lower tiers (``disk=`` for a restart, ``remote=`` for workers), a
warm-up prompt and the turns, as token ids. The worker loads the model, builds the cache, warms up on
the warm-up prompt (it shares no block with the turns), then waits at the parent's start line: it writes
``ready`` and waits for ``go``, so model loading stays out of the timeline. Each turn is timed exactly as
the single-process ``prefix_cache`` mode times it (same code). After its first turn it flushes the
cache's queued tier writes and writes ``first_done``, so a staggered start can release the next worker
once this one's blocks are on the server. The turns' results go to OUT.json; the parent checks outputs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

GO_TIMEOUT_S = 600.0


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Load, warm up, wait for the start, replay ``job["turns"]``; returns what OUT.json holds."""
    import torch

    from .models import load_model
    from .modes import FLUSH_TIMEOUT_S, ModeContext, PrefixCacheMode, greedy_config

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    spec = job["model"]
    model, _ = load_model(
        spec["name"], device=spec["device"], dtype=spec["dtype"], cache_dir=spec["cache_dir"]
    )
    cache = job["cache"]
    context = ModeContext(
        model=model,
        generation_config=greedy_config(model, job["max_new_tokens"]),
        max_new_tokens=job["max_new_tokens"],
        block_size=cache["block_size"],
        cache_memory=cache["cache_memory"],
        cache_blocks=cache["cache_blocks"],
        tiers=cache["tiers"],
    )
    if job["worker_thread"]:
        context.executor = ThreadPoolExecutor(
            1, "generate", initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),)
        )
    mode = PrefixCacheMode(context)
    try:
        mode.setup()
        for _ in range(job["warmup_calls"]):
            mode.generate(job["warmup_prompt"])
        mode.cache.reset_stats()  # the counters cover the measured turns only (no clear: tiers stay)
        _wait_for_start(job.get("barrier"))
        turns = []
        for index, turn in enumerate(job["turns"]):
            started = time.time()
            out = mode.generate(turn["prompt_ids"])
            turns.append(
                {
                    "step": turn["step"],
                    "tokens": out.tokens,
                    "ttft_s": out.ttft_s,
                    "e2e_s": out.e2e_s,
                    "hit_tokens": out.hit_tokens,
                    "hit_tokens_by_tier": out.hit_tokens_by_tier,
                    "started_at": started,
                    "ended_at": time.time(),
                }
            )
            if index == 0:
                mode.cache.flush(timeout=FLUSH_TIMEOUT_S)  # this turn's blocks reach the shared tier
                _touch((job.get("barrier") or {}).get("first_done"))
        stats = mode.cache.stats.as_dict()
    finally:
        mode.close()  # flushes the tiers' queued writes
        if context.executor is not None:
            context.executor.shutdown()
    return {
        "turns": turns,
        "stats": stats,
        "notes": mode.notes,
        "torch_threads": torch.get_num_threads(),
        "pid": os.getpid(),
    }


def _wait_for_start(barrier: dict[str, str] | None) -> None:
    if not barrier:
        return
    _touch(barrier["ready"])
    deadline = time.monotonic() + GO_TIMEOUT_S
    while not Path(barrier["go"]).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no start signal ({barrier['go']}) after {GO_TIMEOUT_S:.0f} s")
        time.sleep(0.005)


def _touch(path: str | None) -> None:
    if path:
        Path(path).touch()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m hf_prefix_cache_eval.worker JOB.json OUT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    result = run_job(job)
    tmp = Path(argv[1]).with_suffix(".tmp")
    tmp.write_text(json.dumps(result), encoding="utf-8")
    os.replace(tmp, argv[1])  # the parent never reads a partial file
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
