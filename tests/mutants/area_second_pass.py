"""Mutants of the paths a block takes the second time: after clear(), after the server evicted it, on a
refresh, on a partial hit (see "Second time through" in README.md). Each wraps a stable name and calls
the original; the tests that kill them are in tests/test_second_pass.py unless named otherwise."""

from __future__ import annotations

import contextlib

from mutants.catalog import Mutant

T = "tests/test_second_pass.py::"


def disk_hit_keeps_mtime() -> None:
    """A disk hit no longer refreshes its file's mtime: the size sweep may delete the hottest entry first."""
    import os

    from hf_prefix_cache.tiers.disk import DiskTier

    read = DiskTier._read

    def without_touch(self, namespace, request):
        path = self.path(namespace, request.block_hash)
        try:
            before = path.stat()
        except OSError:
            return read(self, namespace, request)
        block = read(self, namespace, request)
        with contextlib.suppress(OSError):
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        return block

    DiskTier._read = without_touch


def disk_clear_keeps_known() -> None:
    """DiskTier.clear() keeps its set of known entries: the same blocks are never written again."""
    from hf_prefix_cache.tiers.disk import DiskTier

    clear = DiskTier.clear

    def keeping(self, namespace=None):
        known = set(self._known)
        removed = clear(self, namespace)
        self._known = known
        return removed

    DiskTier.clear = keeping


def stack_clear_host_namespace_only() -> None:
    """TierStack.clear() empties only this namespace from the host tier (README: the whole host tier)."""
    from hf_prefix_cache.tiers.stack import TierStack

    clear = TierStack.clear

    def namespaced(self, namespace):
        host = self.host
        if host is None:
            return clear(self, namespace)
        host_clear = host.clear
        host.clear = lambda _=None: host_clear(namespace)
        try:
            return clear(self, namespace)
        finally:
            del host.clear

    TierStack.clear = namespaced


def remote_min_tokens_on_request() -> None:
    """remote_min_tokens is compared with the requested length, not with what the server holds."""
    from hf_prefix_cache.tiers.remote import RemoteTier

    get = RemoteTier.get

    def on_request(self, namespace, requests):
        threshold = self.min_tokens
        if sum(len(request.tokens) for request in requests) >= threshold:
            self.min_tokens = 0
        try:
            return get(self, namespace, requests)
        finally:
            self.min_tokens = threshold

    RemoteTier.get = on_request


def remote_reput_keeps_ttl() -> None:
    """Re-putting blocks the server already holds leaves their TTL as it was (none stays none)."""
    from hf_prefix_cache.tiers.remote import RemoteTier

    write = RemoteTier._write

    def keeping_ttl(self, batch):
        keys = [self.key(namespace, block.block_hash) for namespace, block in batch]
        try:
            before = {key: self.client.pttl(key) for key in keys}
        except self._redis_errors:
            before = {}
        write(self, batch)
        for key, ttl in before.items():
            if ttl == -1:
                self.client.persist(key)
            elif ttl > 0:
                self.client.pexpire(key, ttl)

    RemoteTier._write = keeping_ttl


def remote_never_forgets_evicted() -> None:
    """A block the server evicted stays 'known' after a lookup misses it: it is never sent again."""
    from hf_prefix_cache.tiers.remote import RemoteTier

    get = RemoteTier.get

    def remembering(self, namespace, requests):
        with self._state_lock:
            known = [r.block_hash for r in requests if (namespace, r.block_hash) in self._known]
        found = get(self, namespace, requests)
        for block_hash in known:
            self._remember(namespace, block_hash)
        return found

    RemoteTier.get = remembering


def cache_clear_keeps_buffers() -> None:
    """PrefixCache.clear() keeps the per-call layer buffers (README: it frees them)."""
    from hf_prefix_cache import PrefixCache

    clear = PrefixCache.clear

    def keeping(self):
        held = [
            (layer, vars(layer).get("_key_buffer"), vars(layer).get("_value_buffer")) for layer in self.layers
        ]
        dropped = clear(self)
        for layer, keys, values in held:
            if keys is not None:
                layer._key_buffer, layer._value_buffer = keys, values
        return dropped

    PrefixCache.clear = keeping


def disk_never_forgets_deleted() -> None:
    """A disk lookup that finds an entry gone keeps believing it (and what follows) is on disk."""
    from hf_prefix_cache.tiers.disk import DiskTier

    get = DiskTier.get

    def remembering(self, namespace, requests):
        known = [(namespace, r.block_hash) for r in requests if (namespace, r.block_hash) in self._known]
        found = get(self, namespace, requests)
        self._known.update(known)
        return found

    DiskTier.get = remembering


def disk_sweep_keeps_known() -> None:
    """The size sweep deletes entries but this process still believes they are on disk."""
    from hf_prefix_cache.tiers.disk import DiskTier

    make_room = DiskTier._make_room

    def keeping(self, incoming):
        known = set(self._known)
        make_room(self, incoming)
        self._known |= known

    DiskTier._make_room = keeping


