"""``PrefixCache``: a transformers ``Cache`` whose prefix comes from, and whose K/V go to, a block store.

A call has three steps. ``prepare`` looks the prompt up, references the longest verified chain of blocks
(never the whole prompt: the last token is always computed) and places it in the layers. ``generate()``
then computes only the rest, exactly as with a ``DynamicCache``. ``commit`` stores the full blocks of
the prompt and of the reply from the captured K/V, then ``release`` drops the references and empties the
layers, so nothing of one call leaks into the next.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache

from . import adapters, checkpoints, fingerprint, priorities, scoring
from .call import (
    CallState,
    Ownership,
    calling_module,
    captured_slots,
    check_module,
    inside_generate,
    layout_problem,
    unprepared,
)
from .construction import StoreConfig, TierConfig, build_store, model_layouts, prefix_layers
from .cost_model import model_costs
from .decode_masks import long_enough, wants_decode_masks
from .explain import HitReport, stored_prefix
from .generation import Served
from .generation import install as install_generate
from .identity import Identity
from .layers import PrefixLayer
from .layout import UnsupportedLayout
from .memory import parse_bytes
from .pinning import pin_prefix, unpin_prefix
from .placement import place_prefix, reserve_room
from .prompt_rows import as_batch, split_rows
from .reasons import (
    REUSE_OFF,
    STALE,
    UNDER_AUTOCAST,
    PrefixCacheFallbackWarning,
    off_default,
    unstorable,
    unsupported_reason,
)
from .recording import as_sequences, prompt_mismatch, record_call, replies_of
from .stats import CacheStats, CallStats, Counters
from .store import BlockStore
from .validation import extra_keys_tuple, positive_int

logger = logging.getLogger(__name__)


class PrefixCache(DynamicCache, Served):
    """A ``DynamicCache`` backed by a hashed, paged block store shared across ``generate()`` calls.

    Args:
        model: the causal LM this cache serves; its ``generate`` is wrapped (once, removably) so that
            ``model.generate(..., past_key_values=cache)`` reuses prefixes without further code.
        block_size: tokens per block (only full blocks are stored and reused).
        max_memory: store size in bytes or as a string ("512MiB"); or give ``num_blocks``.
        cache_salt: a namespace; caches with different salts never share blocks.
        store: an existing ``BlockStore`` to share (e.g. ``cache.store``), for a second view.
        extra_keys: a tuple hashed into every block, for anything besides tokens and PEFT adapters (which
            the namespace covers by itself) that changes K/V.
        install: wrap ``model.generate``; with ``False`` call ``prepare`` and ``commit`` yourself.
        host_memory: size of a host-RAM tier ("8GiB") that keeps blocks the device pool evicts.
        disk: a folder for a disk tier that survives restarts and may be shared by processes.
        disk_size: the most the disk folder may hold (least recently used entries go first).
        remote: a Redis/Valkey URL ("redis://host:6379/0", "rediss://user:password@host", "unix:///path")
            or a cluster's ("redis+cluster://host:7000,host:7001,host:7002", "rediss+cluster://...")
            for a tier that processes and hosts share; needs ``pip install hf_prefix_cache[redis]``.
        remote_min_tokens: a fixed rule instead of the cost model: fetch from the server exactly when it
            holds at least this many more tokens of the prompt. Default: the cost model decides per call
            from measured prefill time and link speed (``cost_model.py``; ``last_call.fetch`` says why).
        key_prefix: starts every key on the server ("hfpc"); deployments sharing one server differ here.
        remote_ttl: seconds a block stays on the server after it was last stored (default: until the
            server's ``maxmemory`` policy evicts it).
        remote_timeout: the most one round trip to the server may take, connect or read (0.25 s).
        snapshot_every: hybrid models (linear attention, SSM, short convolution): also keep the recurrent
            state every this many blocks inside a long prompt (default 32; 0 or None: only at the last
            block boundary of each prompt and each reply). See ``checkpoints.py``.
        snapshot_memory: hybrid models: the part of ``max_memory`` state snapshots may take (default a
            quarter); the rest holds K/V blocks.
        tier_secret: a secret (at least 16 bytes; default ``$HF_PREFIX_CACHE_TIER_SECRET``) that
            authenticates every disk and remote entry with a MAC: entries without a valid one (forged by
            anyone who can write the folder or server, or written with another or no secret) are misses.
        policy: which unreferenced block is evicted first: ``"retain"`` (default: leaves of the most
            recently finished conversation first, shared prefixes last) or ``"lru"`` (``eviction.py``).
        max_pinned: the most ``pin()`` may hold, in bytes or as a string ("256MiB"); default half the pool.
        **tier_options: the arguments of a tier kind added to ``hf_prefix_cache.tiers.registry.KINDS``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        block_size: int | None = None,
        max_memory: int | str | None = None,
        num_blocks: int | None = None,
        cache_salt: str | None = None,
        store: BlockStore | None = None,
        extra_keys: tuple[Hashable, ...] = (),
        install: bool = True,
        host_memory: int | str | None = None,
        disk: str | os.PathLike | None = None,
        disk_size: int | str | None = None,
        remote: str | None = None,
        remote_min_tokens: int | None = None,
        key_prefix: str | None = None,
        remote_ttl: float | None = None,
        remote_timeout: float | None = None,
        tier_secret: str | bytes | None = None,
        snapshot_every: int | None = checkpoints.DEFAULT_SNAPSHOT_EVERY,
        snapshot_memory: int | str | None = None,
        policy: str | None = None,
        max_pinned: int | str | None = None,
        **tier_options,
    ):
        self.model = model
        self._warned: set[str] = set()  # fallback messages already shown: each is shown once
        self._ownership = Ownership()  # the thread serving the call in flight (between prepare and release)
        self._verified_call: CallState | None = None  # the call whose K/V were seen coming from self.model
        self.cache_salt = cache_salt
        self.extra_keys = extra_keys_tuple(extra_keys)
        self.snapshot_every = positive_int("snapshot_every", snapshot_every, "32") if snapshot_every else None
        store_config = StoreConfig.checked(store, block_size, max_memory, num_blocks, snapshot_memory, policy)
        tiers = TierConfig.checked(
            host_memory=host_memory,
            disk=disk,
            disk_size=disk_size,
            remote=remote,
            remote_min_tokens=remote_min_tokens,
            key_prefix=key_prefix,
            remote_ttl=remote_ttl,
            remote_timeout=remote_timeout,
            tier_secret=tier_secret,
            **tier_options,
        )
        self.fallback: str | None = unsupported_reason(model)
        self.store: BlockStore | None = None
        layers = None
        if self.fallback is None:
            try:
                layouts, confirmed = model_layouts(model, probe=tiers.wanted)
            except UnsupportedLayout as error:
                self.fallback = str(error)
            else:
                self.store = build_store(layouts, confirmed, store_config, tiers)
                layers = prefix_layers(layouts)
                if max_pinned is not None:
                    self.store.pins.max_bytes = parse_bytes(max_pinned, "max_pinned")
                if self.store.tiers is not None:  # the cost model's prior: this model's FLOPs, its device
                    self.store.tiers.cost.set_model(*model_costs(model))
        if layers is None:
            layers = DynamicCache(config=model.config.get_text_config(decoder=True)).layers
            self.warn_once(REUSE_OFF.format(self.fallback))
        Cache.__init__(self, layers=layers)
        # the first layer given K/V in a forward (a hybrid model's layer 0 may keep only recurrent state)
        self._first_kv_layer = next((i for i, x in enumerate(layers) if getattr(x, "holds_kv", True)), 0)
        self._identity = Identity(model, self.cache_salt, self.extra_keys)
        self._dtypes_and_devices = self._identity.watch.dtypes_and_devices()
        if self.store is not None and self.store.tiers is not None:
            # hash the weights now, beside the probe forward tiers already run here: a restarted process
            # is warm from the tiers on its first call, which should not also pay for the fingerprint
            self._identity.namespace  # noqa: B018
        self._call: CallState | None = None
        self._counters = Counters(self.store)
        if install:
            install_generate(model)

    # -- identity ----------------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.store.block_size if self.store else 0

    @property
    def namespace(self) -> str:
        """Model fingerprint (a digest of every weight), attention implementation, salt and active PEFT
        adapters; the fingerprint is recomputed when the weights were replaced, cast, moved or written."""
        return self._identity.namespace

    @property
    def is_compileable(self) -> bool:
        """True only during a call whose decode steps should get a mask (``decode_masks.py``): transformers
        builds one for a single-query step only for a cache that reports this. The cache is never compiled."""
        call = self._call
        return call is not None and call.decode_masks and long_enough(self.get_seq_length())

    def stale_reason(self) -> str | None:
        """Why stored K/V cannot be used with the model as it is now (its dtype or device changed)."""
        if self.store is not None and self._identity.watch.dtypes_and_devices() != self._dtypes_and_devices:
            return STALE
        return None

    def block_hashes(self, tokens: Sequence[int]) -> list[bytes]:
        """Chained hashes of the full blocks of ``tokens`` in this cache's namespace."""
        return self._identity.block_hashes(self.namespace, tokens, self.block_size)

    # -- one call ----------------------------------------------------------------------------------
    def prepare(
        self,
        input_ids,
        attention_mask=None,
        *,
        num_expand: int = 1,
        max_new_tokens: int | None = None,
        logits_to_keep: int = 1,
        priority: int | Sequence[int] | None = None,
    ) -> PrefixCache:
        """Fill this cache with the longest stored prefix of ``input_ids`` and return it.

        Pass the same ``input_ids``/``attention_mask`` to ``generate()`` next; ``num_expand`` is
        ``max(num_beams, num_return_sequences)``; ``max_new_tokens`` sizes the layer buffers up front
        (without it they grow by doubling). ``logits_to_keep``: the last this many prompt tokens are
        always computed, since their logits are wanted (a scoring call, ``scoring.py``). ``priority``:
        the retention priority of the blocks this call hits and stores, an int or one int per prompt token
        (``role_priorities``); lower priorities are evicted first (``priorities.py``). Call ``commit``
        (or ``release``) afterwards.
        """
        started = time.perf_counter()
        try:
            self._ownership.claim()
            self._drop_call()
            if (reason := self.stale_reason()) is not None:
                raise RuntimeError(reason)
            ids = as_batch(input_ids)
            mask = as_batch(attention_mask) if attention_mask is not None else None
            rows = split_rows(ids, mask)
            if self.store is None:
                self._counters.record(rows, 0, self.block_size)
                return self
            size = self.block_size
            call = self._call = CallState(self.namespace, rows, ids.shape[1], num_expand)
            call.priority = priorities.checked(priority, len(rows), ids.shape[1])
            call.prompt_ids = ids.tolist()
            device_types = {layout.device.type for layout in self.store.layouts}
            call.off_default = off_default(self.model, device_types)
            call.decode_masks = wants_decode_masks(self.model, device_types)
            reserve_room(self.layers, ids.shape[1], max_new_tokens)
            sources: list[list[str]] = [[] for _ in rows]  # the tier of each hit block, per row
            plans: list[dict] = []  # the cost model's decision, per row that lower tiers could extend
            for row, row_sources in zip(rows, sources):
                row.hashes = self._identity.block_hashes(call.namespace, row.tokens, size)
                # the last prompt token(s) are always computed; off the default nothing stored fits the call
                usable = 0 if call.off_default else max(0, len(row.tokens) - max(1, logits_to_keep)) // size
                found = self.store.match(call.namespace, row.tokens, row.hashes, usable, self.extra_keys)
                row.hits = found.blocks
                row_sources.extend(found.sources)
                plans.extend(plan.as_dict() for plan in found.plans)
                if call.priority is not None:
                    self.store.prioritize(
                        row.hits, priorities.block_levels(call.priority, len(row.hits), size)
                    )
            hits = None
            if self.store.stateful:  # restart rows from snapshots, compute up to where states are wanted
                if call.off_default:  # nothing stored fits the call and nothing of it will be stored
                    hits, call.loaded = [0] * len(rows), 0
                else:
                    hits = checkpoints.prepare_rows(self, call, logits_to_keep, self.fresh_layers)
                    call.recorder = checkpoints.StateRecorder(self, call)
            else:
                call.loaded = min(row.pad + len(row.hits) * size for row in rows)
                if call.loaded > 0:
                    place_prefix(self.layers, self.store, call)
        except BaseException:
            self.release_if_mine()
            raise
        self._counters.record(rows, call.loaded, size, sources, hits)
        self.last_call.fetch = plans
        self.last_call.lookup_s = time.perf_counter() - started
        return self

    def commit(
        self, sequences: torch.Tensor | None = None, *, eos_token_id=None, pad_token_id=None
    ) -> CallStats:
        """Store the prompt's blocks (and the reply's, given ``generate()``'s ``sequences``), then release.

        Rows that stopped early keep their reply up to the stop token; padding is never stored.
        ``sequences`` that do not start with the prepared prompt, row for row, belong to another call:
        nothing is stored (counted in ``stats.refused_calls``).
        """
        self._ownership.check()
        call, stats = self._call, self.last_call
        started = time.perf_counter()
        if call is not None and self.store is not None and self.store.tiers is not None:
            call.timing.report(self.store.tiers.cost, call.loaded)
        try:
            if call is not None and self.store is not None and not call.rows_changed:
                sequences, problem = as_sequences(sequences)
                if problem is None and sequences is not None:
                    problem = prompt_mismatch(call, sequences)
                if problem is None:
                    replies = replies_of(call, sequences, *self._stop_and_pad(eos_token_id, pad_token_id))
                    slots = captured_slots(self.layers, call)
                    verified = self._verified_call is call
                    problem = unstorable(
                        call, slots, sequences if replies else None, verified, self.namespace
                    )
                if problem is None and isinstance(slots, int) and slots > call.loaded:
                    problem, for_good = layout_problem(self.layers, self.store, self.model)
                    if for_good:
                        self._fall_back(problem)
                if problem is not None:
                    if self.store is not None:  # else the call just turned prefix reuse off, and said so
                        self._refuse(problem)
                elif slots > call.loaded or call.pending:  # prepare() then commit() alone stores nothing new
                    before = self.store.pool.num_cached
                    on_chain = None
                    if call.recorder is not None:
                        call.recorder.take()  # the prompt's end, if no decode step came after the prefill

                        def on_chain(source, chain, tokens):
                            checkpoints.store_row_states(self, call, source, chain, tokens)

                    record_call(self.layers, self.store, call, replies, slots, self.extra_keys, on_chain)
                    stats.stored_blocks = max(0, self.store.pool.num_cached - before)
        finally:
            self.release()
            stats.store_s = time.perf_counter() - started
        return stats

    # -- scoring calls (scoring.py) ----------------------------------------------------------------
    def score(self, input_ids, attention_mask=None, *, logits_to_keep: int = 1) -> torch.Tensor:
        """Logits of the last ``logits_to_keep`` positions from one forward pass that reuses the longest
        stored prefix and stores the sequence (``hf_prefix_cache.scoring.score``)."""
        return scoring.score(self, input_ids, attention_mask, logits_to_keep=logits_to_keep)

    def continuation_logprobs(self, context, continuation) -> scoring.Continuation:
        """Log-probs of ``continuation`` ids after ``context`` ids (``scoring.continuation_logprobs``)."""
        return scoring.continuation_logprobs(self, context, continuation)

    def fresh_layers(self) -> list:
        """Layers for computing one row alone (hybrid models, ``checkpoints.prepare_rows``)."""
        return prefix_layers(self.store.layouts)

    @property
    def current_call(self) -> CallState | None:
        """The call in flight (between ``prepare`` and ``release``), if any."""
        return self._call

    # -- turning reuse off ------------------------------------------------------------------------
    def _fall_back(self, reason: str) -> None:
        """Turn prefix reuse off for good: every later call recomputes (a first call found the reason)."""
        self.fallback, self.store = reason, None
        self.warn_once(REUSE_OFF.format(reason))

    def _refuse(self, problem: str) -> None:
        self._counters.record_refusal(problem)
        logger.info("PrefixCache stored nothing from a call: %s", problem)
        self.warn_once(
            "PrefixCache: stored nothing from a call whose K/V it cannot vouch for ("
            f"{problem}); counted in cache.stats.refused_calls, warned once",
            key="refused",
        )

    def release(self) -> None:
        """Drop this call's block references and K/V; the store keeps what was committed."""
        self._ownership.check()
        try:
            self._drop_call()
        finally:
            self._ownership.end()

    def _drop_call(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.recorder is not None:
            call.recorder.close()
        if call is not None and self.store is not None:
            for row in call.rows:
                hits, row.hits = row.hits, []
                self.store.release(hits)
        for layer in self.layers:
            layer.reset()

    # -- the generate() wrapper (generation.py) ---------------------------------------------------
    def generating_here(self) -> bool:
        return self._ownership.generating_here()

    def recompute_call(self, reason: str, input_ids) -> None:
        self.warn_once(f"PrefixCache: {reason}; this call recomputes the whole prompt without the cache")
        self._count_fallback(input_ids)

    def start_generate(self, decode_masks: bool) -> None:
        if not decode_masks and self._call is not None:
            self._call.decode_masks = False
        self._ownership.generating = True

    def release_if_mine(self) -> None:
        if self._ownership.mine():
            self.release()

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx == self._first_kv_layer:
            self._ownership.check()
            call = self._call
            if call is not None:
                call.timing.forward(key_states.shape[0] * key_states.shape[-2])
            if call is None and self.store is not None and inside_generate():
                raise RuntimeError(unprepared(self.model))
            if call is not None and self._verified_call is not call:
                check_module(self.model, calling_module())
                self._verified_call = call
            if (
                call is not None
                and not call.off_default
                and torch.is_autocast_enabled(key_states.device.type)
            ):
                call.off_default = UNDER_AUTOCAST
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _stop_and_pad(self, eos_token_id, pad_token_id) -> tuple[set[int], int | None]:
        config = self.model.generation_config
        eos = eos_token_id if eos_token_id is not None else config.eos_token_id
        stop_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        return stop_ids, pad_token_id if pad_token_id is not None else config.pad_token_id

    # -- generate() integration ------------------------------------------------------------------
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self._call is not None:
            self._call.rows_reordered = True
        super().reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._call is not None:
            self._call.rows_changed = True
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._call is not None:
            self._call.rows_changed = True
        super().batch_select_indices(indices)

    def crop(self, max_length: int) -> None:
        if self._call is not None:
            self._call.rows_changed = True
        super().crop(max_length)

    # -- inspection --------------------------------------------------------------------------------
    def explain(self, prompt, tokenizer=None) -> HitReport:
        """Where ``prompt`` (ids, a 1-row tensor, or text with ``tokenizer``) stops hitting the store.

        Read-only: no references are kept and the counters do not move.
        """
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError("pass tokenizer= to explain a text prompt, or pass its token ids")
            # with the special tokens tokenizer(text) adds (BOS...) and without (text from a chat template
            # already holds them): the reading that matches the store further is the one generate() saw
            readings = [tokenizer(prompt, add_special_tokens=add)["input_ids"] for add in (True, False)]
            reports = [self.explain(tokens, tokenizer) for tokens in readings]
            return max(reports, key=lambda report: report.matched_tokens)
        if isinstance(prompt, (list, tuple)) and not prompt:
            tokens = []
        else:
            batch = as_batch(prompt)
            if batch.shape[0] != 1:
                raise ValueError(
                    f"explain() takes one prompt, got a batch of {batch.shape[0]}; pass one row, e.g. input_ids[i]"
                )
            tokens = batch[0].tolist()
        pieces = [tokenizer.decode([t]) for t in tokens] if tokenizer is not None else None
        if self.store is None or not tokens:
            return HitReport(tokens, 0, 0, self.block_size, pieces)
        namespace = self.namespace
        hashes = self._identity.block_hashes(namespace, tokens, self.block_size)
        return stored_prefix(self.store, namespace, tokens, hashes, self.extra_keys, pieces)

    # -- retention (pinning.py) ---------------------------------------------------------------------
    def pin(self, prompt, tokenizer=None, ttl: float | None = None) -> int:
        """Keep the full blocks of ``prompt`` (ids, a 1-row tensor, or text with ``tokenizer``) from
        eviction until ``unpin(prompt)``, ``ttl`` seconds, or ``clear()``; blocks not stored yet are
        computed first (one forward pass). Returns the tokens pinned. Over ``max_pinned``: ValueError."""
        return pin_prefix(self, prompt, tokenizer, ttl)

    def unpin(self, prompt, tokenizer=None) -> bool:
        """Release the pin of ``prompt``; False (a no-op) when it is not pinned (never, expired, cleared)."""
        return unpin_prefix(self, prompt, tokenizer)

    # -- stats -------------------------------------------------------------------------------------
    @property
    def last_call(self) -> CallStats:
        """Tokens and timings of the last call (also returned by ``commit``)."""
        return self._counters.last_call

    def _count_fallback(self, input_ids) -> None:
        """A call recomputed without the cache: it reused nothing (the counters say so)."""
        self._counters.record_fallback(int(input_ids.numel()) if isinstance(input_ids, torch.Tensor) else 0)

    def reset_stats(self) -> None:
        """Zero the counters (the store's gauges are unaffected)."""
        self._counters.reset(self.store)

    @property
    def counters(self) -> Counters:
        """The call totals behind ``stats`` (``attach`` sums those of its views into them)."""
        return self._counters

    @counters.setter
    def counters(self, counters: Counters) -> None:
        self._counters = counters

    @property
    def stats(self) -> CacheStats:
        return self._counters.snapshot(self.store, self.block_size, self.fallback)

    def clear(self) -> int:
        """Drop every stored block of the store (shared views included), e.g. after a weight update.

        Safe while other views serve calls: blocks they hold are forgotten now and freed when released.
        With tiers: the host tier is emptied too, and the disk tier loses this cache's namespace (model,
        weights, salt, extra keys). Disk entries of other namespaces stay: other models or processes may
        be using them; they age out under ``disk_size``. Returns the number of device blocks dropped.
        """
        self.release_if_mine()
        if self._ownership.owner is None:  # another thread's call in flight keeps using this view's buffers
            for layer in self.layers:
                if isinstance(layer, PrefixLayer):  # not the plain layers of a model that falls back
                    layer.release_buffers()
        if self.store is None:
            return 0
        dropped = self.store.clear()  # pins too (logged as a warning when there were some)
        if self.store.tiers is not None:
            self.store.tiers.clear(self.store.tiers.namespace(self.namespace, self.extra_keys))
        fingerprint.forget(self.model)  # the next call hashes every weight again (every view of the model)
        adapters.forget(self.model)
        return dropped

    def flush(self, timeout: float | None = None) -> bool:
        """Block until queued disk writes are durable (or ``timeout`` seconds pass: then False)."""
        if self.store is None or self.store.tiers is None:
            return True
        return self.store.tiers.flush(timeout)

    def warn_once(self, message: str, key: str | None = None) -> None:
        if (key or message) not in self._warned:
            self._warned.add(key or message)
            warnings.warn(message, PrefixCacheFallbackWarning, stacklevel=3)

    def __repr__(self) -> str:
        return f"PrefixCache({self.stats})"

    def _repr_html_(self) -> str:
        return self.stats._repr_html_()

    def __getstate__(self) -> Any:
        raise TypeError("a PrefixCache holds a live block store and cannot be pickled or deep-copied")
