"""The eval harness's other processes: ``--restart`` over the disk tier, ``--workers N`` over one Redis.

One CLI run on the tiny random Llama (saved to a folder, so the fresh processes load the same weights)
fills a disk tier, replays the first turns in a fresh process, and replays the conversations in two
worker processes started staggered through a real redis-server, so the second worker's first turn finds
the shared system prompt on the server. A restart over an empty folder is the negative control.
"""

from __future__ import annotations

import json

import pytest
from support.chat import SYSTEM, chat_model, tiny_tokenizer

from hf_prefix_cache_eval import runner, subruns
from hf_prefix_cache_eval.__main__ import main

BLOCK = 16
CONVERSATIONS = [
    {"id": f"t{i}", "conversations": [
        {"from": "human", "value": f"Question {i}: what is {i} plus {i}?"}, {"from": "gpt", "value": "ok"},
        {"from": "human", "value": f"And {i} times {i}?"}, {"from": "gpt", "value": "ok"},
    ]}
    for i in range(4)
]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaltiers")
    tokenizer = tiny_tokenizer()
    model = chat_model(len(tokenizer))
    folder = root / "tiny-model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    dataset = root / "chats.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in CONVERSATIONS), encoding="utf-8")
    system = root / "system.txt"
    system.write_text(SYSTEM, encoding="utf-8")
    return root, folder, dataset, system


def cli_run(setup, name: str, *options: str):
    """``python -m hf_prefix_cache_eval`` on the tiny model with ``options``; returns its results."""
    root, folder, dataset, system = setup
    ran = []
    run_evaluation_now = runner.run_evaluation
    runner.run_evaluation = lambda config: ran.append(run_evaluation_now(config)) or ran[-1]
    try:
        code = main(
            [
                "--model", str(folder), "--dataset", str(dataset), "--system-prompt-file", str(system),
                "--modes", "prefix_cache", "--max-new-tokens", "3", "--warmup-calls", "1",
                "--block-size", str(BLOCK), "--cache-blocks", "256", "--threads", "1",
                "--output-dir", str(root / "out"), "--run-name", name, "--no-progress", "--no-plots",
                *options,
            ]
        )  # fmt: skip
    finally:
        runner.run_evaluation = run_evaluation_now
    assert code == 0
    (results,) = ran
    return results


@pytest.fixture(scope="module")
def restart_run(setup):
    """A run that fills a disk tier, then replays every first turn in a fresh process over it."""
    return cli_run(setup, "restart", "--disk", str(setup[0] / "kv"), "--restart")


@pytest.fixture(scope="module")
def workers_run(setup, module_server):
    """Two worker processes through one redis-server, staggered: worker1 starts after worker0's first turn
    is on the server, so its first turn can hit the shared system prompt there."""
    return cli_run(
        setup, "workers", "--remote", module_server.url, "--remote-min-tokens", "0", "--workers", "2",
        "--worker-start", "staggered",
    )  # fmt: skip


def test_restart_turns_hit_the_disk_tier_and_match_the_baseline(restart_run):
    run = restart_run
    frame = run.frame()
    restart = frame[frame["mode"] == "restart"].set_index("step")
    first = frame[(frame["mode"] == "baseline") & (frame["turn"] == 1)].set_index("step")
    assert sorted(restart.index) == sorted(first.index) and len(restart) == 4  # every first turn, once
    assert restart["match"].all()  # the fresh process's outputs equal the no-cache baseline's
    # the earlier process stored every first prompt: all its full blocks come back (the last token is fed)
    full_blocks = (restart["prompt_tokens"] - 1) // BLOCK * BLOCK
    assert (restart["hit_tokens"] == full_blocks).all()
    assert (restart["hit_disk"] > 0).all()  # each prompt's own blocks can only come from the disk tier
    assert (restart["hit_disk"] + restart["hit_device"] == restart["hit_tokens"]).all()
    assert run.modes["restart"]["stats"]["tier_errors"] == 0
    summary = run.first_turn_frame()
    assert summary.loc["restart", "hit_rate"] > 0.5 and summary.loc["restart", "mismatches"] == 0
    assert summary.loc["prefix_cache", "hit_disk"] == 0  # the single-process run itself started cold


def test_restart_over_an_empty_folder_hits_nothing(restart_run, setup):
    """Negative control: the same replay over a folder that no run filled finds nothing."""
    root = setup[0]
    empty = root / "empty-kv"
    empty.mkdir()
    config, plan = restart_run.config, restart_run.plan
    spec = runner.subprocess_model_spec(config, passed_in=False)
    warmup = list(range(10, 30))  # shares no block with the turns: it only warms the process up
    records, _ = subruns.run_restart(config, spec, plan, warmup, disk=str(empty))
    assert len(records) == 4 and all(r.match for r in records)
    assert sum(r.hit_disk for r in records) == 0
    # later first turns still hit the system prompt in the fresh process's own device pool
    assert records[0].hit_tokens == 0


