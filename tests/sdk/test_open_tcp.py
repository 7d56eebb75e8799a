"""``Sandbox.open_tcp`` against real ``tunneld`` and ``tunnel-agent`` processes, on asyncio,
uvloop and trio (the ``anyio_backend`` of tests/sdk/conftest.py): an anyio byte stream to a port
in the sandbox, with half-close, resets and the typed errors."""

from __future__ import annotations

import hashlib
import signal
import socket
from collections.abc import Iterator

import anyio
import anyio.abc
import pytest

from tests.e2e.origin import pattern, pattern_sha256
from tests.e2e.procs import Processes, is_connected, wait_for
from tests.e2e.tcpserver import HashServer
from tunneld.client import (
    AuthenticationError,
    InvalidPortError,
    NotFoundError,
    TcpStream,
    TunnelClient,
    TunnelError,
)

pytestmark = pytest.mark.anyio

IO_TIMEOUT = 30.0
MIB = 1 << 20


@pytest.fixture
def edge(procs: Processes) -> Iterator[Processes]:
    """tunneld and an agent for sandbox sb1, as processes."""
    procs.start_edge()
    procs.start_agent("sb1")
    wait_for(lambda: is_connected(procs, "sb1"), what="the agent's session")
    yield procs


def client_of(p: Processes, token: str | None = None) -> TunnelClient:
    return TunnelClient(f"http://127.0.0.1:{p.ports['admin']}", token or p.admin_token)


async def receive_all(stream: anyio.abc.ByteStream) -> bytes:
    data = bytearray()
    while True:
        try:
            data += await stream.receive()
        except anyio.EndOfStream:
            return bytes(data)


async def test_open_tcp_bytes_by_hash_with_half_close(
    edge: Processes, hash_server: HashServer
) -> None:
    size = 4 * MIB
    tcp = await client_of(edge).sandbox("sb1").open_tcp(hash_server.port)
    assert isinstance(tcp, anyio.abc.ByteStream) and isinstance(tcp, TcpStream)
    async with tcp:
        with anyio.fail_after(IO_TIMEOUT):
            await tcp.send(b"hash %d\n" % size)
            for piece in pattern(size):
                await tcp.send(piece)
            await tcp.send_eof()  # the service reads EOF, then answers: half-close honoured
            received = await receive_all(tcp)
    line, _, rest = received.partition(b"\n")
    assert line.decode() == pattern_sha256(size)
    assert hashlib.sha256(rest).hexdigest() == pattern_sha256(size, seed=2)
    assert hash_server.ends == ["eof"]


async def test_open_tcp_concurrent_streams_stay_apart(
    edge: Processes, hash_server: HashServer
) -> None:
    sandbox = client_of(edge).sandbox("sb1")
    results: dict[int, bytes] = {}

    async def one(i: int) -> None:
        async with await sandbox.open_tcp(hash_server.port) as tcp:
            payload = bytes([i]) * (100_000 + i)
            await tcp.send(b"hash 0\n" + payload)
            await tcp.send_eof()
            results[i] = await receive_all(tcp)

    with anyio.fail_after(IO_TIMEOUT):
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(one, i)
    for i, answer in results.items():
        assert answer == hashlib.sha256(bytes([i]) * (100_000 + i)).hexdigest().encode() + b"\n"
    assert len(results) == 5


async def test_open_tcp_agent_killed_is_a_reset_not_eof(
    procs: Processes, hash_server: HashServer
) -> None:
    procs.start_edge()
    agent, _ = procs.start_agent("sb1")
    wait_for(lambda: is_connected(procs, "sb1"), what="the agent's session")
    async with await client_of(procs).sandbox("sb1").open_tcp(hash_server.port) as tcp:
        with anyio.fail_after(IO_TIMEOUT):
            await tcp.send(b"hold %d\n" % (16 * MIB))
            got = 0
            while got < MIB:
                got += len(await tcp.receive())
            agent.send_signal(signal.SIGKILL)
            with pytest.raises(anyio.BrokenResourceError):
                while True:
                    await tcp.receive()  # EndOfStream (a clean end) would fail the test


async def test_open_tcp_abort_resets_the_service(edge: Processes, hash_server: HashServer) -> None:
    """``abort()`` is an abnormal end all the way to the service (its socket gets RST)."""
    tcp = await client_of(edge).sandbox("sb1").open_tcp(hash_server.port)
    with anyio.fail_after(IO_TIMEOUT):
        await tcp.send(b"hold 1\n")
        assert await tcp.receive() == next(pattern(1, 3))
        await tcp.abort()
        while not hash_server.ends:
            await anyio.sleep(0.02)
    assert hash_server.ends == ["reset"]


async def test_open_tcp_errors_are_typed(edge: Processes) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(TunnelError) as refused:
        await client_of(edge).sandbox("sb1").open_tcp(free)
    assert (refused.value.status, refused.value.code) == (502, "UPSTREAM_CONNECT_FAILED")
    with pytest.raises(AuthenticationError):
        await client_of(edge, "wrong").sandbox("sb1").open_tcp(free)
    with pytest.raises(NotFoundError) as unknown:
        await client_of(edge).sandbox("nobody").open_tcp(free)
    assert unknown.value.code == "SANDBOX_NOT_FOUND"
    with pytest.raises(InvalidPortError):
        await client_of(edge).sandbox("sb1").open_tcp(3000)
