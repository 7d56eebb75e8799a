"""Bound: the WebSocket agent link's pongs to a peer that does not read them
(relay/mux.py ``TUNNEL_OUTPUT_CAP``).

The agent port answers an HTTP upgrade to ``/v1/agent`` before any hello, and then every WebSocket
ping with a pong of the same size: anyone who reaches the agent port can flood pings and never
read. Past ``TUNNEL_OUTPUT_CAP`` (1 MiB) unsent the edge stops reading that connection, so the
flood is held at the sender, and says so in a warning; the connection still ends at
``handshake_timeout`` as any that sends no hello.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from relay.mux import TUNNEL_OUTPUT_CAP
from tests.e2e.conftest import wait_until

from .conftest import Stack, stack  # noqa: F401  (the fixture)

pytestmark = pytest.mark.anyio

UPGRADE = (
    b"GET /v1/agent HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
# A masked ping with the largest control payload (125 bytes), mask key 0: 131 bytes on the wire,
# a 127-byte pong back.
PING = b"\x89\xfd\x00\x00\x00\x00" + b"p" * 125
BATCH = PING * 512  # 65 KiB
FLOOD = 8 * 1024 * 1024
SLACK = 512 * 1024  # one read (256 KiB) of pings answered after the cap was last checked


async def test_a_pre_hello_ping_flood_that_is_never_read_stops_at_the_output_cap(
    stack: Stack,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "tunneld")
    caplog.set_level(logging.WARNING, "relay")
    assert stack.edge is not None
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # reads nothing after the 101
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", stack.edge.agent_port)), 10)
        await asyncio.wait_for(loop.sock_sendall(sock, UPGRADE), 10)
        answer = await asyncio.wait_for(loop.sock_recv(sock, 4096), 10)
        assert answer.startswith(b"HTTP/1.1 101"), answer
        sent = 0
        while sent < FLOOD:
            try:
                await asyncio.wait_for(loop.sock_sendall(sock, BATCH), 3)
            except TimeoutError:
                break  # the edge stopped reading: the flood is held here
            sent += len(BATCH)
        (session,) = stack.edge.agent_connections

        def warned() -> bool:
            return any("does not read what it asks for" in r.getMessage() for r in caplog.records)

        await wait_until(
            lambda: warned() or session.output_backlog > TUNNEL_OUTPUT_CAP + SLACK,
            timeout=5,
            what="the edge to stop reading or to pass the cap",
        )
        backlog = session.output_backlog
        assert backlog <= TUNNEL_OUTPUT_CAP + SLACK, (backlog, sent)
        assert backlog > TUNNEL_OUTPUT_CAP // 2, (backlog, sent)  # the flood reached the cap
        assert warned()
    finally:
        sock.close()
