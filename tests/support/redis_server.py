"""A real redis-server (the Debian package) for the remote-tier tests: a free localhost port, a small
``maxmemory`` with ``allkeys-lru``, no persistence; started and stopped by the tests.

A test that needs the server fails (RuntimeError) when it cannot start: CI installs it in
``scripts/setup.sh``, so a missing server is a broken set-up, not a reason to skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

START_TIMEOUT_S = 15.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """One redis-server child process; ``kill`` and ``start`` again keep the same port (and lose the data)."""

    def __init__(
        self, folder: Path, maxmemory: str = "64mb", unix_socket: bool = False, extra: tuple[str, ...] = ()
    ):
        self.folder = Path(folder)
        self.extra = tuple(extra)  # more redis-server arguments (a cluster node's, say)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.maxmemory = maxmemory
        self.socket = self.folder / "redis.sock" if unix_socket else None  # then no TCP port at all
        self.port = 0 if unix_socket else free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}?db=0" if self.socket else f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        if self.socket:
            return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=5)
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed; run scripts/setup.sh (it runs apt-get install redis-server)"
            )
        command = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--maxmemory", self.maxmemory,
            "--maxmemory-policy", "allkeys-lru",
            "--dir", str(self.folder),
            "--daemonize", "no",
            *(["--unixsocket", str(self.socket)] if self.socket else []),
            *self.extra,
        ]  # fmt: skip
        log = open(self.folder / "redis.log", "ab")  # noqa: SIM115 - the child keeps writing to it
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if self.client().ping():
                    return self
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        tail = (self.folder / "redis.log").read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(f"redis-server did not start at {self.url}:\n{tail}")

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-run, as a crashed host would."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but never answered (a stalled server)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
