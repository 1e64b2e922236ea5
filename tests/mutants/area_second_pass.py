"""Mutants of the paths a block takes the second time: after clear(), after the server evicted it, on a
refresh, on a partial hit (see "Second time through" in README.md). Each wraps a stable name and calls
the original; the tests that kill them are in tests/test_second_pass.py unless named otherwise."""

from __future__ import annotations

import contextlib

from mutants.base import mutant

T = "tests/test_second_pass.py::"


@mutant(
    "disk_hit_keeps_mtime",
    breaks="a disk hit refreshes its entry for the size sweep (LRU by mtime)",
    tests=(T + "test_a_disk_hit_refreshes_the_entry_so_the_size_sweep_deletes_it_last",),
)
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


@mutant(
    "disk_clear_keeps_known",
    breaks="after clear() the disk tier writes the same blocks again",
    tests=(T + "test_after_clear_the_same_prompt_is_written_to_disk_again",),
)
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


@mutant(
    "stack_clear_host_namespace_only",
    breaks="clear() empties the whole host tier",
    tests=(T + "test_clear_empties_the_host_tier_of_every_namespace",),
)
def stack_clear_host_namespace_only() -> None:
    """TierStack.clear() empties only this namespace from the host tier (README: the whole host tier)."""
    from hf_prefix_cache.tiering import TierStack

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


@mutant(
    "remote_min_tokens_on_request",
    breaks="remote_min_tokens applies to the remote hit's length",
    tests=(T + "test_remote_min_tokens_applies_to_the_hit_not_to_the_request",),
)
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


@mutant(
    "remote_reput_keeps_ttl",
    breaks="re-putting a block refreshes its TTL",
    tests=(T + "test_re_putting_blocks_refreshes_their_ttl",),
)
def remote_reput_keeps_ttl() -> None:
    """Re-putting blocks the server already holds leaves their TTL as it was (none stays none)."""
    from hf_prefix_cache.tiers.remote import RemoteTier

    write = RemoteTier._write

    def keeping_ttl(self, batch):
        keys = [self.key(namespace, block.block_hash) for namespace, block in batch]
        try:
            before = {key: self.client.redis.pttl(key) for key in keys}  # one server's redis.Redis
        except self._redis_errors:
            before = {}
        write(self, batch)
        for key, ttl in before.items():
            if ttl == -1:
                self.client.redis.persist(key)
            elif ttl > 0:
                self.client.redis.pexpire(key, ttl)

    RemoteTier._write = keeping_ttl


@mutant(
    "remote_never_forgets_evicted",
    breaks="a block the server evicted is sent again by the next store",
    tests=(T + "test_blocks_the_server_evicted_are_sent_again",),
)
def remote_never_forgets_evicted() -> None:
    """A block the server evicted stays 'known' after a lookup misses it: it is never sent again."""
    from hf_prefix_cache.tiers.remote import RemoteTier

    lookup = RemoteTier.lookup  # the lookup step of a streamed fetch (and of get)

    def remembering(self, namespace, requests):
        with self._state_lock:
            known = [r.block_hash for r in requests if (namespace, r.block_hash) in self._known]
        found = lookup(self, namespace, requests)
        for block_hash in known:
            self._remember(namespace, block_hash)
        return found

    RemoteTier.lookup = remembering


@mutant(
    "cache_clear_keeps_buffers",
    breaks="PrefixCache.clear() frees the per-call layer buffers",
    tests=(T + "test_clear_releases_the_per_call_layer_buffers",),
)
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


@mutant(
    "disk_never_forgets_deleted",
    breaks="blocks another process deleted from disk are written again",
    tests=(T + "test_blocks_another_process_deleted_from_disk_are_written_again",),
)
def disk_never_forgets_deleted() -> None:
    """A disk lookup that finds an entry gone keeps believing it (and what follows) is on disk."""
    from hf_prefix_cache.tiers.disk import DiskTier

    stream = DiskTier.stream  # what a store's lookup reads through (get too)

    def remembering(self, namespace, requests, batch):
        known = [(namespace, r.block_hash) for r in requests if (namespace, r.block_hash) in self._known]
        try:
            yield from stream(self, namespace, requests, batch)
        finally:
            self._known.update(known)

    DiskTier.stream = remembering


