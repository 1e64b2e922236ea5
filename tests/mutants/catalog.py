"""The mutant list: each entry breaks one feature with a monkeypatch and names the tests that must fail.

Patches wrap stable names (a class method, a module function) instead of editing lines, so they survive
refactors of the code around them. To add one: write a ``patch`` function below, then a ``Mutant`` in
``MUTANTS`` (see README.md in this folder). Node ids are relative to the repository root; choose fast
tests on the tiny models, and only tests that fail by an assertion under the mutant.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

PACKAGES = ("hf_prefix_cache", "hf_prefix_cache_eval")


@dataclass(frozen=True)
class Mutant:
    name: str
    breaks: str  # the feature it breaks, in words
    patch: Callable[[], None]  # applied once, before the test modules are imported
    tests: tuple[str, ...]  # every one of these must fail under the mutant


def replace_function(module_name: str, name: str, make: Callable[[Callable], Callable]) -> None:
    """Replace function ``module_name.name`` by ``make(original)`` everywhere the library bound it
    (``from .x import name`` copies the reference into other modules)."""
    for package in PACKAGES:
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)
    original = getattr(importlib.import_module(module_name), name)
    replacement = make(original)
    for module_key, module in list(sys.modules.items()):
        if module_key.split(".")[0] in PACKAGES:
            for attr, value in list(vars(module).items()):
                if value is original:
                    setattr(module, attr, replacement)


# -- the patches -------------------------------------------------------------------------------------------
def reply_storage_off() -> None:
    """commit() never sees generate()'s sequences: only prompts are stored."""
    from hf_prefix_cache import PrefixCache

    commit = PrefixCache.commit

    def without_replies(self, sequences=None, *args, **kwargs):
        return commit(self, None, *args, **kwargs)

    PrefixCache.commit = without_replies


def wrapper_changes_kwarg_without_cache() -> None:
    """The installed generate() wrapper forces max_new_tokens=1 when no PrefixCache is passed."""
    from hf_prefix_cache import PrefixCache

    def make(install):
        def mutated_install(model):
            install(model)
            inner = model.generate
            if getattr(inner, "_mutant", False):
                return

            def generate(*args, **kwargs):
                if not any(isinstance(value, PrefixCache) for value in kwargs.values()):
                    kwargs["max_new_tokens"] = 1
                return inner(*args, **kwargs)

            generate.__dict__.update(vars(inner))  # keeps the installed mark: is_installed/uninstall work
            generate._mutant = True
            model.generate = generate

        return mutated_install

    replace_function("hf_prefix_cache.generation", "install", make)


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


def restart_without_disk() -> None:
    """The eval's restart process gets the run's tiers without disk=: it starts cold."""

    def make(restart_tiers):
        def without_disk(config):
            return {key: value for key, value in restart_tiers(config).items() if key != "disk"}

        return without_disk

    replace_function("hf_prefix_cache_eval.subruns", "restart_tiers", make)


def workers_share_every_conversation() -> None:
    """Every eval worker replays every conversation instead of its round-robin share."""

    def make(split_round_robin):
        def everything(plan, workers):
            split_round_robin(plan, workers)
            return [list(plan) for _ in range(workers)]

        return everything

    replace_function("hf_prefix_cache_eval.subruns", "split_round_robin", make)


def eval_remote_alone_ignored() -> None:
    """--remote without --workers leaves the eval's prefix_cache mode without the Redis tier."""

    def make(single_process_tiers):
        def without_remote(config, key_prefix):
            tiers = single_process_tiers(config, key_prefix)
            return {k: v for k, v in tiers.items() if k not in ("remote", "key_prefix", "remote_min_tokens")}

        return without_remote

    replace_function("hf_prefix_cache_eval.runner", "single_process_tiers", make)


def subrun_match_always_true() -> None:
    """Turns replayed in other processes are never compared with the baseline's output."""

    def make(records):
        def all_match(*args, **kwargs):
            return [dataclasses.replace(r, match=True) for r in records(*args, **kwargs)]

        return all_match

    replace_function("hf_prefix_cache_eval.subruns", "_records", make)


