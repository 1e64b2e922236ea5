"""Fixtures shared by the test modules; their helpers are the package ``support`` beside this file."""

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # ``support`` and ``mutants`` import as top-level packages

from support.models import tiny_model
from support.redis_server import RedisServer


@pytest.fixture
def model():
    """A fresh tiny Llama (seed 0) the test may change; a module that needs another defines its own."""
    return tiny_model("llama")


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


@pytest.fixture
def quiet_single_thread():
    """No deprecation noise; one intra-op thread (tiny matrices: 2 threads only spin, and under a loaded
    machine they made the exactness suite 3x slower). A module opts in with
    ``pytestmark = pytest.mark.usefixtures("quiet_single_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        torch.set_num_threads(threads)
