"""The commands the remote tier sends, behind one small interface that one server and a cluster share.

``ServerClient`` talks to one Redis/Valkey server (``redis://``, ``rediss://``, ``unix://``);
``cluster.ClusterClient`` to a cluster (``redis+cluster://``); ``remote.connect`` picks one by scheme.
Both offer the same operations on lists of keys, replies in the order given:

- ``exists(keys) -> list[bool]``, ``mget(keys) -> list[bytes | None]``,
- ``write(sets, expires, px) -> list[bool]`` (``SET`` each ``(key, value)``, ``PEXPIRE`` each of
  ``expires``; per set, whether it landed), ``delete(keys) -> int``, ``scan(pattern)``, ``close()`` and
  ``after_fork()``.

A ``ServerClient`` raises redis-py's errors (the tier counts them and backs off). A ``ClusterClient``
raises only when no node can be reached; a failed node turns into misses for its own keys.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence

logger = logging.getLogger(__name__)

INSTALL_HINT = "the remote tier needs redis-py: pip install hf_prefix_cache[redis]"


def import_redis():
    """The ``redis`` module, or an ImportError naming the extra that installs it."""
    try:
        import redis
        import redis.backoff
        import redis.cluster
        import redis.retry
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return redis


class ServerClient:
    """One server: every operation is one pipelined round trip (``MGET`` for reads)."""

    def __init__(self, url: str, *, timeout: float):
        redis = import_redis()
        # No client-side retries: a failure is a miss now, and the tier's back-off decides when to retry.
        self.redis = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._refuse_a_cluster_node(url, redis)

    def _refuse_a_cluster_node(self, url: str, redis) -> None:
        """A plain URL at a cluster node would only work for the keys whose slots that node owns (MOVED
        for the others): refuse it now. An unreachable server is left to the tier's back-off."""
        try:
            enabled = self.redis.info("cluster").get("cluster_enabled")
        except (redis.exceptions.RedisError, OSError) as error:
            logger.debug("remote tier: could not ask the server whether it is a cluster node (%r)", error)
            return
        if enabled:
            self.redis.close()
            raise ValueError(
                f"remote={_redact(url)!r} is a Redis Cluster node: use remote='redis+cluster://host:port,"
                "host:port,...' (rediss+cluster:// for TLS) so keys go to the node that owns their slot"
            )

    def after_fork(self) -> None:
        """Nothing to renew: redis-py's pool opens new connections in a child itself."""

    def exists(self, keys: Sequence[str]) -> list[bool]:
        with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.exists(key)
            return [bool(present) for present in pipe.execute()]

    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        return self.redis.mget(keys)

    def write(self, sets: Sequence[tuple[str, bytes]], expires: Sequence[str], px: int | None) -> list[bool]:
        with self.redis.pipeline(transaction=False) as pipe:
            for key in expires:
                pipe.pexpire(key, px)
            for key, value in sets:
                pipe.set(key, value, px=px)
            if len(pipe):
                pipe.execute()
        return [True] * len(sets)

    def delete(self, keys: Sequence[str]) -> int:
        return self.redis.delete(*keys) if keys else 0

    def scan(self, pattern: str) -> Iterator[bytes]:
        return self.redis.scan_iter(match=pattern, count=1000)

    def close(self) -> None:
        self.redis.close()


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url)