def match_capped_at_one_block() -> None:
    from hf_prefix_cache import BlockStore

    match = BlockStore.match

    def one_block(self, *args, **kwargs):
        found = match(self, *args, **kwargs)
        self.release(found.blocks[1:])
        return type(found)(found.blocks[:1], found.sources[:1])

    BlockStore.match = one_block


def kv_written_one_slot_off() -> None:
    """Every stored slot gets its predecessor's K/V (the first slot of a write is duplicated)."""
    from hf_prefix_cache.kv_pool import KVPool

    write = KVPool.write

    def shifted(self, layer, block_ids, keys, values, *args, **kwargs):
        def shift(t):
            return torch.cat([t[:, :1], t[:, :-1]], dim=1)

        return write(self, layer, block_ids, shift(keys), shift(values), *args, **kwargs)

    KVPool.write = shifted


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


def namespace_ignores_salt() -> None:
    from hf_prefix_cache import PrefixCache

    init = PrefixCache.__init__

    def unsalted(self, *args, cache_salt=None, **kwargs):
        init(self, *args, **kwargs)

    PrefixCache.__init__ = unsalted


def last_prompt_token_loaded() -> None:
    """A fully stored prompt is loaded whole: nothing is left to compute (generate()'s trap)."""
    from hf_prefix_cache import BlockStore

    match = BlockStore.match

    def whole_prompt(self, namespace, tokens, hashes, max_blocks, *args, **kwargs):
        return match(self, namespace, tokens, hashes, len(hashes), *args, **kwargs)

    BlockStore.match = whole_prompt


def fallback_model_gets_the_cache() -> None:
    """A model the store cannot serve still gets the PrefixCache (a plain DynamicCache) in generate()."""

    def make(run_generate):
        def hands_over(cache, original, args, kwargs):
            if cache.store is None:
                return original(*args, **kwargs)
            return run_generate(cache, original, args, kwargs)

        return hands_over

    replace_function("hf_prefix_cache.generation", "run_generate", make)


def every_generation_mode_served() -> None:
    """Contrastive search, DoLa, group beams... are served from the store instead of falling back."""
    from transformers.generation.configuration_utils import GenerationMode

    from hf_prefix_cache import reasons

    reasons.EXACT_MODES.update(set(GenerationMode) - {GenerationMode.ASSISTED_GENERATION})


def fingerprint_ignores_weights() -> None:
    """Two models of one class and config share a namespace whatever their weights."""

    def make(model_fingerprint):
        def class_and_config(model):
            return f"{type(model).__qualname__}:{model.config.to_json_string()}".encode().hex()[:64]

        return class_and_config

    replace_function("hf_prefix_cache.fingerprint", "model_fingerprint", make)


def weights_watch_blind() -> None:
    """Weight updates after the first call go unnoticed: stale blocks keep hitting."""
    from hf_prefix_cache.fingerprint import WeightsWatch

    changed = WeightsWatch.changed

    def first_time_only(self):
        if getattr(self, "_mutant_seen", False):
            return False
        self._mutant_seen = True
        return changed(self)

    WeightsWatch.changed = first_time_only


# -- issue 12: the store defends itself ---------------------------------------------------------------
def busy_view_not_refused() -> None:
    """A second thread may take over a PrefixCache whose call is in flight."""
    import threading

    from hf_prefix_cache.call import Ownership

    def claim(self):
        self.owner = threading.get_ident()

    Ownership.claim = claim


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


def use_cache_false_served() -> None:
    """generate(use_cache=False, cache=...) is prepared and committed as a normal call."""

    def make(reason):
        def ignores_use_cache(cache, config, *args, **kwargs):
            config = copy.deepcopy(config)
            config.use_cache = True
            return reason(cache, config, *args, **kwargs)

        return ignores_use_cache

    replace_function("hf_prefix_cache.reasons", "call_fallback_reason", make)


def unprepared_generate_served() -> None:
    """A generate() that never went through prepare() (after uninstall) computes into the cache."""
    replace_function("hf_prefix_cache.call", "inside_generate", lambda original: lambda: False)


def foreign_module_accepted() -> None:
    """K/V computed by another model's layers are accepted into this cache."""
    replace_function("hf_prefix_cache.call", "check_module", lambda original: lambda model, module: None)


