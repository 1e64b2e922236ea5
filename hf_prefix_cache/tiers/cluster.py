"""The remote tier's client for a Redis (or Valkey) Cluster: one pipeline per node, health per node.

- **URL**: ``redis+cluster://[user:password@]host:port,host:port,...`` (``rediss+cluster://`` for TLS,
  with the same ``?ssl_*`` query options as ``rediss://``). The listed nodes are only where discovery
  starts: redis-py's ``RedisCluster`` asks them for the slot map and finds the rest.
- **Keys** spread over the 16384 slots by their own hash (no hash tag), so a model's blocks land on
  every master. ``MGET`` across slots fails with ``CROSSSLOT``, so every operation groups its keys by
  the master that owns their slot and sends each node one pipeline of single-key commands; replies are
  put back in the order asked, so a chain is read exactly as on one server.
- **Redirects**: a ``MOVED`` reply (a slot that moved for good, or a replica promoted) refreshes the slot
  map and sends those keys again; ``ASK`` (a slot half-way through a migration) sends ``ASKING`` + the
  command to the node named. At most ``REDIRECTS`` rounds, then the rest are misses.
- **A failed node** (refused, reset, or silent for ``timeout`` seconds) is a miss for its keys only: the
  failure goes to ``report`` (the tier counts it and warns once), that node alone is skipped for a
  back-off (``backoff_s`` doubling up to ``max_backoff_s``), and the slot map is read again when the
  back-off ends, so a replica that took over is found. Other nodes keep serving.
- Only when no node at all answers the slot-map question does an operation raise (redis-py's
  ``ConnectionError``): then the whole tier backs off, as for one server.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from urllib.parse import urlsplit

from .clients import _redact, import_redis

logger = logging.getLogger(__name__)

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")

REDIRECTS = 3  # rounds of MOVED/ASK an operation follows before its remaining keys are misses
FAILED = object()  # the reply of a key whose node failed or that stayed redirected


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def parse_cluster_url(url: str, redis) -> tuple[list[tuple[str, int]], dict]:
    """(startup nodes, connection options) of a ``redis+cluster://`` URL; redis-py's own URL parser reads
    the credentials and ``?`` options, so they take the same forms as for one server."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in CLUSTER_SCHEMES:
        raise ValueError(
            f"remote={_redact(url)!r}: a cluster URL starts with redis+cluster:// or rediss+cluster://"
        )
    parts = urlsplit(f"redis://{rest}")
    credentials, _, hosts = parts.netloc.rpartition("@")
    if parts.path not in ("", "/", "/0"):
        raise ValueError(f"remote={_redact(url)!r}: a cluster has database 0 only; drop {parts.path!r}")
    nodes = []
    for address in hosts.split(","):
        host, _, port = address.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(
                f"remote={_redact(url)!r}: list the nodes as host:port,host:port (got {address!r})"
            )
        nodes.append((host.strip("[]"), int(port)))
    single = f"{scheme.lower().removesuffix('+cluster')}://{credentials + '@' if credentials else ''}"
    single += f"{hosts.split(',')[0]}/0{'?' + parts.query if parts.query else ''}"
    options = redis.connection.parse_url(single)
    for name in ("host", "port", "db"):
        options.pop(name, None)
    return nodes, options


