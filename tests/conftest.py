"""Fixtures shared by the test modules (helpers live beside this file and are imported by name)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from redis_server import RedisServer


@pytest.fixture(scope="module")
def module_server(tmp_path_factory):
    """One real redis-server per test module (started from Debian's package; fails if it is missing)."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def server(module_server):
    """The module's server, empty, with its memory limit restored (restarted if a test killed it)."""
    if module_server.process is None:
        module_server.start()
    client = module_server.client()
    client.config_set("maxmemory", module_server.maxmemory)
    client.flushall()
    return module_server