def adapters_ignored() -> None:
    """The namespace ignores which PEFT adapters are active."""
    replace_function("hf_prefix_cache.adapters", "adapter_namespace", lambda original: lambda model: "")


def custom_generate_served() -> None:
    """A callable custom_generate (its own decoding loop) is served from the store."""

    def make(reason):
        def ignores_custom(cache, config, input_ids, kwargs):
            return reason(
                cache, config, input_ids, {k: v for k, v in kwargs.items() if k != "custom_generate"}
            )

        return ignores_custom

    replace_function("hf_prefix_cache.reasons", "call_fallback_reason", make)


# -- issue 9 and 10: tiers -------------------------------------------------------------------------------
def entry_checksum_blind() -> None:
    """Entries carry a constant checksum: damaged payloads decode."""
    replace_function(
        "hf_prefix_cache.tiers.entry", "_checksum", lambda original: lambda parts: bytes(range(16))
    )


def host_write_back_off() -> None:
    """Blocks the device pool evicts are lost instead of kept in the host tier."""
    from hf_prefix_cache.tiers.stack import TierStack

    TierStack.evicting = lambda self, block: None


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


def write_queue_unbounded() -> None:
    """The background writer queues everything: a slow disk or server grows memory without bound."""
    from hf_prefix_cache.tiers.writer import BackgroundWriter

    BackgroundWriter.max_items = property(lambda self: 1 << 60, lambda self, value: None)


def exit_flush_off() -> None:
    """Interpreter exit does not flush: writes still queued die with the daemon writer thread."""
    import atexit

    from hf_prefix_cache.tiers import writer

    atexit.unregister(writer._flush_at_exit)


def exit_flush_unbounded() -> None:
    """Interpreter exit waits for every queued write, however long a hung disk takes."""
    import atexit

    from hf_prefix_cache.tiers import writer

    atexit.unregister(writer._flush_at_exit)
    atexit.register(lambda: [live.flush(None) for live in list(writer._LIVE)])


def entry_payload_unchecked() -> None:
    """decode() serves whatever tensors the payload names, without comparing them to the layer table."""
    from hf_prefix_cache.tiers import entry

    entry._check_payload = lambda packed, layouts, n_tokens: None


def entry_decode_copies() -> None:
    """decode() copies every tensor out of the entry (a second pass over the bytes of every read)."""
    from hf_prefix_cache.tiers import entry

    read_payload = entry._read_payload
    entry._read_payload = lambda *args: {k: v.clone() for k, v in read_payload(*args).items()}


def copies_outlive_an_interrupt() -> None:
    """run_all raises on an interrupt while its copy threads still write."""

    def make(original):
        def run_all(tasks, parallel=True):
            from hf_prefix_cache.parallel import _pool

            for future in [_pool().submit(task) for task in tasks]:
                future.result()

        return run_all

    replace_function("hf_prefix_cache.parallel", "run_all", make)


def fresh_chains_not_ascending() -> None:
    """Fresh blocks keep the LRU queue's order (an evicted chain comes back in descending ids)."""
    replace_function("hf_prefix_cache.block_pool", "ascending", lambda original: lambda blocks: list(blocks))


def remote_bad_values_kept() -> None:
    """A value that fails verification stays on the server."""
    from hf_prefix_cache.tiers.remote import RemoteTier

    RemoteTier._delete_key = lambda self, key: None


def remote_key_ignores_prefix() -> None:
    """Deployments with different key_prefix share keys."""
    from hf_prefix_cache.tiers.remote import RemoteTier

    RemoteTier.key = lambda self, namespace, block_hash: f"{namespace.hex()}:{block_hash.hex()}"


# -- issue 11: memory on demand, decode in place ---------------------------------------------------------
def pool_zero_filled() -> None:
    """The pool zero-fills its whole budget up front."""
    from hf_prefix_cache.kv_pool import KVPool

    empty = KVPool._empty

    def zeros(self, *args, **kwargs):
        return empty(self, *args, **kwargs).zero_()

    KVPool._empty = zeros


def decode_concatenates() -> None:
    """Full-attention layers concatenate the whole context at every step, as DynamicLayer does."""
    from transformers.cache_utils import DynamicLayer

    from hf_prefix_cache.layers import PrefixFullLayer

    def concatenating(self, key_states, value_states, *args, **kwargs):
        self.keys, self.values = self.keys.clone(), self.values.clone()
        return DynamicLayer.update(self, key_states, value_states, *args, **kwargs)

    PrefixFullLayer.update = concatenating