def remote_clear_keeps_known() -> None:
    """RemoteTier.clear() deletes the keys but keeps believing the server holds them."""
    from collections import OrderedDict

    from hf_prefix_cache.tiers.remote import RemoteTier

    clear = RemoteTier.clear

    def keeping(self, namespace=None):
        known = OrderedDict(self._known)
        removed = clear(self, namespace)
        self._known = known
        return removed

    RemoteTier.clear = keeping


def remote_failure_keeps_known() -> None:
    """A connection failure no longer forgets what the server held (it may come back empty)."""
    from collections import OrderedDict

    from hf_prefix_cache.tiers.remote import RemoteTier

    failed = RemoteTier._failed

    def keeping(self, error, doing):
        known = OrderedDict(self._known)
        failed(self, error, doing)
        with self._state_lock:
            self._known = known

    RemoteTier._failed = keeping


def reset_stats_keeps_tier_hits() -> None:
    """reset_stats() leaves the hits by tier counting from construction."""
    from hf_prefix_cache import PrefixCache

    reset = PrefixCache.reset_stats

    def keeping(self):
        by_tier = dict(getattr(self, "_hit_tokens_by_tier", {}))
        reset(self)
        self._hit_tokens_by_tier.update(by_tier)

    PrefixCache.reset_stats = keeping


def committed_counts_rewrites() -> None:
    """A block written a second time (after clear or eviction) is counted again in committed_bytes."""
    from hf_prefix_cache.kv_pool import KVPool

    mark = KVPool.mark_written

    def counting_again(self, block_ids):
        again = sum(1 for block_id in block_ids if self._written[block_id])
        mark(self, block_ids)
        self._num_written += again

    KVPool.mark_written = counting_again


MUTANTS: list[Mutant] = [
    Mutant(
        "disk_hit_keeps_mtime",
        "a disk hit refreshes its entry for the size sweep (LRU by mtime)",
        disk_hit_keeps_mtime,
        (T + "test_a_disk_hit_refreshes_the_entry_so_the_size_sweep_deletes_it_last",),
    ),
    Mutant(
        "disk_clear_keeps_known",
        "after clear() the disk tier writes the same blocks again",
        disk_clear_keeps_known,
        (T + "test_after_clear_the_same_prompt_is_written_to_disk_again",),
    ),
    Mutant(
        "stack_clear_host_namespace_only",
        "clear() empties the whole host tier",
        stack_clear_host_namespace_only,
        (T + "test_clear_empties_the_host_tier_of_every_namespace",),
    ),
    Mutant(
        "remote_min_tokens_on_request",
        "remote_min_tokens applies to the remote hit's length",
        remote_min_tokens_on_request,
        (T + "test_remote_min_tokens_applies_to_the_hit_not_to_the_request",),
    ),
    Mutant(
        "remote_reput_keeps_ttl",
        "re-putting a block refreshes its TTL",
        remote_reput_keeps_ttl,
        (T + "test_re_putting_blocks_refreshes_their_ttl",),
    ),
    Mutant(
        "remote_never_forgets_evicted",
        "a block the server evicted is sent again by the next store",
        remote_never_forgets_evicted,
        (T + "test_blocks_the_server_evicted_are_sent_again",),
    ),
    Mutant(
        "cache_clear_keeps_buffers",
        "PrefixCache.clear() frees the per-call layer buffers",
        cache_clear_keeps_buffers,
        (T + "test_clear_releases_the_per_call_layer_buffers",),
    ),
    Mutant(
        "disk_never_forgets_deleted",
        "blocks another process deleted from disk are written again",
        disk_never_forgets_deleted,
        (T + "test_blocks_another_process_deleted_from_disk_are_written_again",),
    ),
    Mutant(
        "disk_sweep_keeps_known",
        "entries the size sweep deleted are written again when needed",
        disk_sweep_keeps_known,
        (T + "test_entries_the_size_sweep_deleted_are_written_again",),
    ),
    Mutant(
        "remote_clear_keeps_known",
        "after RemoteTier.clear() the same blocks are sent again",
        remote_clear_keeps_known,
        (T + "test_after_a_remote_clear_the_same_blocks_are_sent_again",),
    ),
    Mutant(
        "remote_failure_keeps_known",
        "after a connection failure blocks are sent again to a restarted server",
        remote_failure_keeps_known,
        (T + "test_after_a_connection_failure_blocks_are_sent_again_to_a_restarted_server",),
    ),
    Mutant(
        "reset_stats_keeps_tier_hits",
        "reset_stats() zeroes hit_tokens_by_tier",
        reset_stats_keeps_tier_hits,
        (T + "test_reset_stats_zeroes_the_hits_by_tier",),
    ),
    Mutant(
        "committed_counts_rewrites",
        "committed_bytes counts each block once however often it is written",
        committed_counts_rewrites,
        (T + "test_storing_again_after_clear_commits_no_new_memory",),
    ),
]
