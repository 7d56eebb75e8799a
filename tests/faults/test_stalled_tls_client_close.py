"""HTTPS/1.1: a close the *client* begins (its ``close_notify``) is watched as the edge's own
closes are (test_stalled_tls_close.py), as HTTP/2's is (test_stalled_h2_client_close.py): a
client that then takes nothing of what is still owed is reset (RST) at the first look of the
connection's ``StalledCloseWatch`` that finds nothing taken.

On the client's ``close_notify`` the TLS layer (asyncio's and uvloop's) shuts the connection
down by itself: what it still holds waits for a client that may never read it. Where no idle
sweep runs (``idle_timeout = 0``) and nothing else times the connection (a WebSocket whose
service keeps sending), nothing else would ever end that close, and the service stays blocked
by the tunnel's flow control. Real TLS client on 127.0.0.1 whose reads the test controls
(``_TlsClient``), small kernel buffers on both sides.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.e2e.conftest import wait_until
from tests.faults.test_stalled_h2_client_close import (
    ENDLESS,
    _end_from_the_client,
    _WebSocketFlood,
)
from tests.faults.test_stalled_tls_close import _connect, _exposed_tls

pytestmark = pytest.mark.anyio


async def test_a_websocket_client_that_ends_and_reads_nothing_is_reset(tmp_path: Path) -> None:
    """No idle sweep; a WebSocket over HTTPS/1.1, its service still sending (blocked by the
    tunnel's flow control): the client sends close_notify and takes nothing more. The watch's
    first look (keepalive_timeout, 0.5 s) that finds nothing taken resets the connection: the
    client sees ECONNRESET, the connection's place in the limits is free, and the service's
    connection is cut (its tunnel stream was reset)."""
    service = _WebSocketFlood()
    async with _exposed_tls(tmp_path, service, idle_timeout=0, keepalive_timeout=0.5) as (
        stack,
        context,
        host,
    ):
        edge = stack.edge
        assert edge is not None
        client, conn = await _connect(stack, context, host, rcvbuf=4096, sndbuf=8192)
        try:
            await client.send(
                b"GET /ws HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                % host.encode()
            )
            await wait_until(
                lambda: conn._write_paused, 10, "the edge's TLS layer full, the tunnel open"
            )
            await _end_from_the_client(client, "close_notify")
            await wait_until(
                lambda: conn not in edge.public_connections, 15, "the stalled connection ended"
            )
            assert not edge.public_limits.per_ip
            # its next write meets the reset (EPIPE once the agent's socket to it is gone)
            ended_service = await asyncio.wait_for(service.ended, 10)
            assert ended_service in ("ConnectionResetError", "BrokenPipeError")
            received, ended = await client.read_to_the_end(10)
            assert ended == "reset", f"a cut WebSocket ended with a {ended}"
            assert len(received) < ENDLESS
        finally:
            client.sock.close()
