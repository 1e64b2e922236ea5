"""A throttling TCP proxy on loopback, for benchmarks of a slow link: bytes go through at most
``rate`` bytes/s per direction (a token bucket shared by all connections, like one network link) and
each chunk arrives ``latency`` seconds after it was read (one-way; pipelined, so latency does not cut
the bandwidth).

Runs as its own process, so its event loop never competes with the benchmark for the GIL:
``python -m hf_prefix_cache_eval.throttle_proxy --target 127.0.0.1:6379 --rate 1e8 --latency 0.0005``
prints the port it listens on, then reads ``<rate> <latency>`` lines on stdin to change the link while
connections stay open. ``ThrottleProxy`` starts and steers one from a benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import threading
import time

CHUNK = 256 * 1024


class Bucket:
    """A token bucket: ``take(n)`` waits until ``n`` bytes fit in the rate."""

    def __init__(self, rate: float):
        self.rate = rate
        self.tokens = 0.0
        self.stamp = time.monotonic()

    def burst(self) -> float:
        return max(CHUNK, self.rate * 0.005)

    async def take(self, count: int) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst(), self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= count or self.tokens >= self.burst():
                self.tokens -= count
                return
            await asyncio.sleep(max((min(count, self.burst()) - self.tokens) / self.rate, 0.0005))


class Link:
    def __init__(self, rate: float, latency: float):
        self.latency = latency
        self.buckets = (Bucket(rate), Bucket(rate))  # client->server, server->client

    def set(self, rate: float, latency: float) -> None:
        self.latency = latency
        for bucket in self.buckets:
            bucket.rate = rate


async def _pipe(reader, writer, bucket: Bucket, link: Link) -> None:
    queue: asyncio.Queue = asyncio.Queue()

    async def receive():
        while data := await reader.read(CHUNK):
            await queue.put((time.monotonic() + link.latency, data))
        await queue.put((0.0, b""))

    task = asyncio.ensure_future(receive())
    try:
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            for start in range(0, len(data), CHUNK):
                piece = data[start : start + CHUNK]
                await bucket.take(len(piece))
                writer.write(piece)
                await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        task.cancel()
        writer.close()


async def _serve(target: tuple[str, int], link: Link, ready) -> None:
    async def handle(client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection(*target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            _pipe(client_reader, server_writer, link.buckets[0], link),
            _pipe(server_reader, client_writer, link.buckets[1], link),
        )

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    ready(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", required=True, help="host:port to forward to")
    parser.add_argument("--rate", type=float, required=True, help="bytes/s per direction")
    parser.add_argument("--latency", type=float, default=0.0, help="one-way delay in seconds")
    args = parser.parse_args(argv)
    host, port = args.target.rsplit(":", 1)
    link = Link(args.rate, args.latency)
    loop = asyncio.new_event_loop()

    def steer() -> None:
        for line in sys.stdin:
            rate, latency = (float(x) for x in line.split())
            loop.call_soon_threadsafe(link.set, rate, latency)
            print("ok", flush=True)

    threading.Thread(target=steer, daemon=True).start()
    loop.run_until_complete(_serve((host, int(port)), link, lambda p: print(p, flush=True)))
    return 0


class ThrottleProxy:
    """A proxy process in front of ``target`` (``host:port``); ``url`` is a redis URL through it."""

    def __init__(self, target: str, rate: float, latency: float = 0.0):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hf_prefix_cache_eval.throttle_proxy", "--target", target,
             "--rate", str(rate), "--latency", str(latency)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self.port = int(self.process.stdout.readline())

    def set(self, rate: float, latency: float = 0.0) -> None:
        self.process.stdin.write(f"{rate} {latency}\n")
        self.process.stdin.flush()
        self.process.stdout.readline()

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)


if __name__ == "__main__":
    raise SystemExit(main())