@mutant(
    "disk_sweep_keeps_known",
    breaks="entries the size sweep deleted are written again when needed",
    tests=(T + "test_entries_the_size_sweep_deleted_are_written_again",),
)
def disk_sweep_keeps_known() -> None:
    """The size sweep deletes entries but this process still believes they are on disk."""
    from hf_prefix_cache.tiers.disk import DiskTier

    make_room = DiskTier._make_room

    def keeping(self, incoming):
        known = set(self._known)
        make_room(self, incoming)
        self._known |= known

    DiskTier._make_room = keeping


@mutant(
    "remote_clear_keeps_known",
    breaks="after RemoteTier.clear() the same blocks are sent again",
    tests=(T + "test_after_a_remote_clear_the_same_blocks_are_sent_again",),
)
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


@mutant(
    "remote_failure_keeps_known",
    breaks="after a connection failure blocks are sent again to a restarted server",
    tests=(T + "test_after_a_connection_failure_blocks_are_sent_again_to_a_restarted_server",),
)
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


@mutant(
    "reset_stats_keeps_tier_hits",
    breaks="reset_stats() zeroes hit_tokens_by_tier",
    tests=(T + "test_reset_stats_zeroes_the_hits_by_tier",),
)
def reset_stats_keeps_tier_hits() -> None:
    """reset_stats() leaves the hits by tier counting from construction."""
    from hf_prefix_cache.stats import Counters

    reset = Counters.reset

    def keeping(self, *args, **kwargs):
        by_tier = dict(getattr(self, "hit_tokens_by_tier", {}))
        reset(self, *args, **kwargs)
        self.hit_tokens_by_tier.update(by_tier)

    Counters.reset = keeping


@mutant(
    "committed_counts_rewrites",
    breaks="committed_bytes counts each block once however often it is written",
    tests=(T + "test_storing_again_after_clear_commits_no_new_memory",),
)
def committed_counts_rewrites() -> None:
    """A block written a second time (after clear or eviction) is counted again in committed_bytes."""
    from hf_prefix_cache.kv_pool import KVPool

    mark = KVPool.mark_written

    def counting_again(self, block_ids):
        again = sum(1 for block_id in block_ids if self._written[block_id])
        mark(self, block_ids)
        self._num_written += again

    KVPool.mark_written = counting_again


@mutant(
    "promoted_root_keys",
    breaks="a block promoted from a lower tier is a device hit the next time",
    tests=(T + "test_a_promoted_block_is_a_device_hit_the_next_time",),
)
def promoted_root_keys() -> None:
    """Blocks promoted from a lower tier are cached under a key that forgets their parent block."""
    from hf_prefix_cache.tiering import TierStack

    place = TierStack._place

    def forgetting_parents(self, namespace, digest, chain, found, extra_keys, sources, *reserved):
        promoted = place(self, namespace, digest, chain, found, extra_keys, sources, *reserved)
        for block in promoted:
            block.key = (("root", namespace), block.key[1], block.key[2])
        return promoted

    TierStack._place = forgetting_parents


@mutant(
    "promoted_no_origin",
    breaks="a promoted block evicted again is written back to host",
    tests=(T + "test_a_promoted_block_evicted_again_is_written_back_to_host",),
)
def promoted_no_origin() -> None:
    """A block promoted from a lower tier is not written back to host when the pool evicts it again."""
    from hf_prefix_cache.tiering import TierStack

    place = TierStack._place

    def without_origin(self, namespace, digest, chain, found, extra_keys, sources, *reserved):
        promoted = place(self, namespace, digest, chain, found, extra_keys, sources, *reserved)
        for block in promoted:
            self._origins.pop(block.block_id, None)
        return promoted

    TierStack._place = without_origin


