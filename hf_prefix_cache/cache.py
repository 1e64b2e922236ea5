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

from .call_state import CallState, place_prefix
from .explain import HitReport, matched_length
from .fingerprint import WeightsWatch, model_fingerprint
from .hashing import hash_blocks, root_hash
from .layers import PrefixFullLayer, PrefixSlidingLayer
from .layout import UnsupportedLayout, probe_layout
from .prompt_rows import PromptRow, as_batch, split_rows
from .recording import record_call, replies_of
from .stats import CacheStats, CallStats
from .store import BlockStore
from .support import unsupported_reason
from .tiers.setup import make_tiers, remote_tier_options

logger = logging.getLogger(__name__)


class PrefixCacheFallbackWarning(UserWarning):
    """The cache is recomputing everything instead of reusing a prefix, and says why."""


class PrefixCache(DynamicCache):
    """A ``DynamicCache`` backed by a hashed, paged block store shared across ``generate()`` calls.

    Args:
        model: the causal LM this cache serves; its ``generate`` is wrapped (once, removably) so that
            ``model.generate(..., past_key_values=cache)`` reuses prefixes without further code.
        block_size: tokens per block (only full blocks are stored and reused).
        max_memory: store size in bytes or as a string ("512MiB"); or give ``num_blocks``.
        cache_salt: a namespace; caches with different salts never share blocks.
        store: an existing ``BlockStore`` to share (e.g. ``cache.store``), for a second view.
        extra_keys: hashed into every block, for anything besides tokens that changes K/V (an adapter).
        install: wrap ``model.generate``; with ``False`` call ``prepare`` and ``commit`` yourself.
        host_memory: size of a host-RAM tier ("8GiB") that keeps blocks the device pool evicts.
        disk: a folder for a disk tier that survives restarts and may be shared by processes.
        disk_size: the most the disk folder may hold (least recently used entries go first).
        remote: a Redis/Valkey URL ("redis://host:6379/0", "rediss://user:password@host", "unix:///path")
            for a tier that processes and hosts share; needs ``pip install hf_prefix_cache[redis]``.
        remote_min_tokens: fetch from the server only when it holds at least this many more tokens
            of the prompt (default 32): a short remote hit costs more than recomputing it.
        key_prefix: starts every key on the server ("hfpc"); deployments sharing one server differ here.
        remote_ttl: seconds a block stays on the server after it was last stored (default: until the
            server's ``maxmemory`` policy evicts it).
        remote_timeout: the most one round trip to the server may take, connect or read (0.25 s).
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
    ):
        self.model = model
        self._warned: set[str] = set()  # fallback messages already shown: each is shown once
        self.cache_salt = cache_salt
        self.extra_keys = tuple(extra_keys)
        self.fallback: str | None = unsupported_reason(model)
        self.store: BlockStore | None = None
        layers = None
        if self.fallback is None:
            try:
                layouts = probe_layout(model)
            except UnsupportedLayout as error:
                self.fallback = str(error)
            else:
                self.store = self._resolve_store(layouts, store, block_size, max_memory, num_blocks)
                remote_options = remote_tier_options(
                    remote,
                    min_tokens=remote_min_tokens,
                    key_prefix=key_prefix,
                    ttl=remote_ttl,
                    timeout=remote_timeout,
                )
                if host_memory is not None or disk is not None or disk_size is not None or remote is not None:
                    if store is not None:
                        raise ValueError(
                            "tiers belong to the store: pass host_memory=/disk=/remote= to the first "
                            "PrefixCache, and store=cache.store to the others"
                        )
                    self.store.attach_tiers(
                        make_tiers(layouts, host_memory, disk, disk_size, remote, **remote_options)
                    )
                layers = [
                    PrefixSlidingLayer(layout.sliding_window) if layout.sliding_window else PrefixFullLayer()
                    for layout in layouts
                ]
        if layers is None:
            layers = DynamicCache(config=model.config.get_text_config(decoder=True)).layers
            self._warn(
                f"prefix reuse is off for this model: {self.fallback}; it will be recomputed every call"
            )
        Cache.__init__(self, layers=layers)
        self._watch = WeightsWatch(model)
        self._dtypes_and_devices = self._watch.dtypes_and_devices()
        self._namespace = ""
        self._call: CallState | None = None
        self.last_call = CallStats()
        self.reset_stats()
        if install:
            from .hook import install as install_hook

            install_hook(model)

    @staticmethod
    def _resolve_store(layouts, store, block_size, max_memory, num_blocks) -> BlockStore:
        if store is None:
            return BlockStore.sized(
                layouts, block_size=block_size or 16, max_memory=max_memory, num_blocks=num_blocks
            )
        if not store.compatible_with(layouts):
            raise ValueError(
                "this store was built for a model with other K/V shapes or dtypes; make a new one"
            )
        if block_size is not None and block_size != store.block_size:
            raise ValueError(f"block_size={block_size} differs from the shared store's {store.block_size}")
        return store

    # -- identity ----------------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.store.block_size if self.store else 0

    @property
    def namespace(self) -> str:
        """Model fingerprint plus salt; recomputed when the weights were replaced, cast, moved or written."""
        if self._watch.changed():
            known = bool(self._namespace)
            self._namespace = f"{model_fingerprint(self.model)}/{self.cache_salt or ''}"
            if known:
                logger.info("model weights changed: earlier blocks will no longer match")
        return self._namespace

    def stale_reason(self) -> str | None:
        """Why stored K/V cannot be used with the model as it is now (its dtype or device changed)."""
        if self.store is not None and self._watch.dtypes_and_devices() != self._dtypes_and_devices:
            return "the model's dtype or device changed after this PrefixCache was made; create a new one"
        return None

    def block_hashes(self, tokens: Sequence[int]) -> list[bytes]:
        """Chained hashes of the full blocks of ``tokens`` in this cache's namespace."""
        return hash_blocks(root_hash(self.namespace), tokens, self.block_size, self.extra_keys)

    # -- one call ----------------------------------------------------------------------------------
    def prepare(self, input_ids, attention_mask=None, *, num_expand: int = 1) -> PrefixCache:
        """Fill this cache with the longest stored prefix of ``input_ids`` and return it.

        Pass the same ``input_ids``/``attention_mask`` to ``generate()`` next; ``num_expand`` is
        ``max(num_beams, num_return_sequences)``. Call ``commit`` (or ``release``) afterwards.
        """
        started = time.perf_counter()
        self.release()
        if (reason := self.stale_reason()) is not None:
            raise RuntimeError(reason)
        ids = as_batch(input_ids)
        mask = as_batch(attention_mask) if attention_mask is not None else None
        rows = split_rows(ids, mask)
        if self.store is None:
            self._count(rows, loaded=0)
            return self
        size = self.block_size
        call = self._call = CallState(self.namespace, rows, ids.shape[1], num_expand)
        sources: list[list[str]] = [[] for _ in rows]  # the tier of each hit block, per row
        try:
            for row, row_sources in zip(rows, sources):
                row.hashes = hash_blocks(call.root, row.tokens, size, self.extra_keys)
                usable = (len(row.tokens) - 1) // size  # the last prompt token is always computed
                row.hits = self.store.match(
                    call.namespace, row.tokens, row.hashes, usable, self.extra_keys, row_sources
                )
            call.loaded = min(row.pad + len(row.hits) * size for row in rows)
            if call.loaded > 0:
                place_prefix(self.layers, self.store, call)
        except BaseException:
            self.release()
            raise
        self._count(rows, call.loaded, sources)
        self.last_call.lookup_s = time.perf_counter() - started
        return self

    def commit(
        self, sequences: torch.Tensor | None = None, *, eos_token_id=None, pad_token_id=None
    ) -> CallStats:
        """Store the prompt's blocks (and the reply's, given ``generate()``'s ``sequences``), then release.

        Rows that stopped early keep their reply up to the stop token; padding is never stored.
        """
        call, stats = self._call, self.last_call
        started = time.perf_counter()
        try:
            computed = call is not None and self.get_seq_length() >= call.width  # the prompt went through
            if computed and self.store is not None and not call.rows_changed:
                before = self.store.pool.num_cached
                replies = replies_of(call, sequences, *self._stop_and_pad(eos_token_id, pad_token_id))
                record_call(self.layers, self.store, call, replies, self.get_seq_length(), self.extra_keys)
                stats.stored_blocks = max(0, self.store.pool.num_cached - before)
        finally:
            self.release()
            stats.store_s = time.perf_counter() - started
        return stats

    def release(self) -> None:
        """Drop this call's block references and K/V; the store keeps what was committed."""
        call, self._call = self._call, None
        if call is not None and self.store is not None:
            for row in call.rows:
                self.store.release(row.hits)
                row.hits = []
        for layer in self.layers:
            layer.reset()

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
            tokens = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            tokens = as_batch(prompt)[0].tolist()
        pieces = [tokenizer.decode([t]) for t in tokens] if tokenizer is not None else None
        if self.store is None:
            return HitReport(tokens, 0, 0, 0, pieces)
        size, namespace = self.block_size, self.namespace
        hashes = hash_blocks(root_hash(namespace), tokens, size, self.extra_keys)
        blocks = self.store.match(namespace, tokens, hashes, len(hashes), self.extra_keys)
        try:
            parent_ref = blocks[-1].ref if blocks else ("root", namespace)
            with self.store.lock:
                children = [b.key[1] for b in self.store.pool.table.values() if b.key[0] == parent_ref]
        finally:
            self.store.release(blocks)
        matched = len(blocks) * size + matched_length(children, tokens[len(blocks) * size :])
        hit = min(len(blocks), (len(tokens) - 1) // size) * size
        return HitReport(tokens, hit, matched, size, pieces)

    # -- stats -------------------------------------------------------------------------------------
    def _count(self, rows: list[PromptRow], loaded: int, sources: list[list[str]] | None = None) -> None:
        prompt = sum(len(row.tokens) for row in rows)
        hit = sum(max(0, loaded - row.pad) for row in rows)
        self.last_call = CallStats(prompt_tokens=prompt, hit_tokens=hit, computed_tokens=prompt - hit)
        size = self.block_size
        for row, row_sources in zip(rows, sources or []):
            used = max(0, loaded - row.pad)  # tokens of this row actually placed, block by block
            for index, tier in enumerate(row_sources):
                tokens = min(size, used - index * size)
                if tokens <= 0:
                    break
                self.last_call.hit_tokens_by_tier[tier] = (
                    self.last_call.hit_tokens_by_tier.get(tier, 0) + tokens
                )
                self._hit_tokens_by_tier[tier] = self._hit_tokens_by_tier.get(tier, 0) + tokens
        self._calls += 1
        self._prompt_tokens += prompt
        self._hit_tokens += hit

    def reset_stats(self) -> None:
        """Zero the counters (the store's gauges are unaffected)."""
        self._calls = self._prompt_tokens = self._hit_tokens = 0
        self._hit_tokens_by_tier: dict[str, int] = {}
        self._evictions_at_reset = self.store.pool.evictions if self.store else 0

    @property
    def stats(self) -> CacheStats:
        pool = self.store.pool if self.store else None
        tiers = self.store.tiers if self.store else None
        return CacheStats(
            calls=self._calls,
            prompt_tokens=self._prompt_tokens,
            hit_tokens=self._hit_tokens,
            computed_tokens=self._prompt_tokens - self._hit_tokens,
            hit_rate=self._hit_tokens / self._prompt_tokens if self._prompt_tokens else 0.0,
            stored_blocks=pool.num_cached if pool else 0,
            free_blocks=pool.num_blocks - pool.num_cached if pool else 0,
            num_blocks=pool.num_blocks if pool else 0,
            block_size=self.block_size,
            evictions=pool.evictions - self._evictions_at_reset if pool else 0,
            used_bytes=self.store.used_bytes if self.store else 0,
            capacity_bytes=self.store.capacity_bytes if self.store else 0,
            fallback=self.fallback,
            hit_tokens_by_tier=self._tier_hits(),
            tier_errors=tiers.errors if tiers else 0,
            tiers=tiers.counters() if tiers else {},
        )

    def _tier_hits(self) -> dict[str, int]:
        names = ["device"] + (
            [t.name for t in self.store.tiers.tiers] if self.store and self.store.tiers else []
        )
        return {name: self._hit_tokens_by_tier.get(name, 0) for name in names}

    def clear(self) -> int:
        """Drop every stored block of the store (shared views included), e.g. after a weight update.

        With tiers: the host tier is emptied too, and the disk tier loses this cache's namespace (model,
        weights, salt, extra keys). Disk entries of other namespaces stay: other models or processes may
        be using them; they age out under ``disk_size``. Returns the number of device blocks dropped.
        """
        self.release()
        if self.store is None:
            return 0
        dropped = self.store.clear()
        if self.store.tiers is not None:
            self.store.tiers.clear(self.store.tiers.namespace(self.namespace, self.extra_keys))
        return dropped

    def flush(self, timeout: float | None = None) -> bool:
        """Block until queued disk writes are durable (or ``timeout`` seconds pass: then False)."""
        if self.store is None or self.store.tiers is None:
            return True
        return self.store.tiers.flush(timeout)

    def _warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, PrefixCacheFallbackWarning, stacklevel=3)

    def __repr__(self) -> str:
        return f"PrefixCache({self.stats})"

    def _repr_html_(self) -> str:
        return self.stats._repr_html_()

    def __getstate__(self) -> Any:
        raise TypeError("a PrefixCache holds a live block store and cannot be pickled or deep-copied")
