"""Mutants of fetch-or-recompute (issue 24): the cost model's decision, the overlapped fetch's order,
and where the chain stops when a batch fails mid-overlap."""

from __future__ import annotations

from mutants.base import mutant

T = "tests/test_fetch_or_recompute.py::"


@mutant(
    "cost_model_ignored",
    breaks="the cost model decides how much of a lower-tier hit to fetch (a slow tier is recomputed)",
    tests=(
        T + "test_a_tier_measured_slower_than_prefill_is_recomputed",
        T + "test_the_cost_model_recomputes_over_a_slow_link_and_fetches_over_a_fast_one",
    ),
)
def cost_model_ignored() -> None:
    """Every block the tiers hold is fetched, whatever the estimates say (the plan still says why)."""
    from hf_prefix_cache.cost_model import CostModel

    choose = CostModel.choose

    def fetch_all(self, device_blocks, total_tokens, segments, block_size, block_bytes, batch):
        _, plan = choose(self, device_blocks, total_tokens, segments, block_size, block_bytes, batch)
        blocks = sum(segment.blocks for segment in segments)
        plan.fetch = CostModel._per_tier(segments, blocks, block_size)
        plan.recompute_tokens = total_tokens - (device_blocks + blocks) * block_size
        return blocks, plan

    CostModel.choose = fetch_all


@mutant(
    "prefetch_batches_reordered",
    breaks="the overlapped fetch places batches in chain order",
    tests=(T + "test_an_overlapped_fetch_is_exact[disk]", T + "test_an_overlapped_fetch_is_exact[remote]"),
)
def prefetch_batches_reordered() -> None:
    """The prefetch hands the first two batches over in the wrong order."""
    from hf_prefix_cache.tiering import TierStack

    batches = TierStack._batches

    def swapped(self, digest, requests, segments):
        produced = batches(self, digest, requests, segments)
        first = next(produced, None)
        second = next(produced, None)
        for item in (second, first):
            if item is not None:
                yield item
        yield from produced

    TierStack._batches = swapped


@mutant(
    "prefetch_errors_silent",
    breaks="a read failing on the prefetch thread is counted and warned about, and ends the chain",
    tests=(
        T + "test_a_batch_failing_mid_overlap_ends_the_chain_there_without_a_leak[disk-read error]",
        T + "test_a_batch_failing_mid_overlap_ends_the_chain_there_without_a_leak[remote-read error]",
    ),
)
def prefetch_errors_silent() -> None:
    """Failures on the prefetch thread are swallowed: the chain ends, but nothing counts or warns."""
    from hf_prefix_cache.tiering import TierStack

    batches = TierStack._batches

    def silent(self, digest, requests, segments):
        for _, tier in segments:
            tier.error = lambda kind, message: None
        yield from batches(self, digest, requests, segments)

    TierStack._batches = silent


@mutant(
    "reads_always_overlapped",
    breaks="a CPU pool using every core reads its tier hits in turn with the copies, not on a second thread",
    tests=(T + "test_reads_overlap_the_placement_only_where_a_core_is_left_for_them",),
)
def reads_always_overlapped() -> None:
    """The prefetch thread runs whatever the machine: on 2 cores it fights torch's threads."""
    from hf_prefix_cache.tiering import TierStack

    TierStack.overlaps = lambda self: True


@mutant(
    "probed_block_loaded",
    breaks="a probed block is measured, not loaded: the call recomputes it",
    tests=(T + "test_a_skipped_link_is_probed_with_one_block_only_when_that_is_cheap",),
)
def probed_block_loaded() -> None:
    """The probe's block is fetched as part of the hit (a 16-token prefix, then a masked prefill)."""
    from hf_prefix_cache.cost_model import CostModel

    choose = CostModel.choose

    def with_probe(self, *args):
        blocks, plan = choose(self, *args)
        return blocks + (plan.probe is not None), plan

    CostModel.choose = with_probe


@mutant(
    "probe_not_measured",
    breaks="a probe times the skipped tier, so a link that got faster is noticed",
    tests=(T + "test_a_probe_measures_the_skipped_tier_and_the_call_recomputes_the_block",),
)
def probe_not_measured() -> None:
    """The probe reads its block but never tells the cost model how long that took."""
    from hf_prefix_cache.tiering import TierStack

    TierStack._probe = lambda self, digest, request, segments, tier_name: None
