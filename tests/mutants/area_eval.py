"""Mutants of the evaluation harness (hf_prefix_cache_eval): its report files, and the restart and
worker processes whose outputs are checked against the baseline."""

from __future__ import annotations

import copy
import dataclasses

from mutants.base import mutant, replace_function

EVAL_TIERS = "tests/test_eval_tiers.py"


@mutant(
    "write_outputs_wrong_values",
    breaks="results.csv and results.json hold the measured values",
    tests=("tests/test_eval_harness.py::test_report_files_hold_the_results",),
)
def write_outputs_wrong_values() -> None:
    """results.csv/results.json say hit_tokens=0, match=False, ttft_s=9.9 (so mismatches=all turns)."""

    def make(write_outputs):
        def wrong(results, directory):
            fake = copy.copy(results)
            fake.records = [
                dataclasses.replace(r, hit_tokens=0.0, match=False, ttft_s=9.9) for r in results.records
            ]
            files = write_outputs(fake, directory)
            results.output_dir, results.files, results.plot_paths = (
                fake.output_dir,
                fake.files,
                fake.plot_paths,
            )
            return files

        return wrong

    replace_function("hf_prefix_cache_eval.report", "write_outputs", make)


@mutant(
    "restart_without_disk",
    breaks="the eval's --restart process reads the disk tier the run filled",
    tests=(
        f"{EVAL_TIERS}::test_restart_turns_hit_the_disk_tier_and_match_the_baseline",
        f"{EVAL_TIERS}::test_report_and_results_json_carry_the_other_processes[restart_run-modes0]",
    ),
)
def restart_without_disk() -> None:
    """The eval's restart process gets the run's tiers without disk=: it starts cold."""

    def make(restart_tiers):
        def without_disk(config):
            return {key: value for key, value in restart_tiers(config).items() if key != "disk"}

        return without_disk

    replace_function("hf_prefix_cache_eval.subruns", "restart_tiers", make)


@mutant(
    "workers_share_every_conversation",
    breaks="the eval's --workers split the conversations into disjoint round-robin shares",
    tests=(f"{EVAL_TIERS}::test_workers_replay_disjoint_conversations_and_share_the_system_prompt",),
)
def workers_share_every_conversation() -> None:
    """Every eval worker replays every conversation instead of its round-robin share."""

    def make(split_round_robin):
        def everything(plan, workers):
            split_round_robin(plan, workers)
            return [list(plan) for _ in range(workers)]

        return everything

    replace_function("hf_prefix_cache_eval.subruns", "split_round_robin", make)


@mutant(
    "eval_remote_alone_ignored",
    breaks="the eval's --remote alone gives the prefix_cache mode the Redis tier",
    tests=(f"{EVAL_TIERS}::test_remote_alone_gives_the_single_process_mode_the_redis_tier",),
)
def eval_remote_alone_ignored() -> None:
    """--remote without --workers leaves the eval's prefix_cache mode without the Redis tier."""

    def make(single_process_tiers):
        def without_remote(config, key_prefix):
            tiers = single_process_tiers(config, key_prefix)
            return {k: v for k, v in tiers.items() if k not in ("remote", "key_prefix", "remote_min_tokens")}

        return without_remote

    replace_function("hf_prefix_cache_eval.runner", "single_process_tiers", make)


@mutant(
    "subrun_match_always_true",
    breaks="outputs of the restart and worker processes are checked against the baseline",
    tests=(f"{EVAL_TIERS}::test_subprocess_outputs_are_checked_against_the_baseline",),
)
def subrun_match_always_true() -> None:
    """Turns replayed in other processes are never compared with the baseline's output."""

    def make(records):
        def all_match(*args, **kwargs):
            return [dataclasses.replace(r, match=True) for r in records(*args, **kwargs)]

        return all_match

    replace_function("hf_prefix_cache_eval.subruns", "_records", make)
