"""Retention priorities of a call's blocks: one number for the call, or one per token (by chat role).

The pool evicts the lowest priority first (``eviction.py``). A call's ``priority=`` is either an int for
all its blocks or a list with one int per prompt token; a block takes the highest priority of its tokens
(a block holding the end of the system prompt is kept like the system prompt), reply tokens take the
last token's priority, and a block keeps the highest priority any call gave it until it is evicted.
``role_priorities`` builds the per-token list from chat messages, so blocks of the system prompt outlive
user turns, which outlive assistant turns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# system (and developer) prompts outlive user turns, which outlive assistant replies and tool output
ROLE_PRIORITIES: dict[str, int] = {"system": 2, "developer": 2, "user": 1, "assistant": 0, "tool": 0}


def checked(priority, rows: int, width: int) -> int | list[int] | None:
    """``priority`` as an int or a per-token list of ints, or a ``ValueError`` naming the fix."""
    if priority is None:
        return None
    if isinstance(priority, bool) or not isinstance(priority, (int, Sequence)) or isinstance(priority, str):
        raise ValueError(f"priority= takes an int or a list of ints (one per prompt token), got {priority!r}")
    if isinstance(priority, int):
        return priority
    levels = list(priority)
    if not all(isinstance(level, int) and not isinstance(level, bool) for level in levels):
        raise ValueError("priority= as a list needs one int per prompt token (see role_priorities)")
    if rows != 1 or len(levels) != width:
        raise ValueError(
            f"priority= as a list needs a 1-row prompt and one int per token: got {len(levels)} for a "
            f"{rows}x{width} prompt; pass an int for a batch, or role_priorities(tokenizer, messages) for "
            "the messages that make this prompt"
        )
    return levels


def block_levels(priority: int | list[int], num_blocks: int, block_size: int) -> list[int]:
    """The priority of each of the first ``num_blocks`` blocks: the highest of its tokens' priorities."""
    if isinstance(priority, int):
        return [priority] * num_blocks
    last = priority[-1] if priority else 0
    return [
        max(priority[i * block_size : (i + 1) * block_size], default=last) if i * block_size < len(priority)
        else last
        for i in range(num_blocks)
    ]  # fmt: skip


def role_priorities(
    tokenizer,
    messages: Sequence[Mapping[str, str]],
    rule: Mapping[str, int] | None = None,
    *,
    add_generation_prompt: bool = True,
    **template_kwargs,
) -> list[int]:
    """One priority per token of ``messages`` rendered with the tokenizer's chat template (the ids
    ``tokenizer(text, add_special_tokens=False)`` gives for the rendered text), by the role of the message
    each token belongs to. ``rule`` maps roles to priorities (default ``ROLE_PRIORITIES``; roles not in it
    get the lowest); the generation prompt and the reply count as ``assistant``.

    Pass it with the same ids: ``generate(ids, past_key_values=cache, priority=role_priorities(tok, msgs))``.
    """
    rule = dict(ROLE_PRIORITIES if rule is None else rule)
    lowest = min(rule.values(), default=0)

    def ids(part, generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(
            list(part), tokenize=False, add_generation_prompt=generation_prompt, **template_kwargs
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    full = ids(messages, add_generation_prompt)
    levels: list[int] = []
    for end in range(1, len(messages) + 1):
        part = ids(messages[:end], False)
        agreed = 0
        for a, b in zip(part, full):
            if a != b:
                break
            agreed += 1
        role = messages[end - 1].get("role", "")
        levels += [rule.get(role, lowest)] * max(0, agreed - len(levels))
    levels += [rule.get("assistant", lowest)] * (len(full) - len(levels))
    return levels