@mutant(
    "publish_without_extra_keys",
    breaks="blocks of a view with extra keys hit on disk",
    tests=(T + "test_extra_keys_reach_the_disk_under_their_own_namespace",),
)
def publish_without_extra_keys() -> None:
    """Write-through files blocks under the tier namespace without the view's extra keys."""
    from hf_prefix_cache.tiering import TierStack

    publish = TierStack._publish

    def without(self, namespace, tokens, hashes, positions, blocks, extra_keys):
        return publish(self, namespace, tokens, hashes, positions, blocks, ())

    TierStack._publish = without


@mutant(
    "disk_subfolder_exists_fails",
    breaks="a second entry in an existing subfolder is written",
    tests=(T + "test_a_second_entry_in_the_same_subfolder_is_written",),
)
def disk_subfolder_exists_fails() -> None:
    """Writing an entry fails when its two-character subfolder already exists (mkdir without exist_ok)."""
    from hf_prefix_cache.tiers.disk import DiskTier

    write = DiskTier._write

    def failing(self, namespace, block):
        path = self.path(namespace, block.block_hash)
        if path.parent.exists() and not path.exists():
            self.error("write", f"cannot write {path} (FileExistsError)")
            return None
        return write(self, namespace, block)

    DiskTier._write = failing


@mutant(
    "disk_sweep_by_path",
    breaks="the size sweep deletes least recently used entries first",
    tests=(T + "test_a_disk_hit_refreshes_the_entry_so_the_size_sweep_deletes_it_last",),
)
def disk_sweep_by_path() -> None:
    """The size sweep deletes entries in path (hash) order instead of least recently used first."""
    from hf_prefix_cache.tiers.disk import DiskTier

    scan = DiskTier._scan

    def by_path(self):
        entries = sorted(scan(self))
        return [(path, size, float(order)) for order, (path, size, _) in enumerate(entries)]

    DiskTier._scan = by_path


@mutant(
    "remote_clear_every_namespace",
    breaks="RemoteTier.clear(namespace) keeps the other namespaces",
    tests=(T + "test_a_remote_clear_of_one_namespace_keeps_the_others",),
)
def remote_clear_every_namespace() -> None:
    """RemoteTier.clear(namespace) deletes every namespace of its key prefix."""
    from hf_prefix_cache.tiers.remote import RemoteTier

    clear = RemoteTier.clear

    def everything(self, namespace=None):
        return clear(self, None)

    RemoteTier.clear = everything


@mutant(
    "stack_flush_ignores_timeout",
    breaks="cache.flush(timeout) returns False when the timeout runs out",
    tests=(T + "test_flush_reports_done_with_a_host_tier_and_keeps_its_timeout",),
)
def stack_flush_ignores_timeout() -> None:
    """TierStack.flush(timeout) waits without a limit for the tiers' writers."""
    from hf_prefix_cache.tiering import TierStack

    flush = TierStack.flush

    def unbounded(self, timeout=None):
        return flush(self, None)

    TierStack.flush = unbounded


@mutant(
    "tier_flush_false",
    breaks="flush() reports done on a stack with a host tier",
    tests=(T + "test_flush_reports_done_with_a_host_tier_and_keeps_its_timeout",),
)
def tier_flush_false() -> None:
    """Tiers without a writer (host) report that a flush timed out."""
    from hf_prefix_cache.tiers.base import Tier

    flush = Tier.flush

    def never_done(self, timeout=None):
        flush(self, timeout)
        return False

    Tier.flush = never_done


