"""Mutants of the lower tiers (issues 9 and 10): entry checksums and payload checks, write-back to the
host tier, whole disk entries, the bounded write queue and exit flush, and the remote tier's keys."""

from __future__ import annotations

from mutants.base import mutant, replace_function


@mutant(
    "entry_checksum_blind",
    breaks="tier entries are verified by their checksum",
    tests=(
        "tests/test_tier_entry.py::test_damaged_bytes_are_rejected[flip_payload-checksum]",
        "tests/test_tier_entry.py::test_damaged_bytes_are_rejected[flip_token-checksum]",
    ),
)
def entry_checksum_blind() -> None:
    """Entries carry a constant checksum: damaged payloads decode."""
    replace_function(
        "hf_prefix_cache.tiers.entry", "_checksum", lambda original: lambda parts: bytes(range(16))
    )


@mutant(
    "host_write_back_off",
    breaks="device evictions are written back to the host tier",
    tests=("tests/test_tier_store.py::test_device_evictions_are_written_back_to_host_and_promoted_exactly",),
)
def host_write_back_off() -> None:
    """Blocks the device pool evicts are lost instead of kept in the host tier."""
    from hf_prefix_cache.tiering import TierStack

    TierStack.evicting = lambda self, block: None


@mutant(
    "disk_writes_in_place",
    breaks="disk entries appear whole (temp file, then os.replace)",
    tests=("tests/test_tier_store.py::test_write_failures_are_counted_and_leave_no_entry[28-disk full]",),
)
def disk_writes_in_place() -> None:
    """The disk tier writes each entry straight to its final path (no temp file, no os.replace)."""
    import errno

    from hf_prefix_cache.tiers import disk

    def in_place(self, namespace, block):
        path = self.path(namespace, block.block_hash)
        data = disk.encode(namespace, block)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            disk.write_file(path, data, self.fsync)
        except OSError as error:
            self.error("disk full" if error.errno == errno.ENOSPC else "read-only", str(error))
            return
        self._known.add((namespace, block.block_hash))
        self.count(puts=1, bytes_written=len(data))

    disk.DiskTier._write = in_place


@mutant(
    "write_queue_unbounded",
    breaks="tier writes are dropped and counted when the queue is full, never queued without bound",
    tests=(
        "tests/test_tier_store.py::test_a_full_write_queue_drops_and_counts_without_blocking",
        "tests/test_tier_remote_store.py::test_a_full_write_queue_drops_and_counts_instead_of_waiting",
    ),
)
def write_queue_unbounded() -> None:
    """The background writer queues everything: a slow disk or server grows memory without bound."""
    from hf_prefix_cache.tiers.writer import BackgroundWriter

    BackgroundWriter.max_items = property(lambda self: 1 << 60, lambda self, value: None)


@mutant(
    "exit_flush_off",
    breaks="interpreter exit lands the tier writes still queued",
    tests=("tests/test_tier_processes.py::test_interpreter_exit_lands_the_writes_still_queued",),
)
def exit_flush_off() -> None:
    """Interpreter exit does not flush: writes still queued die with the daemon writer thread."""
    import atexit

    from hf_prefix_cache.tiers import writer

    atexit.unregister(writer._flush_at_exit)


@mutant(
    "exit_flush_unbounded",
    breaks="the exit flush waits EXIT_FLUSH_S at most, so a hung disk never hangs the interpreter's exit",
    tests=("tests/test_tier_processes.py::test_the_exit_flush_gives_up_after_its_bound_when_the_disk_hangs",),
)
def exit_flush_unbounded() -> None:
    """Interpreter exit waits for every queued write, however long a hung disk takes."""
    import atexit

    from hf_prefix_cache.tiers import writer

    atexit.unregister(writer._flush_at_exit)
    atexit.register(lambda: [live.flush(None) for live in list(writer._LIVE)])


@mutant(
    "entry_payload_unchecked",
    breaks="an entry's payload tensors must be exactly those of the layer table",
    tests=(
        "tests/test_tier_entry.py::test_a_payload_of_other_tensors_is_rejected_even_with_a_valid_checksum",
    ),
)
def entry_payload_unchecked() -> None:
    """decode() serves whatever tensors the payload names, without comparing them to the layer table."""
    from hf_prefix_cache.tiers import entry

    entry._check_payload = lambda packed, layouts, n_tokens: None


@mutant(
    "entry_decode_copies",
    breaks="decode() returns views of the entry bytes, so a read copies the K/V once (into the pool)",
    tests=("tests/test_tier_entry.py::test_decoded_kv_are_views_of_the_entry_bytes_not_copies",),
)
def entry_decode_copies() -> None:
    """decode() copies every tensor out of the entry (a second pass over the bytes of every read)."""
    from hf_prefix_cache.tiers import entry

    read_payload = entry._read_payload
    entry._read_payload = lambda *args: {k: v.clone() for k, v in read_payload(*args).items()}


@mutant(
    "remote_bad_values_kept",
    breaks="a bad value on the server is a miss and its key is deleted",
    tests=(
        "tests/test_tier_remote_store.py::test_a_bad_value_under_a_real_key_is_a_miss_and_the_key_is_deleted[garbage]",
    ),
)
def remote_bad_values_kept() -> None:
    """A value that fails verification stays on the server."""
    from hf_prefix_cache.tiers.remote import RemoteTier

    RemoteTier._delete_key = lambda self, key: None


@mutant(
    "remote_key_ignores_prefix",
    breaks="key_prefix keeps deployments apart on one server",
    tests=(
        "tests/test_tier_remote_store.py::test_key_prefix_and_namespace_keep_deployments_apart_and_clear_removes_only_its_own",
    ),
)
def remote_key_ignores_prefix() -> None:
    """Deployments with different key_prefix share keys."""
    from hf_prefix_cache.tiers.remote import RemoteTier

    RemoteTier.key = lambda self, namespace, block_hash: f"{namespace.hex()}:{block_hash.hex()}"
