"""Suite-wide settings."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.e2e.procs import PROXY_VARIABLES, Processes
from tests.e2e.tcpserver import HashServer
from tests.redis_server import RedisServer

# The machines that run this suite are shared and noisy: a per-example deadline would turn a busy
# neighbour into a failure. Example counts stay bounded by each test's own @settings.
settings.register_profile("tunneld", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("tunneld")


@pytest.fixture(autouse=True)
def _no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """Real tunneld / tunnel-agent child processes (uvloop), all killed afterwards."""
    p = Processes(tmp_path, "uvloop")
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a Unix socket (tests/redis_server.py)."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_tcp_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on 127.0.0.1 (a random free port)."""
    server = RedisServer(tmp_path / "redis-tcp", tcp=True).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_tls_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server speaking TLS only on 127.0.0.1 (``url``: ``rediss://``, its CA)."""
    server = RedisServer(tmp_path / "redis-tls", tls=True).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hash_server() -> Iterator[HashServer]:
    """A TCP service that hashes what it reads (tests/e2e/tcpserver.py): the raw-TCP tests'."""
    server = HashServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def refusing(reserved: socket.socket) -> int:
    """A port on 127.0.0.1 where a connect is refused (``reserved``, never listening)."""
    return int(reserved.getsockname()[1])


@pytest.fixture
def reserved() -> Iterator[socket.socket]:
    """A port that is ours and refuses connects until ``listen()`` (bound, not listening):
    the port-readiness tests make it ready when they choose."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock
    finally:
        sock.close()


@pytest.fixture
def closed_port(reserved: socket.socket) -> int:
    """A loopback port where nothing listens: ``reserved``'s, bound (so nobody else takes it) but
    never listening."""
    return int(reserved.getsockname()[1])
