"""A clean close that the client never lets finish is cut with RST, and frees what it held.

The service sends a response larger than what the kernel can hold for a client that does not
read, then closes; the edge begins a clean close of the client connection, but its transport
keeps the unsent rest as long as the client reads nothing. Such a connection must not hold its
buffer and its place in ``max_connections`` / ``max_connections_per_ip`` forever: when a look
of its ``StalledCloseWatch`` (every ``keepalive_timeout`` or ``idle_timeout``, the shorter)
finds that the client took nothing since the previous one, the connection is reset. The client did
not get the whole response, so it sees a reset, never a clean end after part of the body.
A client that reads slowly but keeps taking bytes is not cut.

Deterministic whatever the kernel's buffer autotuning: the client's receive buffer and the
edge socket's send buffer are set small before the request, and the response (384 KiB) is
larger than both plus nothing else, yet fits in what the edge takes from the tunnel before it
stops reading it (the transport's 256 KiB high-water mark plus a 256 KiB stream window), so the
service always gets to close.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest

from tests.e2e.conftest import wait_until
from tests.faults.conftest import Stack, get_and_close

pytestmark = pytest.mark.anyio

BODY = 384 * 1024
HEAD = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"  # no length: it ends with the connection


class _BigThenClose:
    """A service that answers every request with ``HEAD`` and ``BODY`` bytes, then closes."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.closed = asyncio.Event()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            writer.write(HEAD + b"x" * BODY)
            await asyncio.wait_for(writer.drain(), 10)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.closed.set()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def _stalled_request(stack: Stack, host: bytes) -> tuple[socket.socket, object]:
    """A client that asks for the response and reads nothing; returns it and the edge's
    connection once the edge's clean close is under way with bytes it cannot send."""
    assert stack.edge is not None
    edge = stack.edge
    loop = asyncio.get_running_loop()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    client.setblocking(False)
    await asyncio.wait_for(loop.sock_connect(client, ("127.0.0.1", edge.public_port)), 5)
    await wait_until(lambda: len(edge.public_connections) == 1, 5, "the edge accepted it")
    (conn,) = edge.public_connections
    assert conn.transport is not None
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    await loop.sock_sendall(client, b"GET /big HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")

    def closing_with_unsent() -> bool:
        t = conn.transport
        return t is None or (t.is_closing() and t.get_write_buffer_size() > 0)

    await wait_until(closing_with_unsent, 5, "the edge's clean close, bytes left unsent")
    assert conn.transport is not None, "the connection ended before the test could look at it"
    return client, conn


@contextlib.asynccontextmanager
async def _exposed(**options: object) -> AsyncIterator[tuple[Stack, bytes, _BigThenClose]]:
    """An edge with ``options``, an agent, and ``_BigThenClose`` exposed: its preview host."""
    service = _BigThenClose()
    port = await service.start()
    stack = await Stack(**options).start()
    try:
        await stack.agent("sb1")
        host = stack.host_of((await stack.expose("sb1", port))["exposedAt"]).encode()
        yield stack, host, service
    finally:
        await stack.close()
        await service.close()


async def _read_to_the_end(client: socket.socket, timeout: float) -> tuple[bytes, str]:
    """Everything the client can still read, and how the connection ended."""
    loop = asyncio.get_running_loop()
    received = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while chunk := await loop.sock_recv(client, 65536):
                received += chunk
    except ConnectionResetError:
        return bytes(received), "reset"
    return bytes(received), "clean EOF"


async def _expect_cut(client: socket.socket) -> None:
    """The client's end of a stalled close: part of the response, then a reset."""
    received, ended = await _read_to_the_end(client, 10)
    assert received.startswith(HEAD)
    assert len(received) < len(HEAD) + BODY
    assert ended == "reset", f"a cut response ended with a {ended}"


@pytest.mark.parametrize(
    "timeouts",
    [
        {"idle_timeout": 0.5},  # keepalive_timeout 75 s: the watch looks every idle_timeout
        {"idle_timeout": 0, "keepalive_timeout": 0.5},  # no sweep: every keepalive_timeout
    ],
    ids=["idle-sweep", "keepalive-timer"],
)
async def test_a_close_the_client_never_lets_finish_is_reset_and_freed(timeouts) -> None:
    async with _exposed(max_connections_per_ip=1, **timeouts) as (stack, host, service):
        assert stack.edge is not None
        edge = stack.edge
        client, _ = await _stalled_request(stack, host)
        with client:
            await asyncio.wait_for(service.closed.wait(), 5)
            # while it lasts, it holds this client IP's only place
            assert (await get_and_close(edge.public_port, host)).startswith(b"HTTP/1.1 503 ")
            await wait_until(
                lambda: not edge.public_connections, 10, "the stalled connection was ended"
            )
            assert not edge.public_limits.per_ip
            assert (await get_and_close(edge.public_port, host)).startswith(b"HTTP/1.1 200 OK")
            await _expect_cut(client)


async def test_a_close_that_started_no_watch_gets_one_from_the_idle_sweep() -> None:
    """Whatever began a close (the transport itself, on the client's EOF, or a path that does
    not go through ``close_gracefully``), the idle sweep gives a closing connection that has
    no ``StalledCloseWatch`` one: a stalled client is still reset, not kept for ever."""
    async with _exposed(idle_timeout=0.5) as (stack, host, _):
        assert stack.edge is not None
        edge = stack.edge
        client, conn = await _stalled_request(stack, host)
        with client:
            watch = conn._close_watch  # type: ignore[attr-defined]
            assert watch is not None
            watch.cancel()  # as if the close had started none
            conn._close_watch = None  # type: ignore[attr-defined]
            await wait_until(
                lambda: not edge.public_connections, 10, "the stalled connection was ended"
            )
            await _expect_cut(client)


async def test_a_slow_client_that_keeps_reading_gets_the_whole_response() -> None:
    """The other side: bytes the client takes count as activity, so a client that needs many
    idle timeouts to read the rest, but keeps reading, gets all of it and a clean end."""
    async with _exposed(idle_timeout=0.5, keepalive_timeout=0.5) as (stack, host, _):
        client, conn = await _stalled_request(stack, host)
        with client:
            loop = asyncio.get_running_loop()
            received = bytearray()
            ended = "clean EOF"
            try:
                async with asyncio.timeout(60):
                    while chunk := await loop.sock_recv(client, 4096):
                        received += chunk
                        # 4 KiB a read, then a pause: the rest (most of 384 KiB) takes at least
                        # 2.4 s, about 5 idle timeouts of the edge's
                        await asyncio.sleep(0.025)
            except ConnectionResetError:
                ended = "reset"
            assert (len(received), ended) == (len(HEAD) + BODY, "clean EOF")
            assert stack.edge is not None
            await wait_until(
                lambda: conn not in stack.edge.public_connections, 5, "the edge's side ended"
            )