# -- issue 11 follow-up: cheap construction, cheap decode steps ------------------------------------------
def probe_reused_after_a_change() -> None:
    """A kept probe result is served for a model that was cast, edited or had a tensor replaced since."""
    from hf_prefix_cache import layout

    layout._Probed.still_valid = lambda self, tensors, fingerprint: True


def probe_never_reused() -> None:
    """Every PrefixCache runs the probe forward again, even for an unchanged model."""
    from hf_prefix_cache import layout

    layout._Probed.still_valid = lambda self, tensors, fingerprint: False


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


def decode_trusts_replaced_views() -> None:
    """A decode step appends to the layer's buffers even after beam search replaced ``keys``/``values``."""
    from hf_prefix_cache.layers import PrefixFullLayer

    update = PrefixFullLayer.update

    def trusting(self, key_states, value_states, *args, **kwargs):
        buffer = self._key_buffer
        if buffer is not None and self.keys is not None and self.keys.shape[2] <= buffer.shape[2]:
            self._shown_keys, self._shown_values = self.keys, self.values
        return update(self, key_states, value_states, *args, **kwargs)

    PrefixFullLayer.update = trusting


def construction_probes() -> None:
    """No layout is predicted from the config: every new PrefixCache runs the probe forward."""
    replace_function("hf_prefix_cache.layout", "predict_layout", lambda original: lambda model: None)


def confirmed_layout_forgotten() -> None:
    """The layout a first call confirmed is not kept: the next cache on the model starts unconfirmed."""
    from hf_prefix_cache import cache

    cache.remember_layout = lambda model, result: None


def prediction_kept_when_wrong() -> None:
    """The first call confirms whatever the config predicted, without remaking the pool for the truth."""
    from hf_prefix_cache.store import BlockStore

    def confirm(self, layouts):
        self.confirmed = True
        return None

    BlockStore.confirm = confirm


def calls_not_checked_against_the_layout() -> None:
    """Committed K/V are stored whatever their layout, and a predicted layout is never confirmed."""
    from hf_prefix_cache import PrefixCache

    PrefixCache._layout_problem = lambda self: None


def off_default_calls_use_the_store() -> None:
    """A call under torch.autocast (or in training mode) looks its prompt up and reuses stored blocks."""
    replace_function(
        "hf_prefix_cache.reasons", "off_default", lambda original: lambda model, device_types: None
    )


def off_default_calls_feed_the_store() -> None:
    """K/V computed under torch.autocast or with dropout in training mode are stored."""

    def make(unstorable):
        def forgetting(call, *args, **kwargs):
            call.off_default = None
            return unstorable(call, *args, **kwargs)

        return forgetting

    replace_function("hf_prefix_cache.reasons", "unstorable", make)


def decode_masks_off() -> None:
    """Decode steps never get a mask: SDPA reads each K/V head once per query head (enable_gqa)."""
    replace_function("hf_prefix_cache.decode_masks", "wants_decode_masks", lambda original: lambda *a: False)


def decode_masks_everywhere() -> None:
    """Every call gets decode masks, with eager attention and without grouped queries too."""
    replace_function("hf_prefix_cache.decode_masks", "wants_decode_masks", lambda original: lambda *a: True)


def decode_masks_outside_calls() -> None:
    """The cache reports is_compileable from its model alone, before, between and after calls too,
    and under a compile_config."""
    from hf_prefix_cache import PrefixCache
    from hf_prefix_cache.decode_masks import wants_decode_masks

    PrefixCache.is_compileable = property(
        lambda self: (
            self.store is not None
            and wants_decode_masks(self.model, {layout.device.type for layout in self.store.layouts})
        )
    )


CORE = "tests/test_core_exactness.py"
API = "tests/test_core_api.py"
BATCHES = "tests/test_batches_strategies.py"
FALLBACKS = "tests/test_fallbacks.py"
EVAL_TIERS = "tests/test_eval_tiers.py"
CONSTRUCTION = "tests/test_construction.py"
DECODE_MASKS = "tests/test_decode_masks.py"

