"""Issue 24, parts 2-3: the overlapped fetch of disk and remote hits (batch k+1 is read on a prefetch
thread while batch k is placed) is exact and stops exactly at a failed batch without leaking a reference;
the cost model fetches over a fast link and recomputes over a slow one, from measured rates, and a fixed
``remote_min_tokens`` overrides it."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from support.exact import assert_same_output, greedy, run
from support.models import model_for, random_ids

from hf_prefix_cache import PrefixCache
from hf_prefix_cache.cost_model import CostModel, PrefillModel, Segment
from hf_prefix_cache.kv_pool import KVPool
from hf_prefix_cache.tiers import DiskTier

pytestmark = pytest.mark.usefixtures("quiet_single_thread")

BLOCK = 4
PREFIX = 48  # 12 blocks: 6 batches of 2 on the prefetch thread
MiB = 1 << 20


def make_cache(model, tier: str, tmp_path, server, **options) -> PrefixCache:
    if tier == "disk":
        options["disk"] = tmp_path / "kv"
    else:
        options.update(remote=server.url, remote_min_tokens=0, remote_timeout=5)
    overlap = options.pop("overlap", True)
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64, **options)
    cache.store.tiers.batch_blocks = 2
    cache.store.tiers.overlap = overlap  # whatever this machine's cores would decide
    return cache


def fill_and_spill(model, cache: PrefixCache, prompt: torch.Tensor) -> None:
    """Store ``prompt`` (written through to the tier), then empty the device pool."""
    run(model, cache, prompt, max_new_tokens=1)
    assert cache.flush(30)
    cache.store.tiers.spill_device()
    assert cache.store.pool.num_cached == 0


def the_tier(cache: PrefixCache, name: str):
    return next(tier for tier in cache.store.tiers.tiers if tier.name == name)


def stream_threads(monkeypatch, tier) -> list[str]:
    """The names of the threads ``tier.stream`` runs on from now on, filled in as it is called."""
    threads: list[str] = []
    stream = tier.stream

    def recording(namespace, requests, batch):
        threads.append(threading.current_thread().name)
        yield from stream(namespace, requests, batch)

    monkeypatch.setattr(tier, "stream", recording)
    return threads


def warm_prompt(prompt: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.cat([prompt[:, :PREFIX], random_ids(7, seed)], dim=1)


@pytest.mark.parametrize("tier", ["disk", "remote"])
def test_an_overlapped_fetch_is_exact(tier, tmp_path, server, monkeypatch):
    model = model_for("llama")
    cache = make_cache(model, tier, tmp_path, server)
    prompt = random_ids(PREFIX + 5, 1)
    fill_and_spill(model, cache, prompt)
    threads = stream_threads(monkeypatch, the_tier(cache, tier))
    ids = warm_prompt(prompt, 2)
    assert_same_output(greedy(model, ids), run(model, cache, ids))
    assert cache.last_call.hit_tokens_by_tier == {tier: PREFIX}
    assert threads == ["hf_prefix_cache-prefetch"]  # fetched on the prefetch thread, placed on this one
    assert cache.store.pool.num_referenced == 0
    # attention does not see the order of cached slots, but the chain does: promoted in order, the next
    # call hits every block on the device
    again = warm_prompt(prompt, 3)
    assert_same_output(greedy(model, again), run(model, cache, again))
    assert cache.last_call.hit_tokens_by_tier == {"device": PREFIX}

    # negative control: the same check fails when the placed K/V are not the stored ones
    cache.store.tiers.spill_device()
    write_packed = KVPool.write_packed

    def scaled(self, block_ids, blocks):
        write_packed(self, block_ids, [{name: t * 1.5 for name, t in packed.items()} for packed in blocks])

    monkeypatch.setattr(KVPool, "write_packed", scaled)
    with pytest.raises(AssertionError):
        assert_same_output(greedy(model, ids), run(model, cache, ids))


def test_reads_overlap_the_placement_only_where_a_core_is_left_for_them(tmp_path, monkeypatch):
    """On a CPU pool whose torch threads take every core, the tier's reads and the copies run in turn on
    the calling thread (a prefetch thread there stalls torch's team mid-copy); with a core to spare, or
    a pool off the CPU, they overlap. The sequential path is exact and stops where the tier does."""
    model = model_for("llama")
    cache = make_cache(model, "disk", tmp_path, None, overlap=None)
    tiers = cache.store.tiers
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert not tiers.overlaps()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert tiers.overlaps()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    tiers.overlap = True
    assert tiers.overlaps()
    tiers.overlap = None
    monkeypatch.undo()

    prompt = random_ids(PREFIX + 5, 1)
    fill_and_spill(model, cache, prompt)
    tiers.overlap = False
    threads = stream_threads(monkeypatch, the_tier(cache, "disk"))
    ids = warm_prompt(prompt, 2)
    assert_same_output(greedy(model, ids), run(model, cache, ids))
    assert cache.last_call.hit_tokens_by_tier == {"disk": PREFIX}
    assert threads == [threading.current_thread().name]  # read here, in turn with the copies
    assert cache.store.pool.num_referenced == 0


def corrupt(cache: PrefixCache, tier: str, tokens: list[int], index: int) -> None:
    """Damage the stored entry of block ``index`` of ``tokens`` in ``tier``."""
    store = cache.store.tiers
    digest = store.namespace(cache.namespace, cache.extra_keys)
    block_hash = cache.block_hashes(tokens)[index]
    target = the_tier(cache, tier)
    if tier == "disk":
        path = target.path(digest, block_hash)
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        target.client.redis.set(target.key(digest, block_hash), b"not an entry")


@pytest.mark.parametrize("fault", ["bad entry", "read error"])
@pytest.mark.parametrize("tier", ["disk", "remote"])
def test_a_batch_failing_mid_overlap_ends_the_chain_there_without_a_leak(tier, fault, tmp_path, server):
    model = model_for("llama")
    cache = make_cache(model, tier, tmp_path, server)
    prompt = random_ids(PREFIX + 5, 3)
    fill_and_spill(model, cache, prompt)
    source = the_tier(cache, tier)
    if fault == "bad entry":
        corrupt(cache, tier, prompt[0].tolist(), 5)  # the second block of the third batch
        expected_blocks = 5
    else:
        stream = source.stream

        def failing(namespace, requests, batch):
            for number, blocks in enumerate(stream(namespace, requests, batch)):
                if number == 2:
                    raise OSError("injected: the third batch's read failed")
                yield blocks

        source.stream = failing
        expected_blocks = 4
    ids = warm_prompt(prompt, 4)
    errors = cache.stats.tier_errors
    with pytest.warns(Warning):
        out = run(model, cache, ids)
    assert_same_output(greedy(model, ids), out)
    assert cache.last_call.hit_tokens_by_tier == {tier: expected_blocks * BLOCK}
    assert cache.stats.tier_errors == errors + 1
    assert cache.store.pool.num_referenced == 0
    assert cache.store.pool.num_cached >= expected_blocks  # the blocks before the failure were kept


# -- the cost model, with injected measurements ---------------------------------------------------------
BLOCK_BYTES = 720 * 1024  # one SmolLM2 block
CHAIN = 125  # 2000 tokens


def measured(prefill_s_per_token: float, link_bytes_per_s: float, rtt_s: float = 1e-3) -> CostModel:
    model = CostModel(flops_per_token=1e6, attention_flops=0.0)
    for tokens in (1000, 100):  # two sizes far apart: a rate and no fixed cost
        model.observe_prefill(0, tokens, tokens * prefill_s_per_token)
    model.observe_lookup("remote", rtt_s)
    model.observe_transfer("remote", 64 * MiB, 64 * MiB / link_bytes_per_s + rtt_s, 1)
    return model


def remote_only(blocks: int = CHAIN, min_tokens: int | None = None) -> list[Segment]:
    return [Segment("remote", 0, blocks, cost_decided=True, min_tokens=min_tokens)]


def choose(model: CostModel, segments: list[Segment], total_tokens: int = 2032):
    return model.choose(0, total_tokens, segments, 16, BLOCK_BYTES, 16)


def test_the_cost_model_recomputes_over_a_slow_link_and_fetches_over_a_fast_one():
    slow, plan = choose(measured(1e-3, 1e6), remote_only())  # 90 s to fetch, 2 s to recompute
    assert slow == 0 and plan.fetch == {} and plan.recompute_tokens == 2032
    assert (
        plan.reason.startswith("recompute") and plan.estimates["recompute"] < plan.estimates["fetch remote"]
    )
    fast, plan = choose(measured(1e-3, 1e9), remote_only())  # 0.1 s to fetch
    assert fast == CHAIN and plan.fetch == {"remote": 2000} and plan.recompute_tokens == 32
    assert plan.reason.startswith("fetch remote")


def test_a_fixed_remote_min_tokens_overrides_the_cost_model():
    slow = measured(1e-3, 1e6)
    assert choose(slow, remote_only(min_tokens=32))[0] == CHAIN  # fetched although recomputing is faster
    assert choose(slow, remote_only(blocks=1, min_tokens=32))[0] == 0  # below the threshold
    fast = measured(1e-3, 1e9)
    assert choose(fast, remote_only(blocks=1, min_tokens=32))[0] == 0
    assert choose(fast, remote_only(blocks=2, min_tokens=32))[0] == 2


def test_a_split_fetches_the_fast_tier_and_recomputes_the_rest():
    segments = [Segment("host", 0, 60, cost_decided=False), Segment("remote", 60, 65)]
    blocks, plan = choose(measured(1e-3, 1e6), segments)
    assert blocks == 60 and plan.fetch == {"host": 960} and plan.recompute_tokens == 2032 - 960
    blocks, plan = choose(measured(1e-3, 1e9), segments)
    assert blocks == CHAIN and plan.fetch == {"host": 960, "remote": 1040}


def test_a_skipped_link_is_probed_with_one_block_only_when_that_is_cheap():
    blocks, plan = choose(measured(1e-3, 30e6), remote_only())  # 3 s to fetch, 24 ms per block
    assert blocks == 0 and plan.probe == "remote" and plan.fetch == {}  # measured, not used
    blocks, plan = choose(measured(1e-3, 1e6), remote_only())  # a 0.7 s probe: not worth it
    assert blocks == 0 and plan.probe is None


def test_the_prefill_model_learns_a_fixed_cost_and_a_rate():
    model = PrefillModel(flops_per_token=1e6, attention_flops=0.0, device_type="cpu")
    assert model.seconds(0, 1000) == pytest.approx(1000 * 1e6 / 100e9)  # the CPU prior: 100 GFLOP/s
    for tokens in (10, 100, 1000, 10, 1000):
        model.observe(0, tokens, 0.005 + tokens * 1e-4)
    assert model.fixed_s == pytest.approx(0.005, rel=1e-6)
    assert model.seconds(0, 500) == pytest.approx(0.005 + 0.05, rel=1e-6)


def test_calls_of_one_size_fit_the_fixed_cost_and_keep_the_prior_rate():
    """Short forwards are bound by reading the weights: many of them must not make a long prefill look
    as slow per token as they are."""
    model = PrefillModel(flops_per_token=1e9, attention_flops=0.0, device_type="cpu", weight_bytes=2e9)
    assert model.seconds(0, 0) == pytest.approx(0.1)  # 2 GB of weights at the prior 20 GB/s
    for _ in range(20):
        model.observe(2000, 32, 0.5)  # 0.32 s of FLOPs at the prior rate: the rest is fixed cost
    assert model.per_flop_s == pytest.approx(1 / 100e9) and model.fixed_s == pytest.approx(0.18)
    assert model.seconds(0, 2032) == pytest.approx(0.18 + 20.32)  # not 2032 / 32 x 0.5 = 31.75 s
    model.observe(2016, 16, 0.45)  # a size close by, noisy: no rate from two points this close
    assert model.per_flop_s == pytest.approx(1 / 100e9)


# -- integration: a tier measured slow is recomputed -----------------------------------------------------
class SlowDisk(DiskTier):
    """A disk tier behind a slow link: every batch takes ``delay`` seconds, and the cost model decides."""

    cost_decided = True
    delay = 0.3

    def stream(self, namespace, requests, batch):
        for blocks in super().stream(namespace, requests, batch):
            time.sleep(self.delay)
            yield blocks


def test_a_tier_measured_slower_than_prefill_is_recomputed(tmp_path):
    model = model_for("llama")
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64, disk=tmp_path / "kv")
    tiers = cache.store.tiers
    slow = SlowDisk(tmp_path / "kv", cache.store.layouts)
    tiers.tiers = tiers.write_through = [slow]
    prompt = random_ids(PREFIX + 5, 5)
    run(model, cache, prompt, max_new_tokens=1)  # stored, and the prefill timed
    assert cache.flush(30)
    # a tiny model recomputes 50 tokens faster than any tier answers: measured as if it took 1 ms a token
    for tokens in (100, 1000):
        tiers.cost.observe_prefill(0, tokens, tokens * 1e-3)

    tiers.spill_device()
    first = warm_prompt(prompt, 6)
    assert_same_output(greedy(model, first), run(model, cache, first))
    assert cache.last_call.hit_tokens_by_tier == {"disk": PREFIX}  # the prior says a disk is fast
    assert cache.last_call.fetch[0]["fetch"] == {"disk": PREFIX}

    tiers.spill_device()
    second = warm_prompt(prompt, 7)
    assert_same_output(greedy(model, second), run(model, cache, second))
    plan = cache.last_call.fetch[0]
    assert cache.last_call.hit_tokens == 0 and cache.last_call.computed_tokens == second.shape[1]
    assert plan["available"] == {"disk": PREFIX} and plan["fetch"] == {}
    assert (
        plan["reason"].startswith("recompute")
        and plan["estimates"]["recompute"] < plan["estimates"]["fetch disk"]
    )
    tiers.spill_device()  # the recomputed blocks were stored on the device: explain sees the tier again
    report = cache.explain(second)
    assert report.fetch is not None and report.fetch["fetch"] == {} and "recompute" in str(report)
    assert cache.store.pool.num_referenced == 0


def test_a_probe_measures_the_skipped_tier_and_the_call_recomputes_the_block(tmp_path, monkeypatch):
    """The probed block is fetched, verified and timed, but not loaded: the call stays a from-scratch
    prefill (a short loaded prefix would need an explicit mask, ~20% slower on CPU)."""
    model = model_for("llama")
    cache = PrefixCache(model, block_size=BLOCK, num_blocks=64, disk=tmp_path / "kv")
    tiers = cache.store.tiers
    prompt = random_ids(PREFIX + 5, 8)
    fill_and_spill(model, cache, prompt)
    choose = CostModel.choose

    def recompute_and_probe(self, device_blocks, total_tokens, segments, *args):
        _, plan = choose(self, device_blocks, total_tokens, segments, *args)
        plan.fetch, plan.probe = {}, "disk"
        plan.recompute_tokens = total_tokens
        return 0, plan

    monkeypatch.setattr(CostModel, "choose", recompute_and_probe)
    disk = the_tier(cache, "disk")
    before = disk.counters.hits
    assert not tiers.cost.rate("disk").measured
    ids = warm_prompt(prompt, 9)
    assert_same_output(greedy(model, ids), run(model, cache, ids))
    assert cache.last_call.hit_tokens == 0 and cache.last_call.computed_tokens == ids.shape[1]
    assert cache.last_call.fetch[0]["probe"] == "disk" and cache.last_call.fetch[0]["fetch"] == {}
    assert disk.counters.hits == before + 1  # one block read to time the link
    assert tiers.cost.rate("disk").measured
    assert cache.store.pool.num_referenced == 0
