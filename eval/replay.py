"""Turn conversations into the prompts a chat server would see, interleaved across conversations.

Every turn's prompt is the chat template of the conversation so far plus the new user message, so turn
``k`` of a conversation extends turn ``k - 1``'s prompt and reply: that is the reuse a prefix cache can
find. Conversations are visited round-robin (turn 1 of every conversation, then turn 2 of every
conversation, ...), so a conversation's next turn arrives after the other conversations' turns, as on a
shared server, and a small store has to evict between them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from transformers import PreTrainedTokenizerBase

from .config import HISTORY_CHOICES
from .data import Conversation

logger = logging.getLogger(__name__)

History = Literal["model", "dataset"]


@dataclass
class PendingTurn:
    """A prompt to send to every mode; hand the reply back with ``Replay.record_reply``."""

    step: int  # position in the interleaved schedule (0-based)
    conversation_index: int
    conversation_id: str
    turn: int  # 1-based turn number within the conversation
    messages: list[dict[str, str]]
    prompt_ids: list[int]
    reference_reply: str | None = None


@dataclass
class Stop:
    """Why a conversation's replay ended before its last turn."""

    conversation_id: str
    turn: int  # the first turn that was not replayed
    prompt_tokens: int
    reason: str


@dataclass
class _State:
    conversation: Conversation
    system: str | None
    history: list[dict[str, str]] = field(default_factory=list)
    next_turn: int = 0
    waiting: PendingTurn | None = None  # yielded, reply not recorded yet
    stopped: bool = False


def combine_system(shared: str | None, own: str | None) -> str | None:
    """The shared system prompt goes first (it is the common prefix); a conversation's own follows it."""
    parts = [text for text in (shared, own) if text]
    return "\n\n".join(parts) if parts else None


def build_messages(system: str | None, history: Sequence[dict[str, str]], user: str) -> list[dict[str, str]]:
    """Chat messages for one turn: optional system message, the history so far, the new user message."""
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, *history, {"role": "user", "content": user}]


def render_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, str]],
    *,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids of the chat template, tokenized as ``apply_chat_template`` does (no extra special tokens)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; multi-turn replay "
            "needs a chat (instruct) model"
        )
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class Replay:
    """Round-robin schedule of turns; the history grows from the replies recorded for each turn.

    Args:
        conversations: what to replay (each conversation's own system message is kept).
        tokenizer: renders the chat template.
        system_prompt: shared text prepended to every conversation's system message (None: none).
        history: ``"model"`` keeps the model's reply in the history (reuse of generated tokens is
            exercised), ``"dataset"`` keeps the dataset's recorded reply, falling back to the model's
            reply for turns without one.
        max_context_tokens: a conversation stops at the first turn whose prompt would be longer.
    """

    def __init__(
        self,
        conversations: Sequence[Conversation],
        tokenizer: PreTrainedTokenizerBase,
        *,
        system_prompt: str | None = None,
        history: History = "model",
        max_context_tokens: int | None = None,
    ):
        if history not in HISTORY_CHOICES:
            raise ValueError(f"history must be one of {HISTORY_CHOICES}, got {history!r}")
        if max_context_tokens is not None and max_context_tokens < 1:
            raise ValueError(f"max_context_tokens must be positive, got {max_context_tokens}")
        self.tokenizer = tokenizer
        self.history = history
        self.max_context_tokens = max_context_tokens
        self.states = [_State(c, combine_system(system_prompt, c.system)) for c in conversations]
        self.stops: list[Stop] = []
        self.dataset_fallbacks = 0  # turns with history="dataset" that had no recorded reply

    @property
    def total_turns(self) -> int:
        """Upper bound on the turns to replay (the context limit may stop some conversations early)."""
        return sum(len(state.conversation.turns) for state in self.states)

    def longest_prompt_estimate(self, max_reply_tokens: int) -> int:
        """A generous bound on the longest prompt the replay will send, before any reply exists.

        Each conversation is rendered whole with the dataset's replies (``history="dataset"``) or empty
        ones, and every model reply is counted as ``max_reply_tokens`` plus a few tokens of slack for
        re-tokenisation; the result is capped by ``max_context_tokens``.
        """
        longest = 0
        for state in self.states:
            messages = [{"role": "system", "content": state.system}] if state.system else []
            model_replies = 0
            for turn in state.conversation.turns[:-1]:
                reply = turn.reference_reply if self.history == "dataset" else None
                model_replies += reply is None
                messages += [
                    {"role": "user", "content": turn.user},
                    {"role": "assistant", "content": reply or ""},
                ]
            messages.append({"role": "user", "content": state.conversation.turns[-1].user})
            tokens = len(render_prompt(self.tokenizer, messages)) + model_replies * (max_reply_tokens + 4)
            longest = max(longest, tokens)
        return min(longest, self.max_context_tokens) if self.max_context_tokens else longest

    def __iter__(self) -> Iterator[PendingTurn]:
        step = 0
        rounds = max((len(state.conversation.turns) for state in self.states), default=0)
        for _ in range(rounds):
            for index, state in enumerate(self.states):
                if state.stopped or state.next_turn >= len(state.conversation.turns):
                    continue
                if state.waiting is not None:
                    raise RuntimeError(
                        f"no reply recorded for conversation {state.conversation.id} turn "
                        f"{state.waiting.turn}; call record_reply() before asking for the next turn"
                    )
                pending = self._prepare(index, state, step)
                if pending is None:
                    continue
                state.waiting = pending
                step += 1
                yield pending

    def _prepare(self, index: int, state: _State, step: int) -> PendingTurn | None:
        turn = state.conversation.turns[state.next_turn]
        messages = build_messages(state.system, state.history, turn.user)
        prompt_ids = render_prompt(self.tokenizer, messages)
        if self.max_context_tokens is not None and len(prompt_ids) > self.max_context_tokens:
            state.stopped = True
            stop = Stop(
                state.conversation.id,
                state.next_turn + 1,
                len(prompt_ids),
                f"prompt of {len(prompt_ids)} tokens exceeds max_context_tokens={self.max_context_tokens}",
            )
            self.stops.append(stop)
            logger.info("conversation %s stops at turn %d: %s", stop.conversation_id, stop.turn, stop.reason)
            return None
        return PendingTurn(
            step=step,
            conversation_index=index,
            conversation_id=state.conversation.id,
            turn=state.next_turn + 1,
            messages=messages,
            prompt_ids=prompt_ids,
            reference_reply=turn.reference_reply,
        )

    def record_reply(self, pending: PendingTurn, model_reply: str) -> str:
        """Append the user message and the assistant reply to the history; returns the reply kept."""
        state = self.states[pending.conversation_index]
        if state.waiting is not pending:
            raise RuntimeError(
                f"turn {pending.turn} of {pending.conversation_id} is not the one awaiting a reply"
            )
        reply = model_reply
        if self.history == "dataset":
            if pending.reference_reply is not None:
                reply = pending.reference_reply
            else:
                self.dataset_fallbacks += 1
                if self.dataset_fallbacks == 1:
                    logger.warning(
                        "history='dataset' but %s turn %d has no recorded reply: keeping the model's reply "
                        "(counted in dataset_fallbacks)",
                        pending.conversation_id,
                        pending.turn,
                    )
        state.history.append({"role": "user", "content": pending.messages[-1]["content"]})
        state.history.append({"role": "assistant", "content": reply})
        state.next_turn += 1
        state.waiting = None
        return reply
