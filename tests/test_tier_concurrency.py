"""Lower-tier reads run outside the store's lock: a device hit of another view completes while a tier
read is in flight, and two views promoting the same chain at once end with one copy of it, exact."""

from __future__ import annotations

import threading

import torch
from support.tiers import BLOCK, LAYOUT, make_store, match, slot_values, store_tokens

from hf_prefix_cache.tiers import HostTier

TOKENS = list(range(10, 10 + 4 * BLOCK))
OTHER = list(range(500, 500 + 2 * BLOCK))
BLOCK_BYTES = sum(layout.block_bytes(BLOCK) for layout in LAYOUT)
WAIT_S = 30  # only a deadlock comes near this
DEVICE_HIT_S = 10  # a device hit of two blocks takes milliseconds; only a lock held across the read waits


class GatedHost(HostTier):
    """A host tier whose reads wait for ``gate`` after announcing themselves on ``reading``: a slow tier
    read (a disk or a Redis round trip) that the test controls."""

    def __init__(self, capacity):
        super().__init__(capacity)
        self.reading = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def get(self, namespace, requests):
        found = super().get(namespace, requests)
        self.reading.set()
        assert self.gate.wait(WAIT_S), "the test never opened the gate"
        return found


def gated_store(num_blocks: int = 8):
    store = make_store(num_blocks)
    tier = GatedHost(100 * BLOCK_BYTES)
    store.attach_tiers([tier])
    return store, tier


def spill_to_host(store, tokens):
    store_tokens(store, tokens)
    assert store.tiers.spill_device() > 0
    assert store.pool.num_cached == 0 and len(store.tiers.host) == len(tokens) // BLOCK


def in_thread(function):
    result: dict = {}

    def run():
        try:
            result["value"] = function()
        except BaseException as error:  # surfaced by the test below
            result["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_a_device_hit_completes_while_another_view_reads_a_tier():
    store, tier = gated_store()
    spill_to_host(store, TOKENS)
    store_tokens(store, OTHER, value=-1.0)  # on the device: a warm prefix of another view
    tier.gate.clear()
    slow, slow_result = in_thread(lambda: match(store, TOKENS))
    assert tier.reading.wait(WAIT_S)
    fast, fast_result = in_thread(lambda: match(store, OTHER))
    fast.join(DEVICE_HIT_S)
    finished_during_read = not fast.is_alive()
    tier.gate.set()
    slow.join(WAIT_S)
    fast.join(WAIT_S)
    assert finished_during_read, "a device hit waited for another view's tier read"
    assert "error" not in fast_result and "error" not in slow_result
    _, sources, keys = fast_result["value"]
    assert sources == ["device", "device"]
    assert torch.equal(keys, slot_values(OTHER, -1.0)[:, : 2 * BLOCK])
    _, sources, keys = slow_result["value"]
    assert sources == ["host"] * 4 and torch.equal(keys, slot_values(TOKENS, 1.0)[:, : 4 * BLOCK])
    assert store.pool.num_referenced == 0


def test_two_views_promoting_one_chain_share_one_copy():
    store, _ = gated_store()
    spill_to_host(store, TOKENS)
    copying, resume = threading.Event(), threading.Event()
    copy_in = store.tiers._copy_in

    def paused_copy(taken):  # the first copy (the first view's) stops between reserving and publishing
        copy_in(taken)
        if not copying.is_set():
            copying.set()
            assert resume.wait(WAIT_S)

    store.tiers._copy_in = paused_copy
    first, first_result = in_thread(lambda: match(store, TOKENS, keep=True))
    assert copying.wait(WAIT_S)
    second_blocks, second_sources, second_keys = match(store, TOKENS, keep=True)  # publishes first
    resume.set()
    first.join(WAIT_S)  # then the first view admits what it read and copied
    assert "error" not in first_result, first_result.get("error")
    first_blocks, first_sources, first_keys = first_result["value"]
    expected = slot_values(TOKENS, 1.0)[:, : 4 * BLOCK]
    assert second_sources == first_sources == ["host"] * 4
    assert torch.equal(first_keys, expected) and torch.equal(second_keys, expected)
    assert first_blocks == second_blocks  # the first view took the chain the second one published
    assert store.pool.num_cached == 4
    store.release(first_blocks)
    store.release(second_blocks)
    assert store.pool.num_referenced == 0
    _, sources, keys = match(store, TOKENS)
    assert sources == ["device"] * 4 and torch.equal(keys, expected)


def test_the_negative_control_a_read_under_the_lock_blocks_a_device_hit():
    """Holding the lock across the read (as before) makes the first test's device hit wait: that test can fail."""
    store, tier = gated_store()
    spill_to_host(store, TOKENS)
    store_tokens(store, OTHER, value=-1.0)
    tier.gate.clear()
    slow, _ = in_thread(lambda: (store.lock.acquire(), match(store, TOKENS), store.lock.release()))
    assert tier.reading.wait(WAIT_S)
    fast, _ = in_thread(lambda: match(store, OTHER))
    fast.join(0.5)
    waited = fast.is_alive()
    tier.gate.set()
    slow.join(WAIT_S)
    fast.join(WAIT_S)
    assert waited and not fast.is_alive()
