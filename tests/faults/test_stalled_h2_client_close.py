"""HTTP/2 over TLS: a close the *client* begins (its ``close_notify``, or a FIN) is watched as the
edge's own closes are (test_stalled_h2_close.py): a client that then takes nothing of what is
still owed is reset (RST) at the first look of the connection's ``StalledCloseWatch`` that finds
nothing taken, and a slow one that keeps reading gets every byte.

On the client's end asyncio's TLS layer (and uvloop's) shuts the connection down by itself and
the HTTP/2 connection is not told: the rest waits for a client that may never read it. Where no
idle sweep runs (``idle_timeout = 0``) and a stream has no timer of its own (a WebSocket over
HTTP/2, RFC 8441, whose service keeps sending), nothing else would ever end that close. The
service is blocked by the tunnel's flow control meanwhile: once the connection is reset, its
tunnel stream is reset too, so the service sees a reset rather than waiting for ever.

The client is the ``h2`` library over a real TLS client on 127.0.0.1 whose reads the test
controls (``_TlsClient``), with small kernel buffers on both sides, as in
test_stalled_h2_close.py.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import h2.config
import h2.connection
import h2.settings
import pytest

from tests.e2e.conftest import wait_until
from tests.e2e.test_h2_edges import accept_upgrade
from tests.faults.test_stalled_close import _BigThenClose
from tests.faults.test_stalled_h2_close import BODY, WINDOW, _H2Download
from tests.faults.test_stalled_tls_close import (
    _BigThenCloseOf,
    _connect,
    _exposed_tls,
    _TlsClient,
)

pytestmark = pytest.mark.anyio

# Far more than the edge holds for a stream whose client reads nothing (its TLS layer's buffer,
# a stream queue, a tunnel stream window): the service is still writing when the client ends.
ENDLESS: Final = 16 * 1024 * 1024


class _WebSocketFlood(_BigThenClose):
    """A WebSocket service that accepts the upgrade, then sends ``ENDLESS`` bytes (what they
    are does not matter to the edge, which relays them raw); ``ended`` says how its side ended
    ("complete", or the error that stopped it)."""

    def __init__(self) -> None:
        super().__init__()
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        outcome = "complete"
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            accept_upgrade(writer, head)
            chunk = b"x" * 65536
            for _ in range(ENDLESS // len(chunk)):
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 30)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError) as exc:
            outcome = type(exc).__name__
        finally:
            writer.close()
            self.closed.set()
            if not self.ended.done():
                self.ended.set_result(outcome)


async def _open_websocket(client: _TlsClient, host: str) -> h2.connection.H2Connection:
    """An RFC 8441 WebSocket over h2, with windows for everything at once: reads the edge's
    SETTINGS (extended CONNECT must be on), sends the CONNECT; nothing is read after that."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW}
    )
    conn.initiate_connection()
    conn.increment_flow_control_window(WINDOW - 65535)
    await client.send(conn.data_to_send())
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(10):
        while conn.remote_settings.enable_connect_protocol != 1:
            raw = await loop.sock_recv(client.sock, 65536)
            assert raw, "the edge closed before its SETTINGS"
            client.incoming.write(raw)
            try:
                while plain := client.tls.read(65536):
                    conn.receive_data(plain)
            except ssl.SSLWantReadError:
                pass
    conn.send_headers(
        conn.get_next_available_stream_id(),
        [
            (b":method", b"CONNECT"),
            (b":protocol", b"websocket"),
            (b":scheme", b"https"),
            (b":authority", host.encode()),
            (b":path", b"/ws"),
            (b"sec-websocket-version", b"13"),
        ],
    )
    await client.send(conn.data_to_send())
    return conn


async def _end_from_the_client(client: _TlsClient, how: str) -> None:
    """The client is done: ``close_notify`` (its socket stays open both ways) or a FIN."""
    if how == "close_notify":
        try:
            client.tls.unwrap()
        except ssl.SSLWantReadError:  # (the edge's close_notify has not come: it never reads)
            pass
        notify = client.outgoing.read()
        assert notify, "no close_notify to send"
        await asyncio.get_running_loop().sock_sendall(client.sock, notify)
    else:
        client.sock.shutdown(socket.SHUT_WR)


