"""Block access traces of chat replays, for the eviction simulator (``retention_sim.py``).

``round_robin`` is the replay of ``replay.py`` (turn 1 of every conversation, then turn 2, ...) with the
dataset's replies as history, so the trace is known before any model runs; a turn without a recorded
reply gets a short synthetic one. ``one_conversation`` chains the turns of many conversations into one
long conversation, the case where recency is right.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from .data import Conversation, Turn
from .replay import build_messages, combine_system, render_prompt
from .retention_sim import Call


def synthetic_reply(conversation: int, turn: int) -> str:
    return f"Reply {conversation}.{turn}: " + " ".join(
        f"point {i} of answer {conversation}" for i in range(6)
    )


def turn_call(tokenizer, system: str | None, history: list[dict], user: str, reply: str) -> Call:
    """The prompt of one turn and what a cache stores after it (the prompt and the reply's tokens)."""
    messages = build_messages(system, history, user)
    prompt = render_prompt(tokenizer, messages)
    stored = render_prompt(
        tokenizer, [*messages, {"role": "assistant", "content": reply}], add_generation_prompt=False
    )
    if stored[: len(prompt)] != prompt:  # the template renders history differently: store prompt + reply
        stored = prompt + list(tokenizer(reply, add_special_tokens=False)["input_ids"])
    return Call(prompt, stored)


def round_robin(
    conversations: Sequence[Conversation], tokenizer, *, system_prompt: str | None = None
) -> list[Call]:
    """Every turn of ``conversations`` in round-robin order, each conversation's history growing."""
    histories: list[list[dict]] = [[] for _ in conversations]
    calls = []
    rounds = max((len(c.turns) for c in conversations), default=0)
    for turn in range(rounds):
        for index, conversation in enumerate(conversations):
            if turn >= len(conversation.turns):
                continue
            step = conversation.turns[turn]
            reply = step.reference_reply or synthetic_reply(index, turn)
            system = combine_system(system_prompt, conversation.system)
            calls.append(turn_call(tokenizer, system, histories[index], step.user, reply))
            histories[index] += [
                {"role": "user", "content": step.user},
                {"role": "assistant", "content": reply},
            ]
    return calls


def chained(conversations: Sequence[Conversation], count: int, turns: int) -> list[Conversation]:
    """``count`` conversations of ``turns`` turns each, made of the turns of ``conversations`` in turn
    (MT-Bench has two turns a conversation; this makes longer ones of the same questions)."""
    flat = [turn for conversation in conversations for turn in conversation.turns]
    return [
        Conversation(f"chained-{index}", [flat[(index * turns + k) % len(flat)] for k in range(turns)])
        for index in range(count)
    ]


def hot_and_one_off(
    conversations: Sequence[Conversation], tokenizer, *, calls: int = 300, hot: int = 5, seed: int = 0
) -> list[Call]:
    """Where recency is right: half the calls continue one of ``hot`` long prompts (a few questions each,
    asked again and again in random order), the other half are one-off questions."""
    rng = random.Random(seed)
    questions = [turn.user for conversation in conversations for turn in conversation.turns]
    prefixes = ["\n\n".join(questions[i * 4 : i * 4 + 4]) for i in range(hot)]
    trace = []
    for index in range(calls):
        if rng.random() < 0.5:
            messages = [{"role": "user", "content": prefixes[rng.randrange(hot)] + f"\n\nPart {index}."}]
        else:
            messages = [{"role": "user", "content": questions[4 * hot + index % (len(questions) - 4 * hot)]}]
        prompt = render_prompt(tokenizer, messages)
        trace.append(Call(prompt, prompt + list(tokenizer(f" Answer {index}.")["input_ids"])))
    return trace


def one_conversation(conversations: Sequence[Conversation], turns: int) -> Conversation:
    """The first ``turns`` turns of ``conversations``, in order, as one long conversation."""
    chained: list[Turn] = [turn for conversation in conversations for turn in conversation.turns][:turns]
    return Conversation("one-long-conversation", chained)
