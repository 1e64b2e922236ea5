"""Mutants of the block store and its K/V pool: matching the longest chain, writing K/V into their own
slots, references released exactly once, eviction order, memory committed on demand, and copies that
finish before an interrupt returns."""

from __future__ import annotations

import torch

from mutants.base import mutant, replace_function

CORE = "tests/test_core_exactness.py"
BATCHES = "tests/test_batches_strategies.py"


@mutant(
    "match_capped_at_one_block",
    breaks="the longest stored chain is matched",
    tests=(
        "tests/test_store.py::test_stored_kv_read_back_in_order",
        "tests/test_store.py::test_capacity_is_never_exceeded_and_references_balance",
    ),
)
def match_capped_at_one_block() -> None:
    from hf_prefix_cache import BlockStore

    match = BlockStore.match

    def one_block(self, *args, **kwargs):
        found = match(self, *args, **kwargs)
        self.release(found.blocks[1:])
        return type(found)(found.blocks[:1], found.sources[:1])

    BlockStore.match = one_block


@mutant(
    "kv_written_one_slot_off",
    breaks="stored K/V land in their own slots",
    tests=(f"{CORE}::test_cold_then_warm_shared_system_prompt[llama]",),
)
def kv_written_one_slot_off() -> None:
    """Every stored slot gets its predecessor's K/V (the first slot of a write is duplicated)."""
    from hf_prefix_cache.kv_pool import KVPool

    write = KVPool.write

    def shifted(self, layer, block_ids, keys, values, *args, **kwargs):
        def shift(t):
            return torch.cat([t[:, :1], t[:, :-1]], dim=1)

        return write(self, layer, block_ids, shift(keys), shift(values), *args, **kwargs)

    KVPool.write = shifted


@mutant(
    "noise_on_stored_keys_bf16",
    breaks="bf16 exactness sees corrupted keys",
    tests=(
        f"{BATCHES}::test_low_precision_tolerance_is_no_cache_noise[bf16-llama]",
        f"{BATCHES}::test_low_precision_tolerance_is_no_cache_noise[bf16-gemma3]",
    ),
)
def noise_on_stored_keys_bf16() -> None:
    """Stored bf16 keys get the noise of the bf16 negative control (0.5 * N(0, 1)), seeded."""
    from hf_prefix_cache.kv_pool import KVPool

    write = KVPool.write
    generator = torch.Generator().manual_seed(1004)

    def noisy(self, layer, block_ids, keys, values, *args, **kwargs):
        if keys.dtype == torch.bfloat16:
            noise = torch.randn(keys.shape, generator=generator, dtype=torch.float32)
            keys = keys + (0.5 * noise).to(keys.dtype).to(keys.device)
        return write(self, layer, block_ids, keys, values, *args, **kwargs)

    KVPool.write = noisy


@mutant(
    "last_prompt_token_loaded",
    breaks="the last prompt token is always computed",
    tests=(f"{CORE}::test_prompt_that_is_exactly_a_cached_prefix[llama-16]",),
)
def last_prompt_token_loaded() -> None:
    """A fully stored prompt is loaded whole: nothing is left to compute (generate()'s trap)."""
    from hf_prefix_cache import BlockStore

    match = BlockStore.match

    def whole_prompt(self, namespace, tokens, hashes, max_blocks, *args, **kwargs):
        return match(self, namespace, tokens, hashes, len(hashes), *args, **kwargs)

    BlockStore.match = whole_prompt


@mutant(
    "extend_chain_releases_held",
    breaks="references are released exactly once, whatever raises",
    tests=(
        "tests/test_misuse.py::test_case4_interrupt_in_commit_keeps_other_references_and_surfaces[KeyboardInterrupt]",
        "tests/test_misuse.py::test_case4_interrupt_in_commit_keeps_other_references_and_surfaces[RuntimeError]",
    ),
)
def extend_chain_releases_held() -> None:
    """A failure while storing also releases the prefix the caller still holds (released twice)."""
    from hf_prefix_cache import BlockStore

    extend_chain = BlockStore.extend_chain

    def releases_held(self, namespace, tokens, hashes, held, *args, **kwargs):
        try:
            return extend_chain(self, namespace, tokens, hashes, held, *args, **kwargs)
        except BaseException:
            self.pool.release(held)
            raise

    BlockStore.extend_chain = releases_held


@mutant(
    "fresh_chains_not_ascending",
    breaks="a chain stored over evicted blocks is laid out in ascending ids (one view to read back)",
    tests=(
        "tests/test_store.py::test_a_chain_stored_over_evicted_blocks_gets_ascending_ids_and_reads_back_exactly",
    ),
)
def fresh_chains_not_ascending() -> None:
    """Fresh blocks keep the LRU queue's order (an evicted chain comes back in descending ids)."""
    replace_function("hf_prefix_cache.block_pool", "ascending", lambda original: lambda blocks: list(blocks))


@mutant(
    "pool_zero_filled",
    breaks="pool memory is committed as blocks are stored, not up front",
    tests=("tests/test_on_demand.py::test_resident_memory_follows_stored_blocks_not_the_budget",),
)
def pool_zero_filled() -> None:
    """The pool zero-fills its whole budget up front."""
    from hf_prefix_cache.kv_pool import KVPool

    init = KVPool.__init__

    def zeroed(self, *args, **kwargs):
        init(self, *args, **kwargs)
        for _, group in self.groups:
            group.zero_()

    KVPool.__init__ = zeroed


@mutant(
    "never_used_blocks_after_eviction",
    breaks="no cached block is evicted while a never-used block is left",
    tests=(
        "tests/test_store.py::test_blocks_go_out_empty_first_then_never_used_lowest_first_then_least_recently_used",
    ),
)
def never_used_blocks_after_eviction() -> None:
    """The lazily made pool evicts the least recently used cached block while never-used ids are left."""
    from hf_prefix_cache.block_pool import Block, BlockPool

    def evicting_first(self):
        if self.free and self.free[next(iter(self.free))].block_hash is not None:
            return self.free.popitem(last=False)[1]
        if self.free:
            return self.free.popitem(last=False)[1]
        if len(self.blocks) < self._num_blocks:
            self.blocks.append(Block(len(self.blocks)))
            return self.blocks[-1]
        return None

    BlockPool._take_free = evicting_first