@asynccontextmanager
async def _h2_client(
    tmp_path: Path, service: _BigThenClose, **config: Any
) -> AsyncIterator[tuple[Any, _TlsClient, Any, str]]:
    """A TLS client that chose h2, reading nothing yet: the edge, the client, the edge's
    connection and the preview host."""
    async with _exposed_tls(tmp_path, service, alpn="h2", **config) as (stack, context, host):
        client: _TlsClient | None = None
        try:
            client, conn = await _connect(stack, context, host, rcvbuf=4096, sndbuf=8192)
            assert client.tls.selected_alpn_protocol() == "h2"
            yield stack.edge, client, conn, host
        finally:
            if client is not None:
                client.sock.close()


@pytest.mark.parametrize("how", ["close_notify", "FIN"])
async def test_a_client_that_ends_and_reads_nothing_is_reset(tmp_path: Path, how: str) -> None:
    """No idle sweep; a WebSocket stream open, its service still sending (blocked by the
    tunnel's flow control): the client ends the connection and takes nothing more. The watch's
    first look (keepalive_timeout, 0.5 s) that finds nothing taken resets the connection; the
    client, which did not get everything, sees ECONNRESET, not a FIN; the connection's place in
    the limits is free, and the service's connection is reset (its tunnel stream was)."""
    service = _WebSocketFlood()
    async with _h2_client(tmp_path, service, idle_timeout=0, keepalive_timeout=0.5) as (
        edge,
        client,
        conn,
        host,
    ):
        await _open_websocket(client, host)

        def stuck() -> bool:
            h2conn = conn.h2
            return h2conn is not None and h2conn._write_paused and bool(h2conn.streams)

        await wait_until(stuck, 10, "the edge's TLS layer full, the stream still open")
        await _end_from_the_client(client, how)
        await wait_until(
            lambda: conn not in edge.public_connections, 15, "the stalled connection was ended"
        )
        assert not edge.public_limits.per_ip
        assert await asyncio.wait_for(service.ended, 10) == "ConnectionResetError"
        received, ended = await client.read_to_the_end(10)
        assert ended == "reset", f"a cut h2 connection ended with a {ended}"
        assert len(received) < ENDLESS


# How the connection ends for the client. After its close_notify: the edge's close_notify.
# After its FIN, asyncio's TLS layer sends none (uvloop's may, or the edge's own close began
# first): END_STREAM says the response is all there, and nothing says otherwise.
ENDS: Final = {
    "close_notify": {"close_notify"},
    "FIN": {"close_notify", "TLS error (UNEXPECTED_EOF_WHILE_READING)"},
}


@pytest.mark.parametrize("how", ["close_notify", "FIN"])
async def test_a_slow_client_that_ends_gets_everything(tmp_path: Path, how: str) -> None:
    """The response is complete at the edge (END_STREAM queued behind the DATA the client has
    not read) when the client ends the connection; it then reads slowly across many looks of
    the watch (0.5 s apart; at most 4 KiB every 100 ms, so over 6 s for the rest of BODY): it
    gets every DATA byte and END_STREAM, never a reset."""
    service = _BigThenCloseOf(BODY)
    async with _h2_client(tmp_path, service, idle_timeout=0, keepalive_timeout=0.5) as (
        edge,
        client,
        conn,
        host,
    ):
        download = _H2Download(client, host)
        await download.ask()
        await asyncio.wait_for(service.closed.wait(), 10)
        await wait_until(
            lambda: conn.h2 is not None and not conn.h2.streams, 10, "the stream done at the edge"
        )
        await _end_from_the_client(client, how)
        received, ended = await client.read_to_the_end(60, chunk=4096, pause=0.1)
        assert ended in ENDS[how], f"a complete h2 response ended with a {ended}"
        data, seen = download.parse(received)
        assert data == BODY
        assert seen[:2] == ["headers 200", "end of stream"] and "stream reset" not in seen
        await wait_until(lambda: conn not in edge.public_connections, 15, "the edge's side ended")
