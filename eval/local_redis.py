"""Throw-away local Redis for the benchmarks: one server, or a cluster of ``masters`` redis-server nodes
on free localhost ports (each with its bus port, +10000, free too) joined with ``redis-cli --cluster
create``; each yields its URL and stops its processes on exit."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


def start_node(server: str, port: int, folder: Path, maxmemory: str, *extra: str) -> subprocess.Popen:
    command = [
        server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--maxmemory", maxmemory, "--maxmemory-policy", "allkeys-lru", "--dir", str(folder), *extra,
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_until_up(clients, seconds: float = 15) -> None:
    import redis

    deadline = time.monotonic() + seconds
    for client in clients:
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise SystemExit("redis-server did not start") from None
                time.sleep(0.05)


@contextmanager
def local_server(maxmemory: str = "2gb"):
    """Yield ``redis://127.0.0.1:P/0`` for a fresh server (as ``bench_remote.redis_server``)."""
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    import redis

    folder = Path(tempfile.mkdtemp(prefix="bench-redis-"))
    port = free_cluster_port()
    process = start_node(server, port, folder, maxmemory)
    try:
        wait_until_up([redis.Redis(host="127.0.0.1", port=port)])
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def free_cluster_port() -> int:
    for _ in range(1000):
        port = random.randrange(20000, 55000)
        try:
            with socket.socket() as first, socket.socket() as second:
                first.bind(("127.0.0.1", port))
                second.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise SystemExit("no free pair of ports for a cluster node")


@contextmanager
def local_cluster(masters: int = 3, maxmemory: str = "2gb"):
    """Yield ``redis+cluster://127.0.0.1:P1,...`` for a fresh cluster of ``masters`` masters."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        raise SystemExit("redis-server and redis-cli are needed (apt-get install redis-server redis-tools)")
    import redis

    folder = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    ports = [free_cluster_port() for _ in range(masters)]
    processes = []
    try:
        for port in ports:
            (folder / str(port)).mkdir()
            processes.append(
                start_node(server, port, folder / str(port), maxmemory, "--cluster-enabled", "yes",
                           "--cluster-config-file", "nodes.conf", "--cluster-require-full-coverage", "no")
            )  # fmt: skip
        clients = [redis.Redis(host="127.0.0.1", port=port, socket_timeout=5) for port in ports]
        wait_until_up(clients)
        nodes = [f"127.0.0.1:{port}" for port in ports]
        made = subprocess.run(
            [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if made.returncode != 0:
            raise SystemExit(f"redis-cli --cluster create failed:\n{made.stdout[-2000:]}{made.stderr}")
        deadline = time.monotonic() + 30
        while not all(client.cluster("info")["cluster_state"] == "ok" for client in clients):
            if time.monotonic() > deadline:
                raise SystemExit("the cluster did not become ready")
            time.sleep(0.1)
        yield "redis+cluster://" + ",".join(nodes)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def keys_per_master(url: str) -> list[int]:
    """How many keys each master of the cluster at ``url`` holds (a spread check for the report)."""
    import redis

    hosts = url.split("://", 1)[1].split(",")
    counts = []
    for host in hosts:
        name, port = host.rsplit(":", 1)
        client = redis.Redis(host=name, port=int(port), socket_timeout=5)
        if client.execute_command("ROLE")[0] == b"master":
            counts.append(client.dbsize())
    return counts
