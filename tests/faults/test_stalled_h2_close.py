"""HTTP/2 over TLS (tunneld/h2public.py): the connection's clean close is watched as an HTTP/1.1
one's (test_stalled_tls_close.py). Its end is the TLS layer's shutdown, whose own timeout
(counted from the close, whatever the client takes meanwhile) drops what the layer still holds
and ends with a FIN without ``close_notify``; that timeout is only a far backstop now, and the
watch decides: a client that takes nothing of what is still owed for a look of the watch is
reset (RST); a slow one that keeps reading gets every DATA frame, the END_STREAM, the GOAWAY and
``close_notify``, however long past the close that takes (here over 5 s, what the TLS layer
used to allow).

The client is the ``h2`` library over a real TLS client on 127.0.0.1 whose reads the test
controls (``_TlsClient``). It grants the edge windows large enough for the whole response at
once and reads nothing until the edge's close is under way; the kernel buffers are small on
both sides, so the rest waits in the edge's TLS layer (its buffer and its TCP transport's), as
it does for any client the kernel cannot send to. Its stream done, the connection is closed by
the keep-alive timer (``keepalive_timeout``, then ``GOAWAY_LINGER``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest

from tests.e2e.conftest import wait_until
from tests.faults.test_stalled_tls_close import (
    _BigThenCloseOf,
    _connect,
    _exposed_tls,
    _TlsClient,
    closing_with,
)

pytestmark = pytest.mark.anyio

# What fits in the edge's TLS layer (TLS_HIGH_WATER, plus its TCP transport's buffer) and the
# small kernel buffers, so that the stream ends and the close begins while the client reads
# nothing.
BODY: Final = 256 * 1024
# The client's stream and connection windows: the whole response may come at once.
WINDOW: Final = 2**31 - 1


class _H2Download:
    """One GET of the whole response over h2, the rest up to the test."""

    def __init__(self, client: _TlsClient, host: str) -> None:
        self.client = client
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW}
        )
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(WINDOW - 65535)
        self.sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            self.sid,
            [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", host.encode()),
                (b":path", b"/big"),
            ],
            end_stream=True,
        )

    async def ask(self) -> None:
        await self.client.send(self.conn.data_to_send())

    def parse(self, received: bytes) -> tuple[int, list[str]]:
        """The DATA bytes of the stream in what the client read, and its other events."""
        data = 0
        seen: list[str] = []
        for event in self.conn.receive_data(received):
            if isinstance(event, h2.events.DataReceived) and event.stream_id == self.sid:
                data += len(event.data)
            elif isinstance(event, h2.events.ResponseReceived):
                seen.append("headers " + dict(event.headers)[b":status"].decode())
            elif isinstance(event, h2.events.StreamEnded):
                seen.append("end of stream")
            elif isinstance(event, h2.events.StreamReset):
                seen.append("stream reset")
            elif isinstance(event, h2.events.ConnectionTerminated):
                seen.append(f"GOAWAY {h2.errors.ErrorCodes(event.error_code or 0).name}")
        return data, seen


@asynccontextmanager
async def _download(
    tmp_path: Path, **config: Any
) -> AsyncIterator[tuple[Any, _TlsClient, _H2Download, Any]]:
    """An h2 client that asks for BODY bytes and reads nothing, yielded (with the edge, the
    download and the edge's connection) once the edge's close is under way with bytes the
    client has not taken."""
    service = _BigThenCloseOf(BODY)
    async with _exposed_tls(tmp_path, service, alpn="h2", **config) as (stack, context, host):
        client: _TlsClient | None = None
        try:
            client, conn = await _connect(stack, context, host, rcvbuf=4096, sndbuf=8192)
            assert client.tls.selected_alpn_protocol() == "h2"
            download = _H2Download(client, host)
            await download.ask()
            await asyncio.wait_for(service.closed.wait(), 10)
            await closing_with(lambda: None if conn.h2 is None else conn.h2.transport, 0)
            yield stack.edge, client, download, conn
        finally:
            if client is not None:
                client.sock.close()


async def test_an_h2_close_the_client_never_lets_finish_ends_with_a_reset(tmp_path: Path) -> None:
    """The first look of the watch (keepalive_timeout, 0.5 s) that finds nothing taken resets the
    connection: the client, which did not get everything, sees ECONNRESET, not a FIN."""
    async with _download(tmp_path, idle_timeout=0, keepalive_timeout=0.5) as (
        edge,
        client,
        download,
        conn,
    ):
        await wait_until(
            lambda: conn not in edge.public_connections, 15, "the stalled connection was ended"
        )
        received, ended = await client.read_to_the_end(10)
        assert ended == "reset", f"a cut h2 connection ended with a {ended}"
        data, _ = download.parse(received)
        assert data < BODY


async def test_a_slow_h2_client_gets_everything_left_at_the_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read across many looks of the watch (0.5 s apart) from the start of the close: every DATA
    byte, END_STREAM, GOAWAY and close_notify. The client takes at most 4 KiB of its socket
    every 100 ms (at most 40 KiB/s); until the close began it had read nothing, and its kernel
    had taken no more than its small receive buffer, so it takes the rest of BODY (over
    240 KiB, most of it in the edge's TLS layer, where no count of unsent bytes shows it) in
    more than 6 s: past the 5 s after which the TLS layer used to drop it. (The client does not
    answer close_notify: the edge's side ends TLS_NOTIFY_WAIT later, 0.5 s here.)"""
    monkeypatch.setattr("tunneld.public.TLS_NOTIFY_WAIT", 0.5)
    async with _download(tmp_path, idle_timeout=0.5, keepalive_timeout=0.5) as (
        edge,
        client,
        download,
        conn,
    ):
        received, ended = await client.read_to_the_end(60, chunk=4096, pause=0.1)
        assert ended == "close_notify"
        data, seen = download.parse(received)
        assert (data, seen) == (BODY, ["headers 200", "end of stream", "GOAWAY NO_ERROR"])
        await wait_until(lambda: conn not in edge.public_connections, 15, "the edge's side ended")
