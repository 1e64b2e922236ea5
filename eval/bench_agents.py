"""A smolagents agent's model time per step, plain and with ``hf_prefix_cache.attach``, interleaved in one run.

The agent is a real ``CodeAgent`` over smolagents' own ``TransformersModel`` (SmolLM2-135M-Instruct fp32
on CPU, from the packaged GGUF) with a scripted ``lookup`` tool. Every step re-sends the whole memory
(system prompt, task, each earlier step), the workload prefix caching is for. SmolLM2-135M rarely follows
the agent format, so a step is one model call, whatever the agent makes of its reply; the run stops at
``--max-steps`` (smolagents then makes one more call, the final answer, under another system prompt).

Each round runs two agents in lockstep, one on a plain model and one on an attached copy (a new
``attach`` per round, so no round starts warm): one model call of one agent, then one of the other, the
mode that goes first alternating between rounds, so both modes see the same moments of this shared
machine. Each model call is timed around ``TransformersModel.generate``; per step the median over
rounds of each mode and their ratio are printed (step 1 has no hits: its ratio shows the noise).
Outputs must be identical, step for step (exit status 1 if not).

Run ``python -m hf_prefix_cache_eval.bench_agents [--rounds 2] [--max-steps 5] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hf_prefix_cache import attach, detach

from .models import ensure_smollm2
from .timing import load_average

FACTS = {
    "capital of france": "Paris",
    "population of paris": "2,102,650 (2023)",
    "area of paris": "105.4 km2",
    "river of paris": "the Seine",
}
TASK = (
    "Use the lookup tool to find the capital of France, then its population, then its area, and return "
    "the population density of that city in people per km2, rounded to a whole number."
)
MODES = ("plain", "attached")


def lookup_tool():
    from smolagents import tool

    @tool
    def lookup(topic: str) -> str:
        """Looks a fact up in a small encyclopedia.

        Args:
            topic: what to look up, e.g. "capital of france" or "area of paris".
        """
        return FACTS.get(topic.strip().lower(), f"nothing found about {topic!r}; try another topic")

    return lookup


class TimedModel:
    """Times each ``generate`` call of a smolagents model and keeps its reply."""

    def __init__(self, model):
        self.model = model
        self.calls: list[dict] = []
        self._generate = model.generate
        model.generate = self.generate

    def generate(self, messages, *args, **kwargs):
        start = time.perf_counter()
        reply = self._generate(messages, *args, **kwargs)
        seconds = time.perf_counter() - start
        usage = reply.token_usage
        self.calls.append(
            {
                "seconds": seconds,
                "content": reply.content,
                "prompt_tokens": usage.input_tokens if usage else None,
            }
        )
        return reply


def advance(run, timed: TimedModel) -> bool:
    """Run the agent until its next model call has ended (False once the run is over)."""
    calls = len(timed.calls)
    while len(timed.calls) == calls:
        try:
            next(run)
        except StopIteration:
            return False
    return True


def run_round(timed: dict[str, TimedModel], max_steps: int, first: str) -> dict[str, list[dict]]:
    """Two agent runs from an empty memory, one per mode, in lockstep: one model call of one, then one of
    the other (``first`` starts), so that both see the same moments of the shared machine. The attached
    model gets a new store, so no round starts warm."""
    from smolagents import CodeAgent

    cache = attach(timed["attached"].model.model, max_memory="1GiB")
    hits: list[int] = []
    counted = timed["attached"]._generate

    def counting(messages, *args, **kwargs):
        reply = counted(messages, *args, **kwargs)
        hits.append(cache.last_call.hit_tokens)
        return reply

    timed["attached"]._generate = counting
    try:
        runs = {}
        for mode in MODES:
            timed[mode].calls = []
            agent = CodeAgent(
                tools=[lookup_tool()], model=timed[mode].model, max_steps=max_steps, verbosity_level=-1
            )
            runs[mode] = agent.run(TASK, stream=True)
        order = [first, *(m for m in MODES if m != first)]
        active = list(order)
        while active:
            active = [mode for mode in active if advance(runs[mode], timed[mode])]
    finally:
        timed["attached"]._generate = counted
        detach(timed["attached"].model.model)
    for call, hit in zip(timed["attached"].calls, hits):
        call["hit_tokens"] = hit
    return {mode: list(timed[mode].calls) for mode in MODES}


def run_benchmark(rounds: int = 2, max_steps: int = 5, max_new_tokens: int = 96) -> dict:
    from smolagents import TransformersModel

    torch.set_num_threads(2)
    folder = ensure_smollm2()
    timed = {  # one model object per mode: attach() acts on the model, not on the agent
        mode: TimedModel(
            TransformersModel(
                model_id=str(folder),
                device_map="cpu",
                torch_dtype="float32",
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
        )
        for mode in MODES
    }
    runs: dict[str, list[list[dict]]] = {mode: [] for mode in MODES}
    for index in range(rounds):
        result = run_round(timed, max_steps, first=MODES[index % 2])
        for mode in MODES:
            runs[mode].append(result[mode])
            print(f"  round {index + 1} {mode}: {[round(c['seconds'], 2) for c in result[mode]]} s per call")
    return summarise(runs, load_average())


def summarise(runs: dict[str, list[list[dict]]], load: float | None) -> dict:
    steps = min(len(run) for mode in MODES for run in runs[mode])
    reference = [call["content"] for call in runs["plain"][0]]
    mismatches = [
        f"{mode} round {r + 1} step {s + 1}"
        for mode in MODES
        for r, run in enumerate(runs[mode])
        for s, call in enumerate(run)
        if s >= len(reference) or call["content"] != reference[s]
    ]
    mismatches += [
        f"{mode} round {r + 1}: {len(run)} calls"
        for mode in MODES
        for r, run in enumerate(runs[mode])
        if len(run) != len(reference)
    ]
    per_step = []
    for s in range(steps):
        plain = statistics.median(run[s]["seconds"] for run in runs["plain"])
        attached = statistics.median(run[s]["seconds"] for run in runs["attached"])
        per_step.append(
            {
                "step": s + 1,
                "prompt_tokens": runs["plain"][0][s]["prompt_tokens"],
                "hit_tokens": runs["attached"][0][s].get("hit_tokens"),
                "plain_s": plain,
                "attached_s": attached,
                "ratio": plain / attached,
            }
        )
    later = [row for row in per_step if row["step"] >= 2]
    total = {mode: sum(row[f"{mode}_s"] for row in later) for mode in MODES}
    return {
        "steps": per_step,
        "steps_2_on_plain_s": total["plain"],
        "steps_2_on_attached_s": total["attached"],
        "steps_2_on_ratio": total["plain"] / total["attached"] if total["attached"] else None,
        "mismatches": mismatches,
        "load_average": load,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="agent runs per mode (default 2)")
    parser.add_argument("--max-steps", type=int, default=5, help="the agent's max_steps (default 5)")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="per model call (default 96)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    result = run_benchmark(args.rounds, args.max_steps, args.max_new_tokens)
    print("  step  prompt  hit   plain s  attached s  plain/attached")
    for row in result["steps"]:
        print(
            f"  {row['step']:4d}  {row['prompt_tokens'] or 0:6d}  {row['hit_tokens'] or 0:5d}  {row['plain_s']:7.2f}  "
            f"{row['attached_s']:10.2f}  {row['ratio']:13.2f}x"
        )
    print(
        f"  steps >= 2: plain {result['steps_2_on_plain_s']:.1f} s, attached {result['steps_2_on_attached_s']:.1f} s, "
        f"ratio {result['steps_2_on_ratio']:.2f}x (load average {result['load_average']})"
    )
    print(f"  outputs different from plain: {result['mismatches'] or 'none'}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 1 if result["mismatches"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