class ClusterClient:
    """The ``clients`` interface over a cluster (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        report: Callable[[str, str], None] | None = None,
    ):
        self.redis = import_redis()
        self.url = _redact(url)
        startup, options = parse_cluster_url(url, self.redis)
        self.startup = startup
        self.options = dict(options, socket_timeout=timeout, socket_connect_timeout=timeout)
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.report = report or (lambda kind, message: logger.warning("%s: %s", kind, message))
        errors = self.redis.exceptions
        self._node_errors = (errors.ConnectionError, errors.TimeoutError, OSError)
        self._lock = threading.Lock()
        self._health: dict[str, tuple[float, float]] = {}  # node name -> (next try, next back-off)
        self._refresh_at = 0.0  # the slot map is read again at the first operation after this time
        self._stale = False  # a node failed or a slot moved since the slot map was read
        self.cluster = None
        try:
            self._connect()
        except errors.ConnectionError as error:  # nothing reachable now: the tier backs off and retries
            logger.debug("remote tier: cluster %s not reachable yet (%r)", self.url, error)

    def after_fork(self) -> None:
        """In a forked child: a new lock (a parent thread may have held this one at the fork)."""
        self._lock = threading.Lock()

    # -- topology ------------------------------------------------------------------------------------
    def _connect(self) -> None:
        """Read the slot map from the startup nodes (a non-cluster server there is a ValueError)."""
        redis = self.redis
        try:
            cluster = redis.cluster.RedisCluster(
                startup_nodes=[redis.cluster.ClusterNode(host, port) for host, port in self.startup],
                require_full_coverage=False,  # serve the slots that still have a master
                retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
                **self.options,
            )
        except redis.exceptions.RedisClusterException as error:
            if "cluster mode is not enabled" in str(error).lower():
                raise ValueError(
                    f"remote={self.url!r} points at a server that is not a Redis Cluster node: use "
                    "remote='redis://host:port' (rediss:// for TLS) for one server"
                ) from error
            raise redis.exceptions.ConnectionError(f"no node of {self.url} answered: {error}") from error
        for node in cluster.get_primaries():  # connect now, not in the first call (as one server's probe)
            try:
                cluster.get_redis_connection(node).ping()
            except self._node_errors as error:
                logger.debug("remote tier: cluster node %s not reachable yet (%r)", node.name, error)
        with self._lock:
            self.cluster = cluster
            self._stale = False

    def _topology(self):
        """The ``RedisCluster`` with a fresh enough slot map (read again once a back-off after a node
        failed or a slot moved); raises ConnectionError when no node answers."""
        if self.cluster is None:
            try:
                self._connect()
            except ValueError as error:  # came up as a plain server: a miss and a back-off, never a crash
                raise self.redis.exceptions.ConnectionError(str(error)) from error
            return self.cluster
        now = time.monotonic()
        if self._stale and now >= self._refresh_at:
            with self._lock:
                self._refresh_at = now + self.backoff_s
            try:
                self.cluster.nodes_manager.initialize()
                self._stale = False
            except (self.redis.exceptions.RedisError, self.redis.exceptions.RedisClusterException) as error:
                raise self.redis.exceptions.ConnectionError(
                    f"no node of {self.url} answered: {error}"
                ) from error
        return self.cluster

    def _owner(self, cluster, key: str):
        try:
            return cluster.nodes_manager.get_node_from_slot(cluster.keyslot(key))
        except (self.redis.exceptions.RedisClusterException, self.redis.exceptions.RedisError):
            self._stale = True  # a slot without a master: ask again later
            return None

    # -- node health ---------------------------------------------------------------------------------
    def _resting(self, name: str) -> bool:
        with self._lock:
            return time.monotonic() < self._health.get(name, (0.0, 0.0))[0]

    def _node_failed(self, name: str, error: BaseException, doing: str) -> None:
        with self._lock:
            _, delay = self._health.get(name, (0.0, self.backoff_s))
            delay = delay or self.backoff_s
            self._health[name] = (time.monotonic() + delay, min(delay * 2, self.max_backoff_s))
            self._stale = True
        kind = "timeout" if "timeout" in type(error).__name__.lower() else "connection"
        self.report(kind, f"{doing} node {name} of {self.url} failed ({error!r}); its keys are misses, "
                    f"retrying it in {delay:.1f} s")  # fmt: skip

    def _node_answered(self, name: str) -> None:
        with self._lock:
            if self._health.pop(name, None) is not None:
                logger.info("hf_prefix_cache remote tier: cluster node %s reachable again", name)

    # -- one pipeline per node -----------------------------------------------------------------------
    def _each(self, commands: Sequence[tuple], doing: str) -> list:
        """The reply to each single-key command (key second), ``FAILED`` where its node failed."""
        cluster = self._topology()
        errors = self.redis.exceptions
        replies: list = [FAILED] * len(commands)
        pending = list(range(len(commands)))
        asking: dict[int, tuple[str, int]] = {}
        for _ in range(REDIRECTS):
            groups: dict[str, tuple[object, list[int]]] = {}
            for index in pending:
                if index in asking:
                    node = cluster.nodes_manager.get_node(*asking[index])
                else:
                    node = self._owner(cluster, commands[index][1])
                if node is not None:
                    groups.setdefault(node.name, (node, []))[1].append(index)
            pending, moved = [], False
            live = [
                (name, node, indices) for name, (node, indices) in groups.items() if not self._resting(name)
            ]
            for (name, _, indices), answers in zip(live, self._send_all(cluster, live, commands, asking)):
                if isinstance(answers, BaseException):
                    self._node_failed(name, answers, doing)
                    continue
                self._node_answered(name)
                for index, answer in zip(indices, answers):
                    asking.pop(index, None)
                    if isinstance(answer, errors.MovedError):  # (a subclass of AskError)
                        moved = True
                        pending.append(index)
                    elif isinstance(answer, errors.AskError):
                        asking[index] = (answer.host, answer.port)
                        pending.append(index)
                    elif isinstance(answer, Exception):
                        self.report("server", f"{doing} node {name} of {self.url} failed ({answer!r})")
                    else:
                        replies[index] = answer
            if moved:
                self._stale, self._refresh_at = True, 0.0
                cluster = self._topology()
            if not pending:
                break
        return replies

    def _send_all(self, cluster, live, commands, asking) -> list:
        """Each node's answers (or its error), one node after the other: on the 2-core machine threads
        per node measured 1.3x slower than this (they fight over the interpreter lock while parsing
        replies), and across a real network the round trips are small beside moving the K/V."""
        return [self._send(cluster, node, indices, commands, asking) for _, node, indices in live]

    def _send(self, cluster, node, indices, commands, asking) -> list | BaseException:
        """One node's pipeline: the answers for ``indices`` in order (``ASKING``'s OK dropped), or the
        connection error that failed it."""
        try:
            with cluster.get_redis_connection(node).pipeline(transaction=False) as pipe:
                for index in indices:
                    if index in asking:
                        pipe.execute_command("ASKING")
                    pipe.execute_command(*commands[index])
                answers = iter(pipe.execute(raise_on_error=False))
        except self._node_errors as error:
            return error
        out = []
        for index in indices:
            if index in asking:
                next(answers)
            out.append(next(answers))
        return out

    # -- the clients interface -----------------------------------------------------------------------
    def exists(self, keys: Sequence[str]) -> list[bool]:
        return [
            reply is not FAILED and bool(reply)
            for reply in self._each([("EXISTS", k) for k in keys], "looking up")
        ]

    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        return [
            None if reply is FAILED else reply for reply in self._each([("GET", k) for k in keys], "fetching")
        ]

    def write(self, sets: Sequence[tuple[str, bytes]], expires: Sequence[str], px: int | None) -> list[bool]:
        ttl = ("PX", px) if px is not None else ()
        commands = [("SET", key, value, *ttl) for key, value in sets]
        commands += [("PEXPIRE", key, px) for key in expires]
        replies = self._each(commands, "storing on")
        return [reply is not FAILED for reply in replies[: len(sets)]]

    def delete(self, keys: Sequence[str]) -> int:
        return sum(
            reply for reply in self._each([("DEL", k) for k in keys], "deleting on") if reply is not FAILED
        )

    def scan(self, pattern: str) -> Iterator[bytes]:
        """The matching keys of every master that answers (a failed one is reported and skipped)."""
        cluster = self._topology()
        for node in cluster.get_primaries():
            try:
                yield from cluster.get_redis_connection(node).scan_iter(match=pattern, count=1000)
            except self._node_errors as error:
                self._node_failed(node.name, error, "clearing keys on")

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