MUTANTS: list[Mutant] = [
    Mutant(
        "reply_storage_off",
        "replies are stored so the next turn hits the whole history",
        reply_storage_off,
        (
            f"{CORE}::test_three_turn_conversation_reuses_history_and_replies[llama]",
            f"{BATCHES}::test_text_generation_pipeline_reuses_the_conversation[cache]",
            f"{BATCHES}::test_rows_that_stop_early_store_no_padding[llama-eos]",
        ),
    ),
    Mutant(
        "wrapper_changes_kwarg_without_cache",
        "the generate() wrapper is passive without a PrefixCache",
        wrapper_changes_kwarg_without_cache,
        (f"{API}::test_wrapper_is_idempotent_removable_and_passive_without_a_prefix_cache",),
    ),
    Mutant(
        "write_outputs_wrong_values",
        "results.csv and results.json hold the measured values",
        write_outputs_wrong_values,
        ("tests/test_eval_harness.py::test_report_files_hold_the_results",),
    ),
    Mutant(
        "restart_without_disk",
        "the eval's --restart process reads the disk tier the run filled",
        restart_without_disk,
        (
            f"{EVAL_TIERS}::test_restart_turns_hit_the_disk_tier_and_match_the_baseline",
            f"{EVAL_TIERS}::test_report_and_results_json_carry_the_other_processes[restart_run-modes0]",
        ),
    ),
    Mutant(
        "workers_share_every_conversation",
        "the eval's --workers split the conversations into disjoint round-robin shares",
        workers_share_every_conversation,
        (f"{EVAL_TIERS}::test_workers_replay_disjoint_conversations_and_share_the_system_prompt",),
    ),
    Mutant(
        "eval_remote_alone_ignored",
        "the eval's --remote alone gives the prefix_cache mode the Redis tier",
        eval_remote_alone_ignored,
        (f"{EVAL_TIERS}::test_remote_alone_gives_the_single_process_mode_the_redis_tier",),
    ),
    Mutant(
        "subrun_match_always_true",
        "outputs of the restart and worker processes are checked against the baseline",
        subrun_match_always_true,
        (f"{EVAL_TIERS}::test_subprocess_outputs_are_checked_against_the_baseline",),
    ),
    Mutant(
        "match_capped_at_one_block",
        "the longest stored chain is matched",
        match_capped_at_one_block,
        (
            "tests/test_store.py::test_stored_kv_read_back_in_order",
            "tests/test_store.py::test_capacity_is_never_exceeded_and_references_balance",
        ),
    ),
    Mutant(
        "kv_written_one_slot_off",
        "stored K/V land in their own slots",
        kv_written_one_slot_off,
        (f"{CORE}::test_cold_then_warm_shared_system_prompt[llama]",),
    ),
    Mutant(
        "noise_on_stored_keys_bf16",
        "bf16 exactness sees corrupted keys",
        noise_on_stored_keys_bf16,
        (
            f"{BATCHES}::test_low_precision_tolerance_is_no_cache_noise[bf16-llama]",
            f"{BATCHES}::test_low_precision_tolerance_is_no_cache_noise[bf16-gemma3]",
        ),
    ),
    Mutant(
        "namespace_ignores_salt",
        "caches with different salts never share blocks",
        namespace_ignores_salt,
        (f"{API}::test_salts_do_not_share_blocks",),
    ),
    Mutant(
        "last_prompt_token_loaded",
        "the last prompt token is always computed",
        last_prompt_token_loaded,
        (f"{CORE}::test_prompt_that_is_exactly_a_cached_prefix[llama-16]",),
    ),
    Mutant(
        "fallback_model_gets_the_cache",
        "models the store cannot serve run generate() without the cache",
        fallback_model_gets_the_cache,
        (f"{FALLBACKS}::test_encoder_decoders_and_multimodal_models_fall_back_up_front[t5]",),
    ),
    Mutant(
        "every_generation_mode_served",
        "generation modes other than greedy/sampling/beams fall back",
        every_generation_mode_served,
        (f"{FALLBACKS}::test_other_generation_modes_fall_back_with_one_warning[contrastive_search]",),
    ),
    Mutant(
        "fingerprint_ignores_weights",
        "another model never hits",
        fingerprint_ignores_weights,
        (f"{API}::test_another_model_never_hits",),
    ),
    Mutant(
        "weights_watch_blind",
        "a weight update invalidates stored blocks",
        weights_watch_blind,
        (f"{API}::test_a_weight_update_invalidates_stored_blocks",),
    ),
    Mutant(
        "busy_view_not_refused",
        "one PrefixCache serves one call at a time",
        busy_view_not_refused,
        ("tests/test_misuse.py::test_case1_a_second_thread_on_a_busy_cache_gets_the_fix",),
    ),
    Mutant(
        "extend_chain_releases_held",
        "references are released exactly once, whatever raises",
        extend_chain_releases_held,
        (
            "tests/test_misuse.py::test_case4_interrupt_in_commit_keeps_other_references_and_surfaces[KeyboardInterrupt]",
            "tests/test_misuse.py::test_case4_interrupt_in_commit_keeps_other_references_and_surfaces[RuntimeError]",
        ),
    ),
    Mutant(
        "use_cache_false_served",
        "use_cache=False falls back and stores nothing",
        use_cache_false_served,
        ("tests/test_misuse.py::test_case3_use_cache_false_falls_back_exactly_and_stores_nothing",),
    ),
    Mutant(
        "unprepared_generate_served",
        "state never carries from one generate() into the next",
        unprepared_generate_served,
        ("tests/test_misuse.py::test_case5_unwrapped_generate_is_refused_and_carries_nothing",),
    ),
    Mutant(
        "foreign_module_accepted",
        "only the fingerprinted model computes K/V into the cache",
        foreign_module_accepted,
        ("tests/test_misuse.py::test_case2_without_the_wrapper_kv_of_another_model_are_refused",),
    ),
    Mutant(
        "adapters_ignored",
        "PEFT adapters are part of the namespace",
        adapters_ignored,
        ("tests/test_peft.py::test_switching_adapters_is_exact_and_hits_stay_within_an_adapter[peft_model]",),
    ),
    Mutant(
        "custom_generate_served",
        "a custom decoding loop falls back",
        custom_generate_served,
        (f"{FALLBACKS}::test_a_custom_decoding_loop_falls_back_even_in_greedy_mode",),
    ),
    Mutant(
        "entry_checksum_blind",
        "tier entries are verified by their checksum",
        entry_checksum_blind,
        (
            "tests/test_tier_entry.py::test_damaged_bytes_are_rejected[flip_payload-checksum]",
            "tests/test_tier_entry.py::test_damaged_bytes_are_rejected[flip_token-checksum]",
        ),
    ),
    Mutant(
        "host_write_back_off",
        "device evictions are written back to the host tier",
        host_write_back_off,
        ("tests/test_tier_store.py::test_device_evictions_are_written_back_to_host_and_promoted_exactly",),
    ),
    Mutant(
        "disk_writes_in_place",
        "disk entries appear whole (temp file, then os.replace)",
        disk_writes_in_place,
        ("tests/test_tier_store.py::test_write_failures_are_counted_and_leave_no_entry[28-disk full]",),
    ),
    Mutant(
        "write_queue_unbounded",
        "tier writes are dropped and counted when the queue is full, never queued without bound",
        write_queue_unbounded,
        (
            "tests/test_tier_store.py::test_a_full_write_queue_drops_and_counts_without_blocking",
            "tests/test_tier_remote_store.py::test_a_full_write_queue_drops_and_counts_instead_of_waiting",
        ),
    ),
    Mutant(
        "exit_flush_off",
        "interpreter exit lands the tier writes still queued",
        exit_flush_off,
        ("tests/test_tier_processes.py::test_interpreter_exit_lands_the_writes_still_queued",),
    ),
    Mutant(
        "exit_flush_unbounded",
        "the exit flush waits EXIT_FLUSH_S at most, so a hung disk never hangs the interpreter's exit",
        exit_flush_unbounded,
        ("tests/test_tier_processes.py::test_the_exit_flush_gives_up_after_its_bound_when_the_disk_hangs",),
    ),
    Mutant(
        "entry_payload_unchecked",
        "an entry's payload tensors must be exactly those of the layer table",
        entry_payload_unchecked,
        ("tests/test_tier_entry.py::test_a_payload_of_other_tensors_is_rejected_even_with_a_valid_checksum",),
    ),
    Mutant(
        "entry_decode_copies",
        "decode() returns views of the entry bytes, so a read copies the K/V once (into the pool)",
        entry_decode_copies,
        ("tests/test_tier_entry.py::test_decoded_kv_are_views_of_the_entry_bytes_not_copies",),
    ),
    Mutant(
        "copies_outlive_an_interrupt",
        "an interrupted promotion returns only after its copy threads stopped writing into the pool",
        copies_outlive_an_interrupt,
        ("tests/test_parallel.py::test_an_interrupt_returns_only_after_every_started_copy_finished",),
    ),
    Mutant(
        "fresh_chains_not_ascending",
        "a chain stored over evicted blocks is laid out in ascending ids (one view to read back)",
        fresh_chains_not_ascending,
        (
            "tests/test_store.py::test_a_chain_stored_over_evicted_blocks_gets_ascending_ids_and_reads_back_exactly",
        ),
    ),
    Mutant(
        "remote_bad_values_kept",
        "a bad value on the server is a miss and its key is deleted",
        remote_bad_values_kept,
        (
            "tests/test_tier_remote_store.py::test_a_bad_value_under_a_real_key_is_a_miss_and_the_key_is_deleted[garbage]",
        ),
    ),
    Mutant(
        "remote_key_ignores_prefix",
        "key_prefix keeps deployments apart on one server",
        remote_key_ignores_prefix,
        (
            "tests/test_tier_remote_store.py::test_key_prefix_and_namespace_keep_deployments_apart_and_clear_removes_only_its_own",
        ),
    ),
    Mutant(
        "pool_zero_filled",
        "pool memory is committed as blocks are stored, not up front",
        pool_zero_filled,
        ("tests/test_on_demand.py::test_resident_memory_follows_stored_blocks_not_the_budget",),
    ),
    Mutant(
        "decode_concatenates",
        "decode steps append in place without copying the context",
        decode_concatenates,
        ("tests/test_on_demand.py::test_decode_steps_append_in_place_without_copying_the_context[llama]",),
    ),
    Mutant(
        "probe_reused_after_a_change",
        "the probe runs again after a cast, a config edit or a replaced tensor",
        probe_reused_after_a_change,
        (
            "tests/test_construction.py::test_the_probe_runs_again_after_the_model_changed_and_the_new_cache_is_exact[llama-cast_to_float64]",
            "tests/test_construction.py::test_the_probe_runs_again_after_the_model_changed_and_the_new_cache_is_exact[mistral-shrink_the_window]",
            "tests/test_construction.py::test_the_probe_runs_again_after_the_model_changed_and_the_new_cache_is_exact[llama-replace_a_projection]",
        ),
    ),
    Mutant(
        "probe_never_reused",
        "an unchanged model is probed once, however many caches are made for it",
        probe_never_reused,
        ("tests/test_construction.py::test_caches_with_tiers_probe_once_per_unchanged_model",),
    ),
    Mutant(
        "never_used_blocks_after_eviction",
        "no cached block is evicted while a never-used block is left",
        never_used_blocks_after_eviction,
        (
            "tests/test_store.py::test_blocks_go_out_empty_first_then_never_used_lowest_first_then_least_recently_used",
        ),
    ),
    Mutant(
        "decode_trusts_replaced_views",
        "a decode step adopts keys/values that beam search or crop replaced",
        decode_trusts_replaced_views,
        (
            "tests/test_on_demand.py::test_a_full_layer_follows_every_replacement_of_its_keys_like_a_dynamic_layer",
            "tests/test_matrix.py::test_strategy_single[beam3_n2-llama]",
        ),
    ),
    Mutant(
        "construction_probes",
        "a new PrefixCache reads the layout from the config instead of running a forward pass",
        construction_probes,
        (
            f"{CONSTRUCTION}::test_a_new_cache_runs_no_forward_and_its_first_call_confirms_the_predicted_layout[llama]",
            f"{CONSTRUCTION}::test_a_new_cache_runs_no_forward_and_its_first_call_confirms_the_predicted_layout[gemma3]",
        ),
    ),
    Mutant(
        "confirmed_layout_forgotten",
        "a layout a call confirmed serves later caches on the unchanged model",
        confirmed_layout_forgotten,
        (f"{CONSTRUCTION}::test_a_second_cache_on_a_confirmed_model_is_confirmed_without_a_forward",),
    ),
    Mutant(
        "prediction_kept_when_wrong",
        "a wrong prediction is replaced by the probe's layout (and the pool resized) before anything is stored",
        prediction_kept_when_wrong,
        (
            f"{CONSTRUCTION}::test_a_wrong_prediction_is_replaced_by_the_probe_before_anything_is_stored[dtype-max_memory]",
            f"{CONSTRUCTION}::test_a_wrong_prediction_is_replaced_by_the_probe_before_anything_is_stored[head_dim-num_blocks]",
        ),
    ),
    Mutant(
        "calls_not_checked_against_the_layout",
        "only K/V of the store's confirmed layout are stored",
        calls_not_checked_against_the_layout,
        (
            f"{CONSTRUCTION}::test_a_new_cache_runs_no_forward_and_its_first_call_confirms_the_predicted_layout[qwen2]",
            f"{CONSTRUCTION}::test_a_wrong_prediction_is_replaced_by_the_probe_before_anything_is_stored[dtype-num_blocks]",
        ),
    ),
    Mutant(
        "off_default_calls_use_the_store",
        "a call under torch.autocast or in training mode reuses nothing",
        off_default_calls_use_the_store,
        (
            f"{CONSTRUCTION}::test_calls_under_autocast_neither_use_nor_feed_the_store",
            f"{CONSTRUCTION}::test_calls_in_training_mode_neither_use_nor_feed_the_store",
        ),
    ),
    Mutant(
        "off_default_calls_feed_the_store",
        "K/V computed under torch.autocast or with dropout in training mode are never stored",
        off_default_calls_feed_the_store,
        (
            f"{CONSTRUCTION}::test_calls_under_autocast_neither_use_nor_feed_the_store",
            f"{CONSTRUCTION}::test_calls_in_training_mode_neither_use_nor_feed_the_store",
        ),
    ),
    Mutant(
        "decode_masks_off",
        "decode steps of a CPU grouped-query SDPA call get a mask, so SDPA packs the query heads",
        decode_masks_off,
        (
            f"{DECODE_MASKS}::test_cpu_grouped_query_decode_steps_take_the_packed_masked_path_and_stay_exact[llama]",
            f"{DECODE_MASKS}::test_beam_search_with_decode_masks_matches_no_cache",
        ),
    ),
    Mutant(
        "decode_masks_everywhere",
        "decode masks only where they help: SDPA with grouped queries on the CPU",
        decode_masks_everywhere,
        (
            f"{DECODE_MASKS}::test_decode_masks_stay_off_where_they_do_not_help[eager]",
            f"{DECODE_MASKS}::test_decode_masks_stay_off_where_they_do_not_help[no_grouped_queries]",
        ),
    ),
    Mutant(
        "decode_masks_outside_calls",
        "is_compileable is reported only during a call that wants decode masks, never under a compile_config",
        decode_masks_outside_calls,
        (
            f"{DECODE_MASKS}::test_cpu_grouped_query_decode_steps_take_the_packed_masked_path_and_stay_exact[llama]",
            f"{DECODE_MASKS}::test_decode_masks_stay_off_where_they_do_not_help[compile_config]",
        ),
    ),
]


def _area_mutants() -> list[Mutant]:
    """Mutants kept in their own modules, one per area of the library (``area_<name>.py`` beside this
    file, each with its own ``MUTANTS`` list), so that areas grow without touching one shared list."""
    import pkgutil
    from pathlib import Path

    found: list[Mutant] = []
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda i: i.name):
        if info.name.startswith("area_"):
            found.extend(importlib.import_module(f"mutants.{info.name}").MUTANTS)
    return found


MUTANTS += _area_mutants()


def by_name(name: str) -> Mutant:
    for mutant in MUTANTS:
        if mutant.name == name:
            return mutant
    raise KeyError(f"no mutant {name!r}; known: {[m.name for m in MUTANTS]}")
