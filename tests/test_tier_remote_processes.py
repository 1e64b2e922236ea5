"""The remote tier across interpreters: what process A stored, process B hits on its first call, and
two processes writing overlapping conversations at once share one server safely."""

from __future__ import annotations

import json
import subprocess
import sys

from support.workers import REMOTE_WORKER, WORKER_ENV


def start(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, REMOTE_WORKER, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=WORKER_ENV,
    )


def result(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def stored_tokens(history: list[int]) -> int:
    """Tokens of ``history`` in full blocks with computed K/V (the last generated token has none)."""
    return (len(history) - 1) // 4 * 4


def test_interpreters_share_one_server_concurrently_and_a_new_one_hits_on_its_first_call(server, tmp_path):
    """A and B run at once on overlapping conversations (the same system prompt, written by both at
    the same time): each call exact, no errors. Then C, a new interpreter, continues A's conversation on
    its first call and B's on its second: every stored token hits, from the server."""
    a, b = start("chat", server.url, 1, 3), start("chat", server.url, 2, 3)
    runs = [result(a), result(b)]
    files = []
    for index, run in enumerate(runs):
        assert all(call["equal"] for call in run["calls"]), run["calls"]
        assert run["calls"][1]["by_tier"]["device"] > 0 and run["tier_errors"] == 0
        assert run["remote"]["puts"] + run["remote"]["skipped"] > 0
        files.append(tmp_path / f"history{index}.json")
        files[-1].write_text(json.dumps(run["history"]))

    c = result(start("continue", server.url, *files))
    first, second = c["calls"]
    assert first["equal"] and second["equal"]
    assert first["hit_tokens"] == stored_tokens(runs[0]["history"])
    assert first["by_tier"] == {"remote": first["hit_tokens"]}, "C's first call hits the server only"
    assert second["hit_tokens"] == stored_tokens(runs[1]["history"])
    assert second["by_tier"]["remote"] > 0  # the shared system prompt may already be on C's device
    assert c["tier_errors"] == 0 and c["remote"]["errors"] == 0