def test_workers_replay_disjoint_conversations_and_share_the_system_prompt(workers_run):
    run = workers_run
    frame = run.frame()
    workers = ["worker0", "worker1"]
    assert [m for m in run.measured_modes if m.startswith("worker")] == workers
    convs = {w: set(frame[frame["mode"] == w]["conversation"]) for w in workers}
    assert convs["worker0"].isdisjoint(convs["worker1"])
    assert convs["worker0"] | convs["worker1"] == set(frame[frame["mode"] == "baseline"]["conversation"])
    assert convs == {"worker0": {"t0", "t2"}, "worker1": {"t1", "t3"}}  # round-robin split
    for w in workers:
        assert sorted(run.modes[w]["conversations"]) == sorted(convs[w])
    steps = frame[frame["mode"].isin(workers)]["step"]
    assert sorted(steps) == sorted(frame[frame["mode"] == "baseline"]["step"])  # every turn, once
    assert frame[frame["mode"].isin(workers)]["match"].all()
    # staggered: worker1 starts once worker0's first turn is on the server, so it hits the system prompt
    first = run.modes["worker1"]["first_turn"]
    assert first["hit_tokens_by_tier"].get("remote", 0) >= BLOCK
    assert run.modes["worker0"]["first_turn"]["hit_tokens"] == 0  # nothing was on the server before it
    summary = run.first_turn_frame()
    assert summary.loc["worker1", "hit_remote"] > 0 and summary.loc["worker1", "hit_rate"] > 0
    assert summary.loc["worker0", "hit_remote"] == 0


@pytest.mark.parametrize(
    ("fixture", "modes"), [("restart_run", ["restart"]), ("workers_run", ["worker0", "worker1"])]
)
def test_report_and_results_json_carry_the_other_processes(fixture, modes, request):
    run = request.getfixturevalue(fixture)
    table = run.table()
    assert "first turn of each conversation" in table
    assert all(mode in table for mode in modes)
    payload = json.loads(run.files["json"].read_text())
    first = {row["mode"]: row for row in payload["first_turns"]}
    assert set(first) == {"baseline", "prefix_cache", *modes}
    assert {row["mode"] for row in payload["summary"]} == {"baseline", "prefix_cache", *modes}
    if fixture == "restart_run":
        assert first["restart"]["hit_disk"] > 0 and payload["config"]["restart"] is True
    else:
        assert first["worker1"]["hit_remote"] > 0 and payload["config"]["workers"] == 2
        assert payload["modes"]["worker1"]["first_turn"]["hit_tokens_by_tier"]["remote"] > 0
        assert payload["config"]["remote"].startswith("redis://127.0.0.1:")


def test_remote_alone_gives_the_single_process_mode_the_redis_tier(setup, module_server):
    """``--remote`` without ``--workers``: the prefix_cache mode stores into the server, under this run's
    own key prefix (its warm-up clear cannot touch anyone else's keys), and stays exact."""
    client = module_server.client()
    client.set(b"someone-else:key", b"kept")
    results = cli_run(setup, "remote", "--remote", module_server.url, "--remote-min-tokens", "0")
    stats = results.modes["prefix_cache"]["stats"]
    assert stats["tiers"]["remote"]["puts"] > 0 and stats["tier_errors"] == 0
    assert results.summary_frame().loc["prefix_cache", "mismatches"] == 0
    prefixes = {key.split(b":")[0] for key in client.scan_iter(match="hfpc-eval-*")}
    assert len({p for p in prefixes if not p.endswith(b"-workers")}) == 1  # this run's own prefix
    assert client.get(b"someone-else:key") == b"kept"


def test_subprocess_outputs_are_checked_against_the_baseline():
    """A replayed turn whose tokens differ from the baseline's is a mismatch (the check can fail)."""
    plan = [
        subruns.PlannedTurn(0, "a", 0, 1, [5, 6, 7], [1, 2, 3]),
        subruns.PlannedTurn(1, "b", 1, 1, [5, 8], [4]),
    ]
    out = {"turns": [
        {"step": 0, "tokens": [1, 2, 3], "ttft_s": 0.1, "e2e_s": 0.2, "hit_tokens": 0, "hit_tokens_by_tier": {}},
        {"step": 1, "tokens": [9], "ttft_s": 0.1, "e2e_s": 0.2, "hit_tokens": 0, "hit_tokens_by_tier": {}},
    ]}  # fmt: skip
    records = subruns._records("restart", plan, out)
    assert [r.match for r in records] == [True, False]


def test_redis_password_never_reaches_the_results():
    from hf_prefix_cache_eval.config import EvalConfig

    config = EvalConfig(remote="redis://user:secret@10.0.0.1:6379/0", output_dir=None)
    assert config.as_dict()["remote"] == "redis://user:***@10.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--restart"], "--restart needs --disk DIR"),
        (["--workers", "2"], "--workers needs --remote"),
        (["--disk", "x", "--restart", "--modes", "baseline"], "add prefix_cache to --modes"),
    ],
)
def test_cli_names_the_missing_option(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err
