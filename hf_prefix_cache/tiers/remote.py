"""The remote tier: one Redis (or Valkey) server, or a Redis Cluster, that many processes and hosts
share as a prefix cache.

- **Keys** are ``<key_prefix>:<namespace digest hex>:<block hash hex>`` (about 70 bytes, never Python
  ``hash()``): the namespace digest covers model fingerprint, salt, layout, block size and format, so
  other models, weights or tenants never meet; ``key_prefix`` separates deployments on one server.
- **Values** are the same verified entry as the disk tier (``entry.encode``): one value per block, header
  and payload together, so a reader sees a whole entry or none. A value that fails verification (garbage,
  another chain's entry, a truncated write, a value of the wrong size, checked from its length before
  any checksum work) is a miss and the key is deleted. With a ``tier_secret`` every value carries a MAC,
  and one without a valid MAC (forged by anyone able to write to the server) is such a bad value.
- **Writes** are asynchronous write-through on a background thread fed by a bounded queue (full: the
  write is dropped and counted). The writer asks the server which keys already exist (one pipelined
  ``EXISTS`` per batch) and sends only the others, with an optional TTL. Run the server with
  ``maxmemory`` and ``allkeys-lru`` so it evicts instead of refusing writes.
- **Reads** take two round trips for the rest of a chain: pipelined ``EXISTS`` to find how many leading
  blocks the server holds (``lookup``), then ``MGET`` of those in batches (``stream``; where the store
  overlaps reads, it places one batch while a prefetch thread receives the next). Whether to fetch them at all is the cost
  model's decision (``hf_prefix_cache.cost_model``: a slow link recomputes instead); ``min_tokens``,
  when given, overrides it with a fixed threshold: hits shorter than that are not fetched.
- **Failures** (server down, timeout, connection reset, AUTH, out of memory): every call keeps working
  and recomputes. Each failure is counted and warned about once per kind; after a connection failure the
  tier stays off for a back-off (``backoff_s`` doubling up to ``max_backoff_s``) and then reconnects. A
  command waits at most ``timeout`` seconds per round trip (connect and read), so ``generate()`` never
  hangs on a dead or stalled server.

- **Cluster** (``redis+cluster://host:port,host:port,...``): the same keys, values and reads through
  ``cluster.ClusterClient`` (one pipeline per node, replies merged in chain order); a failed node is a
  miss for its own blocks only, with its own back-off (see ``cluster.py``).

``redis`` (redis-py) is an optional dependency: ``pip install hf_prefix_cache[redis]``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..layout import LayerLayout
from ..memory import parse_bytes
from .base import BlockData, BlockRequest, Tier, TierCounters
from .clients import ServerClient, _redact, import_redis
from .cluster import ClusterClient, is_cluster_url
from .entry import EntryError, TierKey, decode, encode
from .kind import TierKind
from .state_entry import decode_state, encode_state
from .writer import EXIT_FLUSH_S, BackgroundWriter

logger = logging.getLogger(__name__)

DEFAULT_KEY_PREFIX = "hfpc"
DEFAULT_TIMEOUT_S = 0.25
DEFAULT_QUEUE_BYTES = "512MiB"  # CPU copies waiting for the writer: a 2000-token SmolLM2 prompt is 90 MB
FETCH_BATCH = 32  # blocks per MGET of ``get``: bounds one reply (32 SmolLM2 blocks are about 23 MiB)
WRITE_BATCH = 16  # blocks per writer round trip
KNOWN_LIMIT = 65536  # keys this process remembers as present on the server
KEY_PREFIX_PATTERN = re.compile(r"[A-Za-z0-9_.:/@-]{1,64}")


@dataclass
class RemoteCounters(TierCounters):
    """The tier counters plus what only a network tier has."""

    unavailable: int = 0  # lookups and writes skipped while the tier is off after a failure (back-off)
    below_threshold: int = 0  # lookups whose remote hit was shorter than min_tokens (not fetched)
    round_trips: int = 0  # lookup round trips (EXISTS pipelines and MGETs)
    read_s: float = 0.0  # seconds waiting for MGET replies (the achieved throughput is bytes_read / read_s)
    write_s: float = 0.0  # seconds the writer spent checking, encoding and sending values


class RemoteTier(Tier):
    """Blocks on a Redis/Valkey server at ``url`` (``redis://``, ``rediss://`` for TLS,
    ``redis://user:password@host`` for AUTH, ``unix:///path/redis.sock``), or on a cluster
    (``redis+cluster://[user:password@]host:port,host:port``, ``rediss+cluster://`` for TLS)."""

    name = "remote"
    cost_decided = True

    def __init__(
        self,
        url: str,
        layouts: list[LayerLayout],
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        min_tokens: int | None = None,
        ttl: float | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_queued_blocks: int = 4096,
        max_queued_bytes: int | str = DEFAULT_QUEUE_BYTES,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        key: TierKey | None = None,
    ):
        super().__init__()
        if not isinstance(key_prefix, str) or not KEY_PREFIX_PATTERN.fullmatch(key_prefix):
            raise ValueError(
                f"key_prefix={key_prefix!r}: use 1-64 characters of letters, digits and _.:/@- "
                "(it starts every key, and glob characters would break clear())"
            )
        if min_tokens is not None and min_tokens < 0:
            raise ValueError(f"remote_min_tokens={min_tokens} must be >= 0")
        if ttl is not None and ttl <= 0:
            raise ValueError(f"remote_ttl={ttl} must be positive seconds (or None: no expiry)")
        if timeout <= 0:
            raise ValueError(f"remote_timeout={timeout} must be positive seconds")
        redis = import_redis()
        self.counters = RemoteCounters()
        self.layouts = layouts
        self.mac_key = key  # MAC key of the tier_secret (entries are authenticated with it); never shown
        self.key_prefix = key_prefix
        self.min_tokens = min_tokens
        self.ttl_ms = None if ttl is None else max(1, int(ttl * 1000))
        self.timeout = timeout
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._redis_errors = (redis.exceptions.RedisError, OSError)
        self._connection_errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
        self.url = _redact(url)
        self._next_try = 0.0  # monotonic time before which the tier stays off
        self._delay = backoff_s
        self._state_lock = threading.Lock()
        self._known: OrderedDict[tuple[bytes, bytes], None] = OrderedDict()
        # One server (redis://) or a cluster (redis+cluster://): the same operations (clients.py).
        self.client = connect(
            url, timeout=timeout, backoff_s=backoff_s, max_backoff_s=max_backoff_s, report=self._node_failed
        )
        self.writer = BackgroundWriter(
            lambda batch: self._write(batch),
            lambda error: self.error("writer", f"write failed ({error!r})"),
            name="hf_prefix_cache-remote",
            max_items=max_queued_blocks,
            max_bytes=parse_bytes(max_queued_bytes, "max_queued_bytes"),
            batch=WRITE_BATCH,
        )
        self._closed = False

    def _after_fork(self) -> None:
        super()._after_fork()
        self._state_lock = threading.Lock()
        self.client.after_fork()

    # -- keys ----------------------------------------------------------------------------------------
    def key(self, namespace: bytes, block_hash: bytes) -> str:
        return f"{self.key_prefix}:{namespace.hex()}:{block_hash.hex()}"

    def _remember(self, namespace: bytes, block_hash: bytes) -> None:
        with self._state_lock:
            self._known[(namespace, block_hash)] = None
            self._known.move_to_end((namespace, block_hash))
            while len(self._known) > KNOWN_LIMIT:
                self._known.popitem(last=False)

    def _forget(self, namespace: bytes, block_hash: bytes) -> None:
        with self._state_lock:
            self._known.pop((namespace, block_hash), None)

    # -- availability --------------------------------------------------------------------------------
    def available(self) -> bool:
        """False while the tier is off after a connection failure (until the back-off ends)."""
        return not self._closed and time.monotonic() >= self._next_try

    def _failed(self, error: BaseException, doing: str) -> None:
        """Count a failure; a connection failure turns the tier off for a (growing) back-off."""
        if isinstance(error, self._connection_errors):
            kind = "timeout" if "timeout" in type(error).__name__.lower() else "connection"
            with self._state_lock:
                self._next_try = time.monotonic() + self._delay
                delay, self._delay = self._delay, min(self._delay * 2, self.max_backoff_s)
                self._known.clear()  # it may come back empty (a restart): write blocks again then
            self.error(kind, f"{doing} {self.url} failed ({error!r}); retrying in {delay:.1f} s")
        else:
            self.error("server", f"{doing} {self.url} failed ({error!r})")

    def _node_failed(self, kind: str, message: str) -> None:
        """One cluster node failed (the others still serve): count it, warn once, and forget what this
        process knew was stored (the node may come back empty)."""
        with self._state_lock:
            self._known.clear()
        self.error(kind, message)

    def _succeeded(self) -> None:
        if self._delay != self.backoff_s:
            with self._state_lock:
                self._delay = self.backoff_s
            logger.info("hf_prefix_cache remote tier: %s reachable again", self.url)

    # -- reads ---------------------------------------------------------------------------------------
    def has(self, namespace: bytes, block_hash: bytes) -> bool:
        """Whether this process wrote or read the block (no network: the writer asks the server itself)."""
        with self._state_lock:
            return (namespace, block_hash) in self._known

    def contains(self, namespace: bytes, block_hashes: Sequence[bytes]) -> int:
        """How many leading ``block_hashes`` the server holds (one pipelined round trip; 0 on failure)."""
        if not block_hashes or not self.available():
            return 0
        try:
            present = self.client.exists([self.key(namespace, block_hash) for block_hash in block_hashes])
        except self._redis_errors as error:
            self._failed(error, "looking up blocks on")
            return 0
        finally:
            self.count(round_trips=1)
        self._succeeded()
        count = 0
        for exists in present:
            if not exists:
                break
            count += 1
        return count

    def lookup(self, namespace: bytes, requests: Sequence[BlockRequest]) -> int:
        """How many leading ``requests`` the server holds (one round trip); the rest are forgotten."""
        if not requests:
            return 0
        if not self.available():
            self.count(unavailable=1)
            return 0
        leading = self.contains(namespace, [request.block_hash for request in requests])
        if leading < len(requests):
            self.count(misses=1)
            # the server lost (or never had) these: forget them all, so a later store sends each again
            # (forgetting only the first would leave the chain broken at the next one for one more round)
            for request in requests[leading:]:
                self._forget(namespace, request.block_hash)
        for request in requests[:leading]:  # held there: a call that recomputes them need not send them
            self._remember(namespace, request.block_hash)
        return leading

    def get(self, namespace: bytes, requests: Sequence[BlockRequest]) -> list[BlockData]:
        leading = self.lookup(namespace, requests)
        if leading == 0:
            return []
        if sum(len(request.tokens) for request in requests[:leading]) < (self.min_tokens or 0):
            self.count(below_threshold=1)
            return []
        return [block for batch in self.stream(namespace, requests[:leading], FETCH_BATCH) for block in batch]

    def stream(
        self, namespace: bytes, requests: Sequence[BlockRequest], batch: int
    ) -> Iterator[list[BlockData]]:
        """One MGET per ``batch`` of ``requests`` (which ``lookup`` found), each verified; ends at a gone or
        bad value. The socket reads release the GIL, so where the store overlaps reads the caller places
        one batch while this receives the next."""
        for start in range(0, len(requests), batch):
            chunk = requests[start : start + batch]
            blocks = self._fetch(namespace, chunk)
            self.count(hits=len(blocks))
            if blocks:
                yield blocks
            if len(blocks) < len(chunk):
                return

    def _fetch(self, namespace: bytes, requests: Sequence[BlockRequest]) -> list[BlockData]:
        """The verified leading blocks of ``requests`` (one MGET), stopping at a gone or bad value."""
        keys = [self.key(namespace, request.block_hash) for request in requests]
        started = time.perf_counter()
        try:
            values = self.client.mget(keys)
        except self._redis_errors as error:
            self._failed(error, "fetching blocks from")
            return []
        finally:
            self.count(round_trips=1)
            with self._count_lock:
                self.counters.read_s += time.perf_counter() - started
        self._succeeded()
        blocks = []
        for key, value, request in zip(keys, values, requests):
            if value is None:  # evicted or expired since the EXISTS
                self._forget(namespace, request.block_hash)
                break
            try:
                block = decode(value, namespace, request, self.layouts, self.mac_key)
            except EntryError as error:
                self.error(error.kind, f"bad value under {key} ({error}), deleted")
                self._forget(namespace, request.block_hash)
                self._delete_key(key)
                break
            self.count(bytes_read=len(value))
            self._remember(namespace, request.block_hash)
            blocks.append(block)
        return blocks

    # -- writes --------------------------------------------------------------------------------------
    def put(self, namespace: bytes, blocks: Sequence[BlockData]) -> None:
        if not self.available():
            self.count(dropped=len(blocks), unavailable=1 if blocks else 0)
            return
        for block in blocks:
            if self.has(namespace, block.block_hash):
                self.count(skipped=1)
            elif not self.writer.submit((namespace, block), block.nbytes):
                self.count(dropped=1)

    def _write(self, batch: list[tuple[bytes, BlockData]]) -> None:
        """Send the blocks of ``batch`` the server does not hold yet: EXISTS pipeline, then SET pipeline."""
        if not self.available():
            self.count(dropped=len(batch), unavailable=1)
            return
        keys = [self.key(namespace, block.block_hash) for namespace, block in batch]
        started = time.perf_counter()
        try:
            present = self.client.exists(keys)
            sets, expires, sent = [], [], []
            for key, item, exists in zip(keys, batch, present):
                if exists:
                    if self.ttl_ms is not None:
                        expires.append(key)  # still in use: keep it as long as a new one
                    continue
                sets.append((key, encode(item[0], item[1], self.mac_key)))
                sent.append(item)
            landed = self.client.write(sets, expires, self.ttl_ms)
        except self._redis_errors as error:
            self._failed(error, "storing blocks on")
            self.count(dropped=len(batch))
            return
        self._succeeded()
        for (namespace, block), exists in zip(batch, present):
            if exists:
                self._remember(namespace, block.block_hash)
        for (namespace, block), ok in zip(sent, landed):
            if ok:  # a cluster node that failed: not stored, so not known
                self._remember(namespace, block.block_hash)
        sizes = [len(value) for (_, value), ok in zip(sets, landed) if ok]
        skipped = sum(1 for exists in present if exists)
        self.count(puts=len(sizes), skipped=skipped, bytes_written=sum(sizes), dropped=len(sets) - len(sizes))
        with self._count_lock:
            self.counters.write_s += time.perf_counter() - started

    # -- state snapshots (hybrid models) ---------------------------------------------------------------
    def state_key(self, namespace: bytes, block_hash: bytes) -> str:
        return f"{self.key(namespace, block_hash)}:state"

    def put_state(self, namespace: bytes, block_hash: bytes, tokens: int, layers: list) -> None:
        """One SET, now (at most a few per call), bounded by ``timeout`` like every command."""
        if not self.available():
            self.count(unavailable=1)
            return
        value = encode_state(namespace, block_hash, tokens, layers, self.mac_key)
        try:
            landed = self.client.write([(self.state_key(namespace, block_hash), value)], [], self.ttl_ms)
        except self._redis_errors as error:
            self._failed(error, "storing a state on")
            return
        self._succeeded()
        if landed[0]:  # (a failed cluster node was counted by the client's report)
            self.count(bytes_written=len(value))

    def get_state(self, namespace: bytes, block_hash: bytes, layouts: list) -> tuple[int, list] | None:
        if not self.available():
            return None
        key = self.state_key(namespace, block_hash)
        try:
            value = self.client.mget([key])[0]
        except self._redis_errors as error:
            self._failed(error, "fetching a state from")
            return None
        finally:
            self.count(round_trips=1)
        self._succeeded()
        if value is None:
            return None
        try:
            found = decode_state(value, namespace, block_hash, layouts, self.mac_key)
        except EntryError as error:
            self.error(error.kind, f"bad state value under {key} ({error}), deleted")
            self._delete_key(key)
            return None
        self.count(bytes_read=len(value))
        return found

    # -- maintenance ---------------------------------------------------------------------------------
    def _delete_key(self, key: str) -> None:
        try:
            self.client.delete([key])
        except self._redis_errors as error:
            self._failed(error, "deleting a bad value on")

    def delete(self, namespace: bytes, block_hash: bytes) -> None:
        self._forget(namespace, block_hash)
        if self.available():
            self._delete_key(self.key(namespace, block_hash))

    def clear(self, namespace: bytes | None = None) -> int:
        """Delete this ``key_prefix``'s keys of ``namespace`` (all namespaces with None) on the server,
        after queued writes land. Other processes sharing the server lose them too."""
        self.flush(EXIT_FLUSH_S)
        with self._state_lock:
            self._known = OrderedDict(
                (key, None) for key in self._known if namespace is not None and key[0] != namespace
            )
        pattern = f"{self.key_prefix}:{namespace.hex() if namespace is not None else '*'}:*"
        removed = 0
        try:
            batch = []
            for key in self.client.scan(pattern):
                batch.append(key)
                if len(batch) >= 1000:
                    removed += self.client.delete(batch)
                    batch = []
            if batch:
                removed += self.client.delete(batch)
        except self._redis_errors as error:
            self._failed(error, "clearing keys on")
        return removed

    def flush(self, timeout: float | None = None) -> bool:
        return self.writer.flush(timeout)

    def close(self, timeout: float = EXIT_FLUSH_S) -> None:
        if self._closed:
            return
        self.writer.close(timeout)
        self._closed = True
        self.client.close()


def connect(url: str, *, timeout: float, **cluster_options) -> ServerClient | ClusterClient:
    """The client for ``url`` by its scheme; ``cluster_options`` (back-off, failure report) are a cluster's."""
    if is_cluster_url(url):
        return ClusterClient(url, timeout=timeout, **cluster_options)
    return ServerClient(url, timeout=timeout)


def build(remote: str, *, layouts: list[LayerLayout], key=None, **options) -> RemoteTier:
    """The remote tier of ``PrefixCache(remote=..., remote_min_tokens=..., ...)``."""
    return RemoteTier(remote, layouts, key=key, **options)


REMOTE = TierKind(
    "remote",
    "remote",
    "a redis:// or redis+cluster:// URL",
    build,
    {
        "remote_min_tokens": "min_tokens",
        "key_prefix": "key_prefix",
        "remote_ttl": "ttl",
        "remote_timeout": "timeout",
    },
    shared=True,
)