@mutant(
    "host_counters_overwritten",
    breaks="the host tier's counters accumulate",
    tests=(T + "test_host_counters_accumulate_across_calls",),
)
def host_counters_overwritten() -> None:
    """The host tier's hit counter holds the last lookup's hits instead of the total."""
    from hf_prefix_cache.tiers.host import HostTier

    get = HostTier.get

    def last_only(self, namespace, requests):
        found = get(self, namespace, requests)
        self.counters.hits = len(found)
        return found

    HostTier.get = last_only


@mutant(
    "fetch_gives_up_when_host_has_all",
    breaks="a chain the host holds whole is served with disk below",
    tests=(T + "test_a_chain_the_host_holds_whole_is_served_with_disk_below",),
)
def fetch_gives_up_when_host_has_all() -> None:
    """A chain the first tier holds whole ends the lookup with nothing (the loop returns instead of stopping)."""
    from hf_prefix_cache.tiering import TierStack

    plan = TierStack._plan

    def giving_up(self, digest, requests):
        segments = plan(self, digest, requests)
        first = self.tiers[0].name
        whole = len(segments) == 1 and segments[0][0].blocks == len(requests)
        if len(self.tiers) > 1 and whole and segments[0][0].tier == first:
            return []
        return segments

    TierStack._plan = giving_up


@mutant(
    "promotion_cut_short_leaks",
    breaks="a promotion cut short by a full pool leaves no reference",
    tests=(T + "test_a_promotion_cut_short_by_a_full_pool_leaves_no_reference",),
)
def promotion_cut_short_leaks() -> None:
    """A promotion cut short by a full pool keeps a reference to the blocks it took."""
    from hf_prefix_cache.tiering import TierStack

    reserve_for = TierStack._reserve_for

    def leaking(self, requests):
        taken = reserve_for(self, requests)
        if taken and len(taken) < len(requests):
            self.store.pool.touch(taken[0])
        return taken

    TierStack._reserve_for = leaking


@mutant(
    "evicting_needs_a_host",
    breaks="evictions work without a host tier",
    tests=(T + "test_evictions_without_a_host_tier_and_of_blocks_stored_before_the_tiers",),
)
def evicting_needs_a_host() -> None:
    """The write-back hook fails on a stack without a host tier (``and`` for ``or`` in its guard)."""
    from hf_prefix_cache.tiering import TierStack

    evicting = TierStack.evicting

    def failing(self, block):
        if self.host is None and self._origins.get(block.block_id) is not None:
            raise AttributeError("'NoneType' object has no attribute 'has'")
        return evicting(self, block)

    TierStack.evicting = failing


@mutant(
    "remote_fetch_one_batch",
    breaks="a long remote chain is fetched in several MGET batches",
    tests=(T + "test_a_long_remote_chain_is_fetched_in_several_batches",),
)
def remote_fetch_one_batch() -> None:
    """A remote lookup fetches only the first MGET batch of a long chain."""
    from hf_prefix_cache.tiers import remote
    from hf_prefix_cache.tiers.remote import RemoteTier

    get = RemoteTier.get

    def one_batch(self, namespace, requests):
        return get(self, namespace, requests[: remote.FETCH_BATCH])

    RemoteTier.get = one_batch


@mutant(
    "remote_fetch_keeps_known",
    breaks="a block gone or bad at MGET time is sent again by the next store",
    tests=(
        T + "test_a_bad_value_deleted_on_read_is_sent_again_by_the_next_store",
        T + "test_a_block_evicted_between_the_lookup_and_the_fetch_is_forgotten",
    ),
)
def remote_fetch_keeps_known() -> None:
    """A block gone or bad at MGET time (after the EXISTS) stays 'known': the next store skips it."""
    from hf_prefix_cache.tiers.remote import RemoteTier

    fetch = RemoteTier._fetch

    def remembering(self, namespace, requests):
        with self._state_lock:
            known = [r.block_hash for r in requests if (namespace, r.block_hash) in self._known]
        blocks = fetch(self, namespace, requests)
        for block_hash in known:
            self._remember(namespace, block_hash)
        return blocks

    RemoteTier._fetch = remembering


