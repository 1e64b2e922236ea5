"""The remote tier across interpreters: what process A stored, process B hits on its first call, and
two processes writing overlapping conversations at once share one server safely."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from redis_server import RedisServer

WORKER = str(Path(__file__).parent / "remote_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture
def server(tmp_path):
    with RedisServer(tmp_path / "redis") as running:
        yield running


def start(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, WORKER, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


def result(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def stored_tokens(history: list[int]) -> int:
    """Tokens of ``history`` in full blocks with computed K/V (the last generated token has none)."""
    return (len(history) - 1) // 4 * 4


def test_a_second_interpreter_hits_what_the_first_stored_on_its_first_call(server, tmp_path):
    a = result(start("chat", server.url, 0, 3))
    assert all(call["equal"] for call in a["calls"])
    assert a["calls"][0]["hit_tokens"] == 0 and a["calls"][1]["by_tier"]["device"] > 0
    assert a["tier_errors"] == 0 and a["remote"]["puts"] > 0
    history = tmp_path / "history.json"
    history.write_text(json.dumps(a["history"]))

    b = result(start("chat", server.url, 0, 1, history))
    first = b["calls"][0]
    assert first["equal"]
    assert first["hit_tokens"] == stored_tokens(a["history"])
    assert first["by_tier"] == {"device": 0, "remote": first["hit_tokens"]}
    assert b["tier_errors"] == 0 and b["remote"]["hits"] == first["hit_tokens"] // 4


def test_two_interpreters_at_once_on_overlapping_conversations(server, tmp_path):
    """Both share the system prompt, and both write it at the same time; each call stays exact, neither
    sees an error, and afterwards a third process continues each conversation from the server."""
    a, b = start("chat", server.url, 1, 3), start("chat", server.url, 2, 3)
    runs = [result(a), result(b)]
    for run in runs:
        assert all(call["equal"] for call in run["calls"]) and run["tier_errors"] == 0
    for index, run in enumerate(runs):
        history = tmp_path / f"history{index}.json"
        history.write_text(json.dumps(run["history"]))
        c = result(start("chat", server.url, 9, 1, history))
        call = c["calls"][0]
        assert call["equal"] and call["hit_tokens"] == stored_tokens(run["history"])
        assert call["by_tier"]["remote"] == call["hit_tokens"] and c["tier_errors"] == 0
