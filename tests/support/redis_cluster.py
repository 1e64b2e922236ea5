"""A real local Redis Cluster for the cluster tests: ``masters`` redis-server nodes (plus ``replicas``
per master) on free localhost ports, joined with ``redis-cli --cluster create``; stopped at teardown.

The nodes run with ``cluster-require-full-coverage no`` (a cache keeps serving the slots it still has
while one master is down) and a short ``cluster-node-timeout`` so a failover takes about a second.
A test that needs the cluster fails (RuntimeError) when it cannot start: CI installs redis-server and
redis-cli in ``scripts/setup.sh``.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis
from redis.crc import key_slot

from .redis_server import RedisServer

NODE_TIMEOUT_MS = 1000
READY_TIMEOUT_S = 30.0


def free_cluster_port() -> int:
    """A free port P below 55536 whose bus port P + 10000 is free too (a node listens on both)."""
    for _ in range(1000):
        port = random.randrange(20000, 55000)
        try:
            with socket.socket() as first, socket.socket() as second:
                first.bind(("127.0.0.1", port))
                second.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of ports for a cluster node")


class RedisClusterNodes:
    """The nodes of one local cluster; ``url`` is the tier's ``redis+cluster://`` form."""

    def __init__(self, folder: Path, masters: int = 3, replicas: int = 0, maxmemory: str = "64mb"):
        self.folder = Path(folder)
        self.masters_count = masters
        self.replicas = replicas
        extra = (
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            "--cluster-require-full-coverage", "no",
        )  # fmt: skip
        self.nodes = [
            RedisServer(self.folder / f"node{index}", maxmemory=maxmemory, extra=extra)
            for index in range(masters * (1 + replicas))
        ]
        for node in self.nodes:
            node.port = free_cluster_port()

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes[:3])

    def node(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def start(self) -> RedisClusterNodes:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError(
                "redis-cli is not installed; run scripts/setup.sh (apt-get install redis-tools)"
            )
        try:
            for node in self.nodes:
                self._start_node(node)
            command = [cli, "--cluster", "create", *(f"127.0.0.1:{node.port}" for node in self.nodes)]
            command += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
            made = subprocess.run(command, capture_output=True, text=True, timeout=60)
            if made.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{made.stdout[-2000:]}{made.stderr}")
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def _start_node(node: RedisServer, attempts: int = 3) -> None:
        """Start a node for the first time, on a new pair of ports if it cannot start: another test's
        server may take either port between ``free_cluster_port``'s probe and this start (seen once in
        a CI run of parallel mutant jobs)."""
        for attempt in range(attempts):
            try:
                node.start()
                return
            except RuntimeError:
                if attempt == attempts - 1 or shutil.which("redis-server") is None:
                    raise
                node.port = free_cluster_port()

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def running(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.process is not None]

    def topology(self) -> dict[int, list[tuple[int, int]]]:
        """master port -> its slot ranges, as a running node sees it (only masters that own slots)."""
        slots = self.client(self.running()[0].port).execute_command("CLUSTER", "SLOTS")
        owners: dict[int, list[tuple[int, int]]] = {}
        for start, end, master, *_ in slots:
            owners.setdefault(int(master[1]), []).append((int(start), int(end)))
        return owners

    def masters(self) -> list[int]:
        return sorted(self.topology())

    def owner(self, key: str | bytes) -> int:
        """The port of the master that owns ``key``'s slot."""
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        for port, ranges in self.topology().items():
            if any(start <= slot <= end for start, end in ranges):
                return port
        raise LookupError(f"no master owns slot {slot}")

    def keys_by_master(self) -> dict[int, set[bytes]]:
        return {port: set(self.client(port).keys("*")) for port in self.masters()}

    def replica_of(self, master: int) -> int:
        """The port of a replica of ``master``."""
        for node in self.running():
            role = self.client(node.port).execute_command("ROLE")
            if role[0] == b"slave" and int(role[2]) == master:
                return node.port
        raise LookupError(f"no replica of {master}")

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Every running node says cluster_state:ok, all 16384 slots are served, and every master has
        the replicas it was made with (after a failover and a restart the roles may have swapped)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                infos = [self.client(node.port).cluster("info") for node in self.running()]
                served = sum(end - start + 1 for ranges in self.topology().values() for start, end in ranges)
                replicas = self.replicas_ready()
                if all(info["cluster_state"] == "ok" for info in infos) and served == 16384 and replicas:
                    return
                last = f"{infos} served={served} replicas={replicas}"
            except (redis.exceptions.RedisError, OSError) as error:
                last = repr(error)
            time.sleep(0.1)
        raise RuntimeError(f"the cluster did not become ready: {last}")

    def replicas_ready(self) -> bool:
        if not self.replicas:
            return True
        links = 0
        for node in self.running():
            role = self.client(node.port).execute_command("ROLE")
            if role[0] == b"slave" and role[3] == b"connected":
                links += 1
        return links == len(self.running()) - self.masters_count

    def wait_promoted(self, replica: int, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while self.client(replica).execute_command("ROLE")[0] != b"master":
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica {replica} was not promoted")
            time.sleep(0.1)

    def restore(self) -> None:
        """Every node running again (a killed one rejoins with its nodes.conf), the cluster ready, empty,
        and every replica allowed to fail over again."""
        for node in self.nodes:
            if node.process is None:
                node.start()
            self.client(node.port).config_set("cluster-replica-no-failover", "no")
        self.wait_ready()
        for port in self.masters():
            self.client(port).flushall()
        for node in self.nodes:
            node.client().config_set("maxmemory", node.maxmemory)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisClusterNodes:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