@mutant(
    "remote_write_stops_at_existing",
    breaks="the writer sends every new block of a batch",
    tests=(T + "test_a_batch_whose_first_block_the_server_holds_sends_the_rest",),
)
def remote_write_stops_at_existing() -> None:
    """The writer stops a batch at the first block the server holds (break for continue)."""
    from hf_prefix_cache.tiers.remote import RemoteTier

    write = RemoteTier._write

    def stopping(self, batch):
        keys = [self.key(namespace, block.block_hash) for namespace, block in batch]
        try:
            present = self.client.exists(keys)
        except self._redis_errors:
            return write(self, batch)
        cut = present.index(True) + 1 if any(present) else len(batch)
        write(self, batch[:cut])
        for namespace, block in batch[cut:]:
            self._remember(namespace, block.block_hash)

    RemoteTier._write = stopping


@mutant(
    "remote_server_error_raises",
    breaks="a full server is a counted 'server' error, reads go on",
    tests=(T + "test_a_full_server_is_a_counted_server_error_and_reads_go_on",),
)
def remote_server_error_raises() -> None:
    """A server error that is not a lost connection (OOM, AUTH) raises inside the tier."""
    from hf_prefix_cache.tiers.remote import RemoteTier

    failed = RemoteTier._failed

    def raising(self, error, doing):
        if not isinstance(error, self._connection_errors):
            raise TypeError("error() missing 1 required positional argument: 'message'")
        return failed(self, error, doing)

    RemoteTier._failed = raising


@mutant(
    "remote_backoff_never_resets",
    breaks="the back-off starts again after a recovery",
    tests=(T + "test_the_back_off_starts_again_after_a_recovery",),
)
def remote_backoff_never_resets() -> None:
    """A success after a failure keeps the grown back-off (the next failure waits longer)."""
    from hf_prefix_cache.tiers.remote import RemoteTier

    RemoteTier._succeeded = lambda self: None


@mutant(
    "remote_writer_errors_uncounted",
    breaks="an unexpected remote writer failure is counted, and the next put goes through",
    tests=(T + "test_an_unexpected_writer_failure_is_counted_and_the_next_put_goes_through",),
)
def remote_writer_errors_uncounted() -> None:
    """A failure the remote writer did not expect is neither counted nor warned about."""
    from hf_prefix_cache.tiers.remote import RemoteTier

    error = RemoteTier.error

    def silent(self, kind, message):
        if kind != "writer":
            error(self, kind, message)

    RemoteTier.error = silent


@mutant(
    "store_rewrites_identical",
    breaks="storing a prefix again writes only its new blocks",
    tests=(T + "test_storing_a_prefix_again_writes_only_its_new_blocks",),
)
def store_rewrites_identical() -> None:
    """Storing a prefix again does not find its stored blocks: every block is written anew."""
    from hf_prefix_cache.store import BlockStore

    extend = BlockStore._extend

    def rewriting(self, namespace, tokens, hashes, chain, write, extra_keys):
        self.pool.lookup = lambda block_hash, key: None
        try:
            return extend(self, namespace, tokens, hashes, chain, write, extra_keys)
        finally:
            del self.pool.lookup

    BlockStore._extend = rewriting


@mutant(
    "store_leaks_on_interrupt",
    breaks="an interrupt during a tier lookup leaves no reference",
    tests=(T + "test_an_interrupt_during_a_tier_lookup_leaves_no_reference",),
)
def store_leaks_on_interrupt() -> None:
    """An exception during a lookup (Ctrl-C in a tier) leaves the chain's references taken."""
    from hf_prefix_cache.store import BlockStore

    match = BlockStore.match

    def leaking(self, *args, **kwargs):
        self.pool.release = lambda blocks: None  # match() releases only when something raised
        try:
            return match(self, *args, **kwargs)
        finally:
            del self.pool.release

    BlockStore.match = leaking
