"""Bounds of the admin raw-TCP WebSocket (tunneld/tcpws.py) against a client that does not play
its part: pings it never reads the pongs of, and a close handshake it never finishes.

- Pings need no stream credit, so the edge reads them however fast they come; while the client
  does not read, only the latest pong is kept (RFC 6455 5.5.3): the edge's output to it stays at
  the socket's high-water mark plus one pong, not one pong per ping.
- When the service ends, the edge sends Close 1000 and waits ``CLOSE_TIMEOUT`` for the client's
  Close; a client that never sends it loses the connection then.

Raw sockets on 127.0.0.1 speak the WebSocket by hand (masked frames, mask key 0), so the client
can do exactly what a hostile one does; tests/e2e/tcpserver.py is the service in the sandbox.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct

import pytest

from relay.mux import LOCAL_HIGH_WATER
from tests.e2e.conftest import wait_until
from tests.e2e.tcpserver import HashServer
from tunneld import tcpws
from tunneld.tcpws import WebSocketTcpEndpoint

from .conftest import Stack, closed_within, stack  # noqa: F401  (the fixture)

pytestmark = pytest.mark.anyio

IO_TIMEOUT = 10.0
BINARY, CLOSE, PING = 0x2, 0x8, 0x9
PONG_SIZE = 2 + 125  # the edge's pong to a ping with the largest control payload
FLOOD = 8 * 1024 * 1024


def frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame (mask key 0: the payload goes as it is)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    else:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    return head + b"\0\0\0\0" + payload


async def open_ws(
    stack: Stack,  # noqa: F811
    port: int,
    rcvbuf: int | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert stack.edge is not None
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", stack.edge.admin_port)), 5)
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16))
    writer.write(
        b"GET /v1/sandboxes/sb1/ports/%d/tcp HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
        % (port, stack.admin_token.encode(), key)
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return reader, writer


def ws_endpoint(stack: Stack) -> WebSocketTcpEndpoint:  # noqa: F811
    assert stack.edge is not None
    state = stack.edge.registry.get("sb1")
    assert state is not None and state.session is not None
    (endpoint,) = [e for e in state.session.streams.values() if isinstance(e, WebSocketTcpEndpoint)]
    return endpoint


async def test_a_ping_flood_never_read_keeps_one_pong(
    stack: Stack,  # noqa: F811
    hash_server: HashServer,
) -> None:
    await stack.agent("sb1")
    _reader, writer = await open_ws(stack, hash_server.port, rcvbuf=4096)
    try:
        writer.write(frame(BINARY, b"hold 0\n"))  # a stream the service keeps open
        endpoint = ws_endpoint(stack)
        assert endpoint.transport is not None
        transport = endpoint.transport
        bound = LOCAL_HIGH_WATER + 2 * PONG_SIZE  # the mark, the pong that crossed it, one kept
        batch = frame(PING, b"p" * 125) * 512
        sent = 0
        while sent < FLOOD:
            writer.write(batch)
            await asyncio.wait_for(writer.drain(), IO_TIMEOUT)  # the edge reads the pings
            sent += len(batch)
        last = b"last ping" + b"." * 116
        writer.write(frame(PING, last))
        await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
        await wait_until(
            lambda: endpoint._pong == last or transport.get_write_buffer_size() > bound,
            timeout=IO_TIMEOUT,
            what="the edge to read the whole flood",
        )
        owed = sent // len(frame(PING, b"p" * 125)) * PONG_SIZE
        assert owed > 10 * bound  # the flood asked for far more than the bound
        assert transport.get_write_buffer_size() <= bound
    finally:
        writer.transport.abort()


async def test_a_close_the_client_never_answers_ends_the_connection(
    stack: Stack,  # noqa: F811
    hash_server: HashServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tcpws, "CLOSE_TIMEOUT", 0.5)
    await stack.agent("sb1")
    reader, writer = await open_ws(stack, hash_server.port)
    try:
        # "hash 0": the service reads to EOF (the empty message), answers and ends: the edge
        # then sends Close 1000, which this client never answers
        writer.write(frame(BINARY, b"hash 0\n") + frame(BINARY, b""))
        received = await closed_within(reader, IO_TIMEOUT)
        assert bytes([0x80 | CLOSE, 2]) + (1000).to_bytes(2, "big") in received, received
    finally:
        writer.transport.abort()
