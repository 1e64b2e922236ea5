"""The multi-turn evaluation harness: replay order and history, metrics, report files, and the CLI.

Everything runs on a tiny random Llama with a character-level ChatML tokenizer built offline, so the
whole file takes seconds; the real SmolLM2 run is the README's command, not a test.
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from support.chat import SYSTEM, chat_model, tiny_tokenizer
from support.oracle import StoredPrefixes

from hf_prefix_cache_eval import runner
from hf_prefix_cache_eval.__main__ import main
from hf_prefix_cache_eval.config import MODE_NAMES, EvalConfig
from hf_prefix_cache_eval.data import Conversation, Turn, load_conversations
from hf_prefix_cache_eval.metrics import (
    TurnRecord,
    auto_bin_width,
    by_group,
    records_frame,
    speedup_pivot,
    summarize,
)
from hf_prefix_cache_eval.modes import MODES, greedy_config, trim_at_stop
from hf_prefix_cache_eval.replay import Replay, render_prompt
from hf_prefix_cache_eval.report import format_report
from hf_prefix_cache_eval.runner import recipe_prefix, run_evaluation

CONVERSATIONS = [
    {"id": "a", "conversations": [
        {"from": "human", "value": "What is a cache?"}, {"from": "gpt", "value": "A store of results."},
        {"from": "human", "value": "Why is it fast?"}, {"from": "gpt", "value": "No recomputation."},
        {"from": "human", "value": "Thanks!"}, {"from": "gpt", "value": "You are welcome."},
    ]},
    {"id": "b", "conversations": [
        {"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."},
        {"from": "human", "value": "Another one?"}, {"from": "gpt", "value": "Green."},
    ]},
    {"id": "c", "messages": [
        {"role": "system", "content": "Own system message."},
        {"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "1 2 3"},
    ]},
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return chat_model(len(tokenizer))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in CONVERSATIONS), encoding="utf-8")
    return path


def conversations(turns_per_conversation):
    return [
        Conversation(f"c{i}", [Turn(f"question {i}.{t}", f"answer {i}.{t}") for t in range(1, n + 1)])
        for i, n in enumerate(turns_per_conversation)
    ]


# -- replay ------------------------------------------------------------------------------------------
def test_every_mode_name_has_its_class_in_order():
    """config.py names the modes (it sits below every other module); modes.py holds one class under each."""
    assert tuple(MODES) == MODE_NAMES
    assert all(MODES[name].name == name for name in MODE_NAMES)


def test_round_robin_interleaves_conversations(tokenizer):
    replay = Replay(conversations([2, 3, 1]), tokenizer)
    order = []
    for pending in replay:
        order.append((pending.conversation_id, pending.turn))
        replay.record_reply(pending, "ok")
    assert order == [("c0", 1), ("c1", 1), ("c2", 1), ("c0", 2), ("c1", 2), ("c1", 3)]
    assert replay.total_turns == 6


def test_reply_must_be_recorded_before_the_next_turn(tokenizer):
    replay = Replay(conversations([2]), tokenizer)
    with pytest.raises(RuntimeError, match="record_reply"):
        list(replay)


@pytest.mark.parametrize("history", ["model", "dataset"])
def test_history_holds_model_or_dataset_replies(tokenizer, history):
    replay = Replay(conversations([3]), tokenizer, history=history)
    previous = None
    for pending in replay:
        if previous is not None:
            kept = "model says 1" if history == "model" else "answer 0.1"
            assert pending.messages[1] == {"role": "assistant", "content": kept}
            # each prompt extends the previous prompt: that is what a prefix cache can reuse
            assert pending.prompt_ids[: len(previous)] == previous
        replay.record_reply(pending, f"model says {pending.turn}")
        previous = pending.prompt_ids
    assert [m["role"] for m in pending.messages] == ["user", "assistant", "user", "assistant", "user"]


@pytest.mark.parametrize("history", ["model", "dataset"])
def test_longest_prompt_estimate_bounds_every_prompt(tokenizer, history):
    replay = Replay(conversations([3, 1, 2]), tokenizer, system_prompt=SYSTEM, history=history)
    estimate = replay.longest_prompt_estimate(max_reply_tokens=20)
    longest = 0
    for pending in replay:
        longest = max(longest, len(pending.prompt_ids))
        replay.record_reply(pending, "model says " + "x" * pending.turn)  # at most 14 tokens
    assert longest <= estimate <= longest + 2 * (20 + 4)
    capped = Replay(conversations([3]), tokenizer, system_prompt=SYSTEM, max_context_tokens=50)
    assert capped.longest_prompt_estimate(20) == 50


def test_dataset_history_falls_back_to_the_model_reply(tokenizer):
    turns = [Turn("q1"), Turn("q2", "recorded"), Turn("q3")]
    replay = Replay([Conversation("x", turns)], tokenizer, history="dataset")
    prompts = []
    for pending in replay:
        prompts.append(pending)
        replay.record_reply(pending, "mine")
    assert prompts[1].messages[1]["content"] == "mine"
    assert prompts[2].messages[3]["content"] == "recorded"
    assert replay.dataset_fallbacks == 2  # turns 1 and 3 had no reply


def test_system_prompt_prepended_to_every_conversation(tokenizer):
    convs = [*conversations([1, 1]), Conversation("own", [Turn("hi")], system="Own rules.")]
    replay = Replay(convs, tokenizer, system_prompt=SYSTEM)
    prefix = recipe_prefix(tokenizer, SYSTEM)
    seen = []
    for pending in replay:
        seen.append(pending.messages[0])
        replay.record_reply(pending, "ok")
    assert seen[0] == seen[1] == {"role": "system", "content": SYSTEM}
    assert seen[2] == {"role": "system", "content": SYSTEM + "\n\nOwn rules."}  # shared part first
    first = Replay(conversations([1]), tokenizer, system_prompt=SYSTEM)
    assert next(iter(first)).prompt_ids[: len(prefix)] == prefix
    plain = Replay(conversations([1]), tokenizer)
    assert next(iter(plain)).messages[0]["role"] == "user"


def test_context_limit_stops_a_conversation_but_not_the_others(tokenizer):
    convs = [
        Conversation("long", [Turn("x" * 30), Turn("y" * 200), Turn("z")]),
        Conversation("short", [Turn("a"), Turn("b"), Turn("c")]),
    ]
    first_prompt = len(render_prompt(tokenizer, [{"role": "user", "content": "x" * 30}]))
    replay = Replay(convs, tokenizer, max_context_tokens=first_prompt + 100)
    order = []
    for pending in replay:
        assert len(pending.prompt_ids) <= first_prompt + 100
        order.append((pending.conversation_id, pending.turn))
        replay.record_reply(pending, "r")
    assert order == [("long", 1), ("short", 1), ("short", 2), ("short", 3)]
    assert len(replay.stops) == 1
    stop = replay.stops[0]
    assert (stop.conversation_id, stop.turn) == ("long", 2)
    assert stop.prompt_tokens > first_prompt + 100


# -- metrics -----------------------------------------------------------------------------------------
def _record(mode, turn, prompt, hits, ttft, match=True):
    return TurnRecord(
        0, "c", turn, mode, 0, prompt, hits, prompt - hits, hits / prompt, ttft, ttft * 2, 4, match
    )


def test_summary_speedups_hit_rates_and_bins():
    records = [
        _record("baseline", 1, 1000, 0, 2.0),
        _record("baseline", 2, 1300, 0, 2.6),
        _record("prefix_cache", 1, 1000, 0, 2.0),
        _record("prefix_cache", 2, 1300, 1280, 0.26, match=False),
        _record("cont_batching", 1, 1000, math.nan, 1.0),
        _record("cont_batching", 2, 1300, math.nan, 1.3),
    ]
    frame = records_frame(records, bin_tokens=256)
    assert list(frame["context_bin"][:2]) == ["768-1023", "1280-1535"]
    modes = ["baseline", "prefix_cache", "cont_batching"]
    summary = summarize(frame, modes)
    assert summary.loc["baseline", "ttft_speedup_p50"] == pytest.approx(1.0)
    assert summary.loc["prefix_cache", "ttft_p50_s"] == pytest.approx(1.13)
    assert summary.loc["prefix_cache", "hit_rate"] == pytest.approx(1280 / 2300)
    assert summary.loc["prefix_cache", "mismatches"] == 1
    assert math.isnan(summary.loc["cont_batching", "hit_rate"])  # unknown, not zero
    by_turn = by_group(frame, "turn", modes)
    pivot = speedup_pivot(by_turn, "turn", modes)
    assert pivot.loc[2, "prefix_cache"] == pytest.approx(10.0)
    assert pivot.loc[1, "cont_batching"] == pytest.approx(2.0)
    by_context = by_group(frame, "context_bin", modes)
    assert list(dict.fromkeys(by_context["context_bin"])) == ["768-1023", "1280-1535"]


def test_automatic_bins_give_a_few_bins_whatever_the_spread():
    assert auto_bin_width([1060, 1090, 1130, 1190]) == 16  # 1060..1190 in 16-token bins: 8 bins
    assert auto_bin_width([1060, 1190, 1300]) == 16
    assert auto_bin_width(range(100, 4000, 50)) == 512
    assert auto_bin_width([]) == 256
    frame = records_frame([_record("baseline", 1, 1000, 0, 1.0), _record("baseline", 2, 3000, 0, 2.0)])
    assert list(frame["context_bin"]) == ["992-1007", "2992-3007"]


# -- a whole run on the tiny model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def results(model, tokenizer, dataset, tmp_path_factory):
    config = EvalConfig(
        model="tiny-llama",
        dataset=str(dataset),
        conversations=None,
        system_prompt=SYSTEM,
        max_new_tokens=6,
        warmup_calls=1,
        cache_memory="8MiB",
        context_bin_tokens=64,
        output_dir=tmp_path_factory.mktemp("results"),
        run_name="tiny",
        progress=False,
    )
    return run_evaluation(config, model=model, tokenizer=tokenizer)


def test_run_measures_every_mode_on_the_same_prompts(results):
    frame = results.frame()
    assert len(results.turns) == 6  # 3 + 2 + 1 turns, no limit hit
    assert set(results.modes) == set(MODE_NAMES)
    measured = results.measured_modes
    assert {"baseline", "deepcopy", "prefix_cache"} <= set(measured)
    for info in results.modes.values():  # a mode that did not run says why
        assert info["available"] or info["reason"]
    for name in measured:
        part = frame[frame["mode"] == name]
        assert list(part["prompt_tokens"]) == [t["prompt_tokens"] for t in results.turns]
    assert frame.groupby("step")["run_position"].apply(lambda s: sorted(s) == list(range(len(s)))).all()
    orders = frame.pivot(index="step", columns="mode", values="run_position")
    assert len({tuple(row) for row in orders.to_numpy()}) > 1  # the order really is shuffled


def test_run_is_exact_and_reuses_prefixes(results):
    frame = results.frame()
    summary = results.summary_frame()
    assert summary.loc["baseline", "hit_rate"] == 0
    assert summary.loc["prefix_cache", "mismatches"] == 0
    assert summary.loc["deepcopy", "mismatches"] == 0
    prefix_tokens = results.environment["recipe_prefix_tokens"]
    recipe = frame[frame["mode"] == "deepcopy"]
    # conversation "c" has its own system message after the shared one: the token check refuses the recipe
    assert (recipe[recipe["conversation"] != "c"]["hit_tokens"] == prefix_tokens).all()
    assert (recipe[recipe["conversation"] == "c"]["hit_tokens"] == 0).all()
    assert results.modes["deepcopy"]["fallbacks"] == 1
    cached = frame[frame["mode"] == "prefix_cache"].set_index("step")
    assert cached.loc[0, "hit_tokens"] == 0  # the warm-up left nothing behind
    later = cached[cached["turn"] > 1]
    assert (later["hit_tokens"] > prefix_tokens).all()  # more than the shared system prompt was reused
    assert (frame["ttft_s"] > 0).all() and (frame["e2e_s"] >= frame["ttft_s"]).all()


def test_prefix_cache_hits_every_earlier_prompt_and_reply(results, model, tokenizer, dataset):
    """Each prefix_cache turn reuses exactly the full blocks that earlier turns' prompts and replies share
    with its prompt (replayed here from the recorded replies), and computes only the rest."""
    config = results.config
    replay = Replay(load_conversations(str(dataset)), tokenizer, system_prompt=SYSTEM, history=config.history)
    generation = greedy_config(model, config.max_new_tokens)
    oracle = StoredPrefixes(config.block_size)
    cached = results.frame().query("mode == 'prefix_cache'").set_index("step")
    earlier_prompts: list[list[int]] = []
    reply_hits = 0  # turns whose hit needs an earlier reply: more than any earlier prompt alone shares
    for pending, turn in zip(replay, results.turns, strict=True):
        prompt = pending.prompt_ids
        record = cached.loc[pending.step]
        assert (record["conversation"], record["turn"]) == (turn["conversation"], turn["turn"])
        assert record["prompt_tokens"] == len(prompt) == turn["prompt_tokens"]
        assert record["hit_tokens"] == oracle.hit(prompt), f"step {pending.step}"
        assert record["computed_tokens"] == record["prompt_tokens"] - record["hit_tokens"]
        prompts_only = max((_shared_blocks(prompt, p, config.block_size) for p in earlier_prompts), default=0)
        reply_hits += record["hit_tokens"] > prompts_only
        ids = torch.tensor([prompt])
        reply = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=generation)
        reply = trim_at_stop(reply[0, len(prompt) :].tolist(), {2})
        assert tokenizer.decode(reply, skip_special_tokens=True).strip() == turn["baseline_reply"]
        oracle.store(prompt + reply[:-1])  # the last new token is never fed to the model
        earlier_prompts.append(prompt)
        replay.record_reply(pending, turn["baseline_reply"])
    assert reply_hits >= 1, "no turn reused a reply block: the check would not see replies go missing"


def _shared_blocks(prompt: list[int], earlier: list[int], block: int) -> int:
    common = next(
        (i for i, (a, b) in enumerate(zip(prompt, earlier)) if a != b), min(len(prompt), len(earlier))
    )
    return min(common, len(prompt) - 1) // block * block


def test_report_files_hold_the_results(results):
    files = results.files
    assert set(files) >= {"json", "csv", "summary", "ttft_by_turn", "ttft_vs_context", "hit_rate_by_turn"}
    payload = json.loads(files["json"].read_text())
    assert payload["config"]["dataset"].endswith("chats.jsonl")
    assert {row["mode"] for row in payload["summary"]} == set(results.measured_modes)
    assert len(payload["records"]) == len(results.records)
    assert {row["turn"] for row in payload["by_turn"]} == {1, 2, 3}
    assert payload["by_context"] and payload["turns"][0]["baseline_reply"] is not None
    csv = pd.read_csv(files["csv"])
    assert len(csv) == len(results.records)
    assert {"mode", "turn", "ttft_s", "e2e_s", "prompt_tokens", "hit_rate", "match", "context_bin"} <= set(
        csv
    )
    assert_files_hold(results, files["json"].parent)
    for name in ("summary", "ttft_by_turn", "ttft_vs_context", "hit_rate_by_turn"):
        data = results.plot_paths[name].read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    table = format_report(results)
    assert "TTFT p50" in table and "prefix_cache" in table and "by turn" in table


def assert_files_hold(results, directory) -> None:
    """results.csv and results.json hold the in-memory results, value for value (NaN written as empty/null)."""
    frame = results.frame()
    assert not frame.empty
    assert_same_table(pd.read_csv(directory / "results.csv"), frame, "results.csv")
    payload = json.loads((directory / "results.json").read_text())
    assert_same_table(pd.DataFrame(payload["records"]), frame, "results.json records")
    summary = results.summary_frame().reset_index()
    assert_same_table(pd.DataFrame(payload["summary"]), summary, "results.json summary")
    assert payload["turns"] == results.turns
    assert payload["modes"]["prefix_cache"]["stats"] == results.modes["prefix_cache"]["stats"]


def assert_same_table(read: pd.DataFrame, expected: pd.DataFrame, name: str) -> None:
    assert list(read.columns) == list(expected.columns), name
    assert len(read) == len(expected), name
    for column in expected.columns:
        want, got = expected[column].reset_index(drop=True), read[column]
        if pd.api.types.is_numeric_dtype(want) and not pd.api.types.is_bool_dtype(want):
            want, got = want.astype(float).to_numpy(), got.astype(float).to_numpy()
            assert ((want == got) | (pd.isna(want) & pd.isna(got))).all(), f"{name}: column {column} differs"
        else:
            want = [None if pd.isna(v) else v for v in want.astype(object)]
            got = [None if pd.isna(v) else v for v in got.astype(object)]
            assert [str(v) for v in got] == [str(v) for v in want], f"{name}: column {column} differs"


def test_without_system_prompt_the_recipe_says_why(model, tokenizer, dataset):
    config = EvalConfig(
        dataset=str(dataset),
        conversations=1,
        max_turns=2,
        system_prompt=None,
        max_new_tokens=3,
        warmup_calls=0,
        modes=("deepcopy", "prefix_cache"),
        cache_memory="4MiB",
        output_dir=None,
        progress=False,
    )
    results = run_evaluation(config, model=model, tokenizer=tokenizer)
    assert results.measured_modes == ["baseline", "prefix_cache"]
    assert "no shared system prompt" in results.modes["deepcopy"]["reason"]
    assert "NOT MEASURED" in results.table()


def test_a_small_store_evicts_and_stays_exact(model, tokenizer, dataset):
    config = EvalConfig(
        dataset=str(dataset),
        conversations=None,
        system_prompt=SYSTEM,
        max_new_tokens=4,
        warmup_calls=0,
        modes=("prefix_cache",),
        cache_blocks=12,  # fewer blocks than the three conversations need: forces eviction
        output_dir=None,
        progress=False,
    )
    results = run_evaluation(config, model=model, tokenizer=tokenizer)
    stats = results.modes["prefix_cache"]["stats"]
    assert stats["num_blocks"] == 12 and stats["evictions"] > 0
    assert results.summary_frame().loc["prefix_cache", "mismatches"] == 0


def test_tier_options_reach_the_cache_and_spill_stays_exact(model, tokenizer, dataset, tmp_path):
    config = EvalConfig(
        dataset=str(dataset),
        conversations=None,
        system_prompt=SYSTEM,
        max_new_tokens=4,
        warmup_calls=0,
        modes=("prefix_cache",),
        cache_blocks=12,  # evicts: the host tier takes what the pool drops
        host_memory="64MiB",
        disk=str(tmp_path / "kv"),
        output_dir=None,
        progress=False,
    )
    results = run_evaluation(config, model=model, tokenizer=tokenizer)
    stats = results.modes["prefix_cache"]["stats"]
    assert stats["evictions"] > 0 and stats["hit_tokens_by_tier"]["host"] > 0 and stats["tier_errors"] == 0
    assert results.summary_frame().loc["prefix_cache", "mismatches"] == 0
    assert list((tmp_path / "kv").rglob("*.kvb"))
    with pytest.raises(ValueError, match="disk_size needs disk"):
        EvalConfig(disk_size="1GiB")


def test_cli_end_to_end_on_a_local_model_folder(model, tokenizer, dataset, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "tiny-model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    system_file = tmp_path / "system.txt"
    system_file.write_text(SYSTEM, encoding="utf-8")
    ran = []
    run_evaluation_now = runner.run_evaluation
    monkeypatch.setattr(
        runner, "run_evaluation", lambda config: ran.append(run_evaluation_now(config)) or ran[-1]
    )
    code = main(
        [
            "--model", str(folder), "--dataset", str(dataset), "--system-prompt-file", str(system_file),
            "--max-new-tokens", "4", "--warmup-calls", "1", "--cache-blocks", "64", "--max-context-tokens", "400",
            "--output-dir", str(tmp_path / "out"), "--run-name", "cli", "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "TTFT p50" in out and "plot:" in out
    run_dir = tmp_path / "out" / "cli"
    payload = json.loads((run_dir / "results.json").read_text())
    assert payload["config"]["cache_blocks"] == 64
    assert payload["environment"]["context_limit_tokens"] == 400
    assert {"baseline", "prefix_cache"} <= {row["mode"] for row in payload["summary"]}
    assert (run_dir / "summary.png").is_file() and (run_dir / "results.csv").is_file()
    (results,) = ran
    assert results.output_dir == run_dir
    assert_files_hold(results, run_dir)
    assert results.summary_frame().loc["prefix_cache", "mismatches"] == 0


def test_cli_rejects_bad_options(capsys):
    with pytest.raises(SystemExit):
        main(["--modes", "baseline,nonsense"])
    assert "unknown mode" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--warmup-calls", "-1"])


@pytest.mark.parametrize("policy", ["lru", "retain"])
def test_pool_fraction_sizes_the_store_from_the_working_set_and_policy_reaches_the_cache(
    model, tokenizer, dataset, policy
):
    from hf_prefix_cache_eval.retention_sim import blocks_for, hashed
    from hf_prefix_cache_eval.retention_trace import round_robin

    config = EvalConfig(
        dataset=str(dataset),
        conversations=None,
        system_prompt=SYSTEM,
        max_new_tokens=4,
        warmup_calls=0,
        modes=("prefix_cache",),
        pool_fraction=0.25,
        policy=policy,
        output_dir=None,
        progress=False,
    )
    results = run_evaluation(config, model=model, tokenizer=tokenizer)
    stats = results.modes["prefix_cache"]["stats"]
    trace = hashed(round_robin(load_conversations(str(dataset)), tokenizer, system_prompt=SYSTEM), 16)
    assert stats["num_blocks"] == blocks_for(trace, 0.25) and stats["policy"] == policy
    assert stats["evictions"] > 0 and results.summary_frame().loc["prefix_cache", "mismatches"] == 0
    with pytest.raises(ValueError, match="not both"):
        EvalConfig(pool_fraction=0.25, cache_blocks=12)
    with pytest.raises(ValueError, match="pool_fraction"):
        EvalConfig(pool_fraction=1.5)
