"""Mutants of the shared tiers' trust and robustness: entry MACs (``tier_secret``), fork safety of the
background writers, bounded verification, and the input checks of host_memory/disk_size and of a PEFT
cache after merging."""

from __future__ import annotations

from mutants.base import mutant, replace_function

TRUST = "tests/test_tier_trust.py"
BOUNDS = "tests/test_tier_bounds.py"
MISUSE = "tests/test_misuse_tiers.py"


@mutant(
    "mac_not_verified",
    breaks="with a tier_secret, disk and Redis entries without a valid MAC are misses (forged K/V never served)",
    tests=(
        f"{TRUST}::test_a_forged_disk_entry_is_a_counted_miss_with_a_secret_and_tagged_entries_hit_exactly",
        f"{TRUST}::test_a_forged_redis_value_is_a_counted_miss_and_deleted_and_tagged_values_hit_exactly",
        f"{TRUST}::test_an_entry_of_another_secret_or_none_is_a_counted_miss_and_deleted_on_disk"
        "[unkeyed-entry-read-with-secret]",
        f"{TRUST}::test_a_forged_value_on_redis_is_a_miss_for_a_reader_with_the_secret[recomputed-checksum]",
    ),
)
def mac_not_verified() -> None:
    """An entry without a valid MAC is accepted by a reader with a secret (read as an unkeyed entry)."""
    from hf_prefix_cache.tiers.entry import EntryError

    def make(decode):
        def unverified(data, namespace, request, layouts, key=None):
            try:
                return decode(data, namespace, request, layouts, key)
            except EntryError as error:
                if error.kind != "mac":
                    raise
                return decode(data, namespace, request, layouts, None)

        return unverified

    replace_function("hf_prefix_cache.tiers.entry", "decode", make)


@mutant(
    "fork_not_reset",
    breaks="a forked child's writers start empty: its flush() returns and its exit does not wait for the parent",
    tests=(
        "tests/test_tier_fork.py::test_a_forked_child_flushes_and_exits_while_the_parents_writer_holds_an_item",
    ),
)
def fork_not_reset() -> None:
    """A forked child keeps the parent's count of unfinished writes (its flush and exit wait for them)."""
    from hf_prefix_cache.tiers.writer import BackgroundWriter

    BackgroundWriter._reset_after_fork = lambda self: None


@mutant(
    "child_exit_flush_off",
    breaks="a multiprocessing child (a DataLoader worker) lands its own queued writes at exit, without flush()",
    tests=(
        "tests/test_tier_fork.py::"
        "test_a_multiprocessing_fork_child_exits_promptly_and_its_own_writes_land_without_a_flush",
    ),
)
def child_exit_flush_off() -> None:
    """A multiprocessing child's queued writes are lost at its exit (os._exit skips atexit)."""
    replace_function(
        "hf_prefix_cache.tiers.writer", "_flush_at_process_exit", lambda original: lambda obj: None
    )


@mutant(
    "size_not_checked_before_checksum",
    breaks="an entry of the wrong size is refused before any checksum work (a huge sparse file costs a stat)",
    tests=(
        f"{BOUNDS}::test_a_huge_sparse_entry_file_is_rejected_from_its_size_without_checksum_work[checksum]",
        f"{BOUNDS}::test_a_huge_sparse_entry_file_is_rejected_from_its_size_without_checksum_work[mac]",
        f"{BOUNDS}::test_decode_rejects_a_huge_consistent_entry_before_any_checksum_work",
        f"{BOUNDS}::test_a_big_consistent_value_on_redis_is_rejected_without_checksum_work",
    ),
)
def size_not_checked_before_checksum() -> None:
    """Entries of any size are checksummed (a huge or sparse file is read whole before it is refused)."""
    replace_function(
        "hf_prefix_cache.tiers.entry", "size_bounds", lambda original: lambda n_tokens, layouts: (0, 1 << 62)
    )
    replace_function(
        "hf_prefix_cache.tiers.entry",
        "_check_size",
        lambda original: lambda view, payload_at, payload_len, n_tokens, layouts: None,
    )


@mutant(
    "host_memory_not_validated",
    breaks="host_memory larger than the available RAM is refused with the fix",
    tests=(f"{MISUSE}::test_a_host_tier_larger_than_the_available_ram_is_refused",),
)
def host_memory_not_validated() -> None:
    """host_memory is taken as given, however much more than the machine's RAM it is."""
    replace_function(
        "hf_prefix_cache.tiers.host", "check_host_memory", lambda original: lambda host_memory: None
    )


@mutant(
    "disk_size_not_validated",
    breaks="disk_size larger than the folder's filesystem can hold is refused with the fix",
    tests=(f"{MISUSE}::test_a_disk_size_larger_than_the_filesystem_can_hold_is_refused",),
)
def disk_size_not_validated() -> None:
    """disk_size is taken as given, however much more than the filesystem can hold it is."""
    replace_function(
        "hf_prefix_cache.tiers.disk", "check_disk_size", lambda original: lambda disk, disk_size: None
    )


@mutant(
    "merged_peft_blames_uninstall",
    breaks="generate() on a merged PEFT model with the old cache names PrefixCache(merged, store=cache.store)",
    tests=(f"{MISUSE}::test_generate_on_a_merged_peft_model_with_the_old_cache_names_the_fix",),
)
def merged_peft_blames_uninstall() -> None:
    """generate() on a merged PEFT model with the old cache gets the generic 'uninstall' message."""
    from hf_prefix_cache.reasons import UNPREPARED

    replace_function("hf_prefix_cache.call", "unprepared", lambda original: lambda model: UNPREPARED)
