"""lm-eval loglikelihood on a 5-shot multiple-choice task: ``hf-prefix-cache`` vs lm-eval's ``hf``, side by side.

SmolLM2-135M-Instruct fp32 on CPU (2 threads), batch size 1, the local task ``eval/lm_eval_tasks/prefix_mc``
(every document shares the five-shot context; each question's choices share the question). Both models
run in this one process on the same weights, interleaved chunk by chunk: the requests, in the order under
test, are cut into consecutive chunks of about 16 (never splitting requests with the same input, which
lm-eval's logits cache computes once), and each chunk goes to ``hf`` then to ours, so both see the same
moments of a shared machine; only the ratios mean anything. Ours starts each order from an empty cache
(built inside the timed region) that then persists across its chunks: nothing is pre-built.

Orders: ``lm-eval`` is lm-eval's own (its Collator sorts requests longest first, ties by token ids),
``shuffled`` a seeded random order (requests with the same input kept together; the Collator's sort key
is replaced by the same random key for both models, so each chunk runs in the global order). Printed:
wall time of each, the ratio hf / ours, the largest per-request loglikelihood difference, both
accuracies and the cache's hit rate.

Run ``python -m hf_prefix_cache_eval.bench_lm_eval [--limit 48] [--rounds 1] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
from lm_eval.models import huggingface
from lm_eval.models.utils import Collator
from lm_eval.tasks import TaskManager

from hf_prefix_cache import PrefixCache
from hf_prefix_cache.integrations import lm_eval as integration

from .models import load_model
from .timing import load_average

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
TASK = "prefix_mc"
ORDERS = ("lm-eval", "shuffled")
TARGET = 2.0


def task_and_requests(limit: int | None):
    task = TaskManager(include_path=str(TASKS), include_defaults=False).load([TASK])["tasks"][TASK]
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return task, list(task.instances)


CHUNK = 16  # requests per interleaved chunk


class ShuffledCollator(Collator):
    """lm-eval's Collator with the seeded random order instead of longest first (groups are kept)."""

    def __init__(self, arr, sort_fn=None, group_fn=lambda x: x[1], group_by=None):
        super().__init__(arr, sort_fn=random_key, group_fn=group_fn, group_by=group_by)


def random_key(request) -> tuple:
    """A seeded random rank of the request's input (context + continuation[:-1]), ties by its tokens."""
    tokens = request[1] + request[2]
    return random.Random(repr(tokens[:-1])).random(), tuple(tokens)


def lm_eval_key(request) -> tuple:
    tokens = request[1] + request[2]
    return -len(tokens), tuple(tokens)


@contextlib.contextmanager
def execution_order(order: str):
    """Run both models' loglikelihood requests in ``order`` (the Collator each module uses)."""
    if order == "lm-eval":
        yield
        return
    modules = (huggingface, integration)
    saved = [module.Collator for module in modules]
    for module in modules:
        module.Collator = ShuffledCollator
    try:
        yield
    finally:
        for module, original in zip(modules, saved):
            module.Collator = original


def chunks_in_order(hf, requests, order: str) -> list[list[int]]:
    """Request indices in the global ``order``, cut into chunks that never split one input."""
    encoded = [(None, *hf._encode_pair(*request.arguments)) for request in requests]
    key = lm_eval_key if order == "lm-eval" else random_key
    ranked = sorted(range(len(requests)), key=lambda i: key(encoded[i]))
    chunks: list[list[int]] = [[]]
    for position, index in enumerate(ranked):
        chunks[-1].append(index)
        following = ranked[position + 1] if position + 1 < len(ranked) else None
        same_input = following is not None and (
            encoded[following][1] + encoded[following][2][:-1] == encoded[index][1] + encoded[index][2][:-1]
        )
        if len(chunks[-1]) >= CHUNK and not same_input and following is not None:
            chunks.append([])
    return chunks


def accuracy(task, requests, results) -> float:
    """Share of documents whose highest-loglikelihood choice is the target (lm-eval's ``acc``)."""
    best: dict[int, tuple[float, int]] = {}
    targets: dict[int, int] = {}
    for request, (loglikelihood, _) in zip(requests, results):
        if request.doc_id not in best or loglikelihood > best[request.doc_id][0]:
            best[request.doc_id] = (loglikelihood, request.idx)
        targets[request.doc_id] = int(task.doc_to_target(request.doc))
    return sum(best[doc][1] == targets[doc] for doc in best) / len(best)


def run(hf, ours, model, cache_options: dict, requests, order: str) -> dict:
    """hf and ours (from an empty cache) on the same chunks, alternately, in ``order``."""
    expected: list = [None] * len(requests)
    actual: list = [None] * len(requests)
    hf_s = ours_s = 0.0
    with execution_order(order):
        started = time.perf_counter()
        ours.prefix_cache = PrefixCache(model, **cache_options)  # no pre-built cache: part of the time
        ours_s += time.perf_counter() - started
        for chunk in chunks_in_order(hf, requests, order):
            batch = [requests[i] for i in chunk]
            started = time.perf_counter()
            for index, result in zip(chunk, hf.loglikelihood(batch, disable_tqdm=True)):
                expected[index] = result
            hf_s += time.perf_counter() - started
            started = time.perf_counter()
            for index, result in zip(chunk, ours.loglikelihood(batch, disable_tqdm=True)):
                actual[index] = result
            ours_s += time.perf_counter() - started
    stats = ours.prefix_cache.stats
    return {
        "order": order,
        "hf_s": hf_s,
        "ours_s": ours_s,
        "ratio": hf_s / ours_s,
        "max_abs_diff": max(abs(a[0] - e[0]) for a, e in zip(actual, expected)),
        "greedy_same": [a[1] for a in actual] == [e[1] for e in expected],
        "hit_rate": stats.hit_rate,
        "load_average": load_average(),
        "results": (expected, actual),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=48, help="documents of the task (4 requests each)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of both orders")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2", dtype="float32")
    task, requests = task_and_requests(args.limit)
    common = dict(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=1)
    hf = huggingface.HFLM(**common)
    options = dict(block_size=args.block_size, max_memory="2GiB")
    ours = integration.PrefixCacheLM(**common, **options)
    print(
        f"{TASK}: {len(requests)} loglikelihood requests ({args.limit} docs, 5-shot), SmolLM2-135M-Instruct "
        f"fp32, CPU, {args.threads} threads, batch size 1, block size {args.block_size}"
    )
    rows = []
    for _ in range(args.rounds):
        for order in ORDERS:
            row = run(hf, ours, model, options, requests, order)
            expected, actual = row.pop("results")
            row["acc_hf"], row["acc_ours"] = (
                accuracy(task, requests, expected),
                accuracy(task, requests, actual),
            )
            rows.append(row)
            print(
                f"{order:>9}: hf {row['hf_s']:6.1f} s  hf-prefix-cache {row['ours_s']:6.1f} s  "
                f"ratio {row['ratio']:.2f}x ({'meets' if row['ratio'] >= TARGET else 'misses'} {TARGET}x)  "
                f"max |dll| {row['max_abs_diff']:.1e}  greedy same {row['greedy_same']}  "
                f"acc {row['acc_hf']:.3f} / {row['acc_ours']:.3f}  hit rate {row['hit_rate']:.1%}  "
                f"load {row['load_average']}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    exact = all(r["max_abs_diff"] <= 1e-4 and r["acc_hf"] == r["acc_ours"] and r["greedy_same"] for r in rows)
    return 0 if exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
