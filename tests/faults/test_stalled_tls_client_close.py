"""HTTPS/1.1: a close the *client* begins (its ``close_notify``) is watched as the edge's own
closes are (test_stalled_tls_close.py), as HTTP/2's is (test_stalled_h2_client_close.py): a
client that then takes nothing of what is still owed is reset (RST) at the first look of the
connection's ``StalledCloseWatch`` that finds nothing taken.

On the client's ``close_notify`` the TLS layer (asyncio's and uvloop's) shuts the connection
down by itself: what it still holds waits for a client that may never read it. Where no idle
sweep runs (``idle_timeout = 0``) and nothing else times the connection (a WebSocket whose
service keeps sending), nothing else would ever end that close, and the service stays blocked
by the tunnel's flow control.

A client that keeps reading gets the rest of a complete response and a clean end, however the
client's end and the service's race: the socket's "reset on close" (``SO_LINGER`` 0, armed at
the first response byte until a graceful close) must not be left armed when the TLS layer,
not the edge, closes the socket once the client answered, or the kernel drops what it still
holds (about its send buffer) with an RST. A response the closing TLS layer cannot finish
(bytes after the client's end, which it drops) ends with a reset.

Real TLS client on 127.0.0.1 whose reads the test controls (``_TlsClient``), small kernel
buffers on both sides.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from relay.mux import peer_hung_up
from tests.e2e.conftest import wait_until
from tests.faults.test_stalled_close import BODY, HEAD, _BigThenClose
from tests.faults.test_stalled_h2_client_close import (
    ENDLESS,
    ENDS,
    _end_from_the_client,
    _WebSocketFlood,
)
from tests.faults.test_stalled_tls_close import _BigThenCloseOf, _connect, _exposed_tls, _TlsClient
from tunneld.edge import EdgeServer
from tunneld.public import PublicConnection

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("how", ["close_notify", "FIN"])
async def test_a_websocket_client_that_ends_and_reads_nothing_is_reset(
    tmp_path: Path, anyio_backend: Any, how: str
) -> None:
    """No idle sweep; a WebSocket over HTTPS/1.1, its service still sending (blocked by the
    tunnel's flow control): the client sends close_notify (or a FIN) and takes nothing more.
    The watch's first look (keepalive_timeout, 0.5 s) that finds nothing taken resets the
    connection: the client sees ECONNRESET, the connection's place in the limits is free, and
    the service's connection is cut (its tunnel stream was reset). uvloop's TLS layer does not
    report a FIN: there it is a client that stopped reading, which ``idle_timeout`` (0.5 s here)
    bounds, with the same outcome."""
    uvloop_fin = how == "FIN" and anyio_backend[1].get("use_uvloop", False)
    service = _WebSocketFlood()
    idle = 0.5 if uvloop_fin else 0
    async with _exposed_tls(tmp_path, service, idle_timeout=idle, keepalive_timeout=0.5) as (
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
            await _end_from_the_client(client, how)
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


class _Relayed:
    """Bytes of the response the edge has relayed to the client so far (``count``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        relay = PublicConnection.receive_from_peer

        def counting(conn: PublicConnection, data: bytes) -> None:
            self.count += len(data)
            relay(conn, data)

        monkeypatch.setattr(PublicConnection, "receive_from_peer", counting)


@asynccontextmanager
async def _slow_get(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, service: _BigThenClose, keepalive: float
) -> AsyncIterator[tuple[EdgeServer, _TlsClient, PublicConnection, _Relayed]]:
    """An HTTPS edge without an idle sweep, ``service`` exposed, and a client with a small
    receive buffer that sent ``GET /`` and reads nothing yet: the edge, the client, the edge's
    connection and the count of what it relayed."""
    relayed = _Relayed(monkeypatch)
    async with _exposed_tls(tmp_path, service, idle_timeout=0, keepalive_timeout=keepalive) as (
        stack,
        context,
        host,
    ):
        edge = stack.edge
        assert edge is not None
        client, conn = await _connect(stack, context, host, rcvbuf=4096, sndbuf=8192)
        try:
            await client.send(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
            yield edge, client, conn, relayed
        finally:
            client.sock.close()


@pytest.mark.parametrize("how", ["close_notify", "FIN"])
async def test_a_slow_client_that_ends_gets_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A response read until the close (no length) is all at the edge, its service gone, when
    the client sends close_notify (or a FIN); the client then reads slowly across many looks of
    the watch (0.5 s apart; at most 4 KiB every 100 ms, so over 6 s for the rest of BODY): it
    gets every byte and the edge's close_notify (after a FIN asyncio's TLS layer sends none),
    never a reset. Whether the stream's end reaches the edge before or after the client's end
    is a race; the next test fixes each order. The service's close alone does not put the
    response at the edge (the kernel's buffers take all of it at once, and from Python 3.12
    ``wait_for`` returns without the extra task's loop iterations that let it through on
    3.11): the test waits until the edge has relayed all of it, or the client's end may come
    first and the response be cut, which must end with a reset (the next test, "cut")."""
    service = _BigThenCloseOf(BODY)
    async with _slow_get(tmp_path, monkeypatch, service, 0.5) as (edge, client, conn, relayed):
        await asyncio.wait_for(service.closed.wait(), 10)
        await wait_until(
            lambda: relayed.count == len(HEAD) + BODY, 10, "the whole response at the edge"
        )
        await _end_from_the_client(client, how)
        received, ended = await client.read_to_the_end(60, chunk=4096, pause=0.1)
        assert ended in ENDS[how], f"a complete response ended with a {ended} ({len(received)})"
        assert received == HEAD + b"x" * BODY
        await wait_until(lambda: conn not in edge.public_connections, 15, "the edge's side ended")


class _HeldEnd(_BigThenClose):
    """Answers with ``HEAD`` and ``first`` body bytes, then waits for ``release`` before it
    sends ``rest`` more and closes (the end of a response without a length)."""

    def __init__(self, first: int, rest: int) -> None:
        super().__init__()
        self.first = first
        self.rest = rest
        self.release = asyncio.Event()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            writer.write(HEAD + b"x" * self.first)
            await asyncio.wait_for(writer.drain(), 30)
            await asyncio.wait_for(self.release.wait(), 30)
            writer.write(b"x" * self.rest)
            await asyncio.wait_for(writer.drain(), 30)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.closed.set()


@pytest.mark.parametrize(
    ("how", "rest"),
    [("close_notify", 0), ("close_notify", 64 * 1024), ("FIN", 64 * 1024)],
    ids=["complete", "cut", "cut-by-FIN"],
)
async def test_a_response_that_ends_after_the_clients_close_notify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, rest: int
) -> None:
    """The order the race above may take either way, made certain: HEAD and BODY are all at
    the edge, then the client's close_notify, and only then (the TLS layer's own close under
    way) the service's end. "complete": nothing comes before the end, so the response is
    whole: the client, reading slowly, gets every byte and the edge's close_notify, not the
    reset armed at the first response byte. "cut": ``rest`` more bytes come first, which the
    closing TLS layer cannot send: the client must see a reset, never a clean end.
    "cut-by-FIN": the same after a FIN (the client keeps reading): the TLS layer drops what
    comes after it too; asyncio's reports the FIN (``eof_received``), uvloop's does not (the
    transport is not even closing), so there the edge looks for it at the graceful close
    (``POLLRDHUP``). (keepalive_timeout 5 s: its timer must not end the quiet stream first.)"""
    service = _HeldEnd(BODY, rest)
    async with _slow_get(tmp_path, monkeypatch, service, 5) as (edge, client, conn, relayed):
        await wait_until(
            lambda: relayed.count == len(HEAD) + BODY, 10, "the response so far all at the edge"
        )
        await _end_from_the_client(client, how)
        transport = conn.transport
        assert transport is not None
        if how == "FIN":
            await wait_until(
                lambda: peer_hung_up(transport), 10, "the client's FIN at the edge's socket"
            )
        else:
            await wait_until(
                transport.is_closing, 10, "the edge's TLS layer closing on the close_notify"
            )
        assert not service.closed.is_set()
        service.release.set()
        received, ended = await client.read_to_the_end(60, chunk=4096, pause=0.1)
        if rest:
            assert ended == "reset", f"a cut response ended with a {ended} ({len(received)})"
            assert len(received) < len(HEAD) + BODY + rest
        else:
            assert ended == "close_notify", (
                f"a complete response ended with a {ended} after {len(received)} bytes"
            )
            assert received == HEAD + b"x" * BODY
        await wait_until(lambda: conn not in edge.public_connections, 15, "the edge's side ended")
