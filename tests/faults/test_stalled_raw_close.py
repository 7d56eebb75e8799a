"""Raw TCP and TLS-passthrough exposures (tunneld/tcpexpose.py): a clean close that the client
never lets finish is reset (RST), with or without ``idle_timeout``; a slow reader gets it all.

A raw connection's clean close begins once both sides ended: the client half-closed (FIN) after
its request, the service answered and closed. The edge then closes its socket to the client
once the rest is sent, and a client that reads nothing would keep that close, its buffer and
its place in ``max_connections`` / ``max_connections_per_ip`` for ever where no idle sweep runs
(``idle_timeout = 0``). So the close is watched as every public connection's is
(``relay.mux.StalledCloseWatch``, a look every ``keepalive_timeout`` or ``idle_timeout``, the
shorter): a look that finds the client took nothing since the previous one resets the
connection, and the client, which did not get everything, sees a reset, never a clean end.
Bytes it takes, however slowly, keep the connection until the end.

The same for a ``tls`` exposure (``public_tls_passthrough``): the edge routes the connection by
the ClientHello's server name and relays it raw, so the "request" here is a real ClientHello
and the service (which would terminate TLS) just answers bytes.

Deterministic as test_stalled_close.py: small buffers on both sides, an answer (384 KiB) larger
than they hold yet within what the edge takes from the tunnel before it stops reading it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import pytest

from tests.e2e.conftest import wait_until
from tests.faults.conftest import Stack, tls_files

pytestmark = pytest.mark.anyio

ANSWER: Final = os.urandom(384 * 1024)
DOMAIN: Final = "preview.test"
TOKEN: Final = "raw0token"  # no "_": wildcard certificates


class _AnswerAtEof:
    """A service that reads until the client's EOF, then sends ``ANSWER`` and closes; records
    how its side ended ("closed": all written and closed; else the error)."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.ended: asyncio.Future[str] | None = None

    async def start(self) -> int:
        self.ended = asyncio.get_running_loop().create_future()
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        outcome = "closed"
        try:
            async with asyncio.timeout(10):
                while await reader.read(65536):
                    pass
                writer.write(ANSWER)
                await writer.drain()
        except (ConnectionError, TimeoutError) as exc:
            outcome = type(exc).__name__
        finally:
            writer.close()
            if self.ended is not None and not self.ended.done():
                self.ended.set_result(outcome)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def _client_hello(server_hostname: str) -> bytes:
    """A real TLS ClientHello for ``server_hostname`` (what the passthrough listener routes)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    sslobj = context.wrap_bio(
        ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=server_hostname
    )
    with contextlib.suppress(ssl.SSLWantReadError):
        sslobj.do_handshake()
    return out.read()


@contextlib.asynccontextmanager
async def _exposed(
    kind: str, tmp_path: Path, **config: Any
) -> AsyncIterator[tuple[Stack, _AnswerAtEof, int, bytes]]:
    """An edge with ``config``, an agent, and ``_AnswerAtEof`` exposed as a ``kind`` exposure:
    the stack, the service, the port to connect to and the first bytes to send."""
    service = _AnswerAtEof()
    port = await service.start()
    if kind == "tcp":
        # above the kernel's ephemeral range; the allocator skips a port another process holds
        first = random.randint(61000, 65535 - 16)
        config["public_tcp_ports"] = f"{first}-{first + 15}"
    else:
        _, cert, key = tls_files(tmp_path, f"*.{DOMAIN}")
        config.update(
            domain=DOMAIN,
            scheme="https",
            public_tls_cert=cert,
            public_tls_key=key,
            public_tls_passthrough=True,
        )
    stack = await Stack(**config).start()
    try:
        assert stack.edge is not None
        await stack.agent("sb1")
        if kind == "tcp":
            exposure = await stack.expose("sb1", port, protocol="tcp")
            yield stack, service, int(exposure["publicPort"]), b"request"
        else:
            await stack.expose("sb1", port, protocol="tls", token=TOKEN)
            hello = _client_hello(f"{port}-sb1-{TOKEN}.{DOMAIN}")
            yield stack, service, stack.edge.public_port, hello
    finally:
        await stack.close()
        await service.close()


async def _stalled_download(stack: Stack, port: int, request: bytes) -> tuple[socket.socket, Any]:
    """A client that sends ``request`` and its FIN, then reads nothing; returns it and the
    edge's connection once the edge's clean close is under way with bytes it cannot send."""
    assert stack.edge is not None
    manager = stack.edge.tcp
    assert manager is not None
    loop = asyncio.get_running_loop()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    client.setblocking(False)
    await asyncio.wait_for(loop.sock_connect(client, ("127.0.0.1", port)), 5)
    await loop.sock_sendall(client, request)
    await wait_until(lambda: len(manager.connections) == 1, 5, "the edge relays the connection")
    (conn,) = manager.connections
    assert conn.transport is not None
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    client.shutdown(socket.SHUT_WR)  # the request is complete: the service answers now

    def closing_with_unsent() -> bool:
        t = conn.transport
        return t is None or (t.is_closing() and t.get_write_buffer_size() > 0)

    await wait_until(closing_with_unsent, 10, "the edge's clean close, bytes left unsent")
    assert conn.transport is not None, "the connection ended before the test could look at it"
    return client, conn


async def _read_to_the_end(
    client: socket.socket, timeout: float, pause: float = 0.0
) -> tuple[bytes, str]:
    """Everything the client can still read (4 KiB a read, ``pause`` seconds apart with a
    pause), and how the connection ended."""
    loop = asyncio.get_running_loop()
    received = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while chunk := await loop.sock_recv(client, 4096 if pause else 65536):
                received += chunk
                if pause:
                    await asyncio.sleep(pause)
    except ConnectionResetError:
        return bytes(received), "reset"
    return bytes(received), "clean EOF"


@pytest.mark.parametrize("kind", ["tcp", "tls"], ids=["tcp", "tls-passthrough"])
@pytest.mark.parametrize(
    "timeouts",
    [
        {"idle_timeout": 0, "keepalive_timeout": 0.5},  # no idle sweep: the watch alone
        {"idle_timeout": 0.5},  # keepalive_timeout 75 s: the watch looks every idle_timeout
    ],
    ids=["no-idle-sweep", "idle-sweep"],
)
async def test_a_raw_close_the_client_never_lets_finish_is_reset_and_freed(
    kind: str, timeouts: dict[str, Any], tmp_path: Path
) -> None:
    async with _exposed(kind, tmp_path, max_connections_per_ip=1, **timeouts) as (
        stack,
        service,
        port,
        request,
    ):
        assert stack.edge is not None and stack.edge.tcp is not None
        edge = stack.edge
        client, _ = await _stalled_download(stack, port, request)
        with client:
            assert service.ended is not None
            # the service got the client's end and sent everything: its side ended normally
            assert await asyncio.wait_for(service.ended, 10) == "closed"
            await wait_until(
                lambda: not edge.tcp.connections, 10, "the stalled connection was ended"
            )
            assert not edge.public_limits.per_ip  # its place in the limits is free again
            state = edge.registry.get("sb1")
            assert state is not None and state.session is not None
            assert not state.session.streams  # the tunnel stream is forgotten too
            received, ended = await _read_to_the_end(client, 10)
            assert len(received) < len(ANSWER)
            assert ended == "reset", f"a cut answer ended with a {ended}"


@pytest.mark.parametrize("kind", ["tcp", "tls"], ids=["tcp", "tls-passthrough"])
async def test_a_slow_raw_client_gets_the_whole_answer(kind: str, tmp_path: Path) -> None:
    """Bytes the client takes keep the connection: 4 KiB a read, 25 ms apart, the rest of the
    answer takes it many looks of the watch (0.5 s), without an idle sweep; it gets every byte,
    then a clean end."""
    async with _exposed(kind, tmp_path, idle_timeout=0, keepalive_timeout=0.5) as (
        stack,
        _,
        port,
        request,
    ):
        assert stack.edge is not None and stack.edge.tcp is not None
        edge = stack.edge
        client, _ = await _stalled_download(stack, port, request)
        with client:
            received, ended = await _read_to_the_end(client, 60, pause=0.025)
            assert (len(received), ended) == (len(ANSWER), "clean EOF")
            assert received == ANSWER
            await wait_until(lambda: not edge.tcp.connections, 10, "the edge's side ended")
