"""A stop ends within its grace period whatever the clients do, and what it cuts looks cut.

``EdgeServer.stop`` drains (GO_AWAY to the agents, then up to ``grace`` for their streams and
for the responses still on their way to clients), ends every public connection, and then, at
most ``STOP_CLOSE_WAIT`` later, cuts whatever is still open: with RST while the client still
lacks bytes, so that a response cut short never ends like a complete one. Nothing a client does
may hold it longer: asyncio's ``Server.wait_closed`` waits for every connection of its server
since Python 3.12 (3.11's and uvloop's return at once), and a close the client stalls would
otherwise last until its ``StalledCloseWatch`` acts (``keepalive_timeout``, 300 s here) or
``TLS_CLOSE_DEADLINE`` (600 s). Before, with uvloop or on 3.11, the stop returned with such a
close still under way, and the process exit that follows ended it with a FIN after part of the
response (the rest, held by the process, lost).

Each test stops the edge itself with ``wait_for(stop, STOP_BOUND)``: a hang detector far above
what a stop takes (``grace`` plus about 2 s), far below the timers that would otherwise end the
close; never a measure of speed. Both event loops run every test (``anyio_backend``).
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any, Final

import pytest

from relay.mux import unsent_bytes
from tests.e2e.conftest import Stack, wait_until
from tests.faults.test_stalled_agent_close import read_until_end, silent_agent_flooded
from tests.faults.test_stalled_close import HEAD, _BigThenClose, _expect_cut, _exposed
from tests.faults.test_stalled_close import _stalled_request as _plain_stalled_request
from tests.faults.test_stalled_h2_close import BODY as H2_BODY
from tests.faults.test_stalled_h2_close import _H2Download
from tests.faults.test_stalled_tls_close import (
    _BigThenCloseOf,
    _connect,
    _exposed_tls,
    _stalled_request,
    _tls_stack,
)

pytestmark = pytest.mark.anyio

# No look of a closing connection's watch during a test: only the stop may end the close.
NO_WATCH: Final[dict[str, Any]] = {"idle_timeout": 0, "keepalive_timeout": 300}
# The hang detector of every stop here (see the module docstring).
STOP_BOUND: Final = 30.0


async def _stop(stack: Stack, grace: float) -> None:
    """Stop the stack's edge (once: its own close then skips it), within ``STOP_BOUND``."""
    edge = stack.edge
    assert edge is not None
    stack.edge = None
    if stack.admin is not None:  # its pooled connection is another test's subject
        await stack.admin.aclose()
    try:
        await asyncio.wait_for(edge.stop(grace=grace), STOP_BOUND)
    except TimeoutError:
        raise AssertionError(f"the stop (grace {grace}s) still ran {STOP_BOUND}s later") from None


async def test_a_stop_cuts_a_tls_close_the_client_stalls(tmp_path: Path) -> None:
    """An HTTPS client that reads none of the end of a response: the stop, after its grace,
    resets it (it lacks bytes), and does not wait for the close the client stalls."""
    async with _exposed_tls(tmp_path, _BigThenClose(), **NO_WATCH) as (stack, context, host):
        client = None
        try:
            edge = stack.edge
            assert edge is not None
            client, conn = await _stalled_request(stack, context, host)
            await _stop(stack, grace=0.5)
            assert conn not in edge.public_connections
            received, ended = await client.read_to_the_end(10)
            assert ended == "reset", f"a cut response ended with a {ended}"
            assert len(received) < len(HEAD) + 384 * 1024
        finally:
            if client is not None:
                client.sock.close()


async def test_a_stop_cuts_a_plain_close_the_client_stalls() -> None:
    """The same over plain HTTP/1.1: part of the response, then a reset."""
    async with _exposed(**NO_WATCH) as (stack, host, _service):
        edge = stack.edge
        assert edge is not None
        client, conn = await _plain_stalled_request(stack, host)
        with client:
            await _stop(stack, grace=0.5)
            assert conn not in edge.public_connections
            await _expect_cut(client)


async def _h2_stream_done(conn: Any) -> None:
    """Wait until ``conn``'s HTTP/2 stream is done while bytes are still owed to the client
    (the connection itself stays open: keep-alive)."""

    def owed_after_the_stream() -> bool:
        h2 = conn.h2
        return h2 is not None and not h2.streams and unsent_bytes(h2.transport) > 0

    await wait_until(owed_after_the_stream, 10, "the stream done, bytes still owed")


async def test_a_stop_cuts_an_h2_client_that_reads_nothing(tmp_path: Path) -> None:
    """HTTP/2: the stream is done, its DATA wait in the edge's TLS layer for a client that reads
    nothing, the connection is not closing (keep-alive). The stop waits its grace for the
    client, then ends the connection (GOAWAY, TLS close) and resets it: the client lacks
    bytes."""
    service = _BigThenCloseOf(H2_BODY)
    async with _exposed_tls(tmp_path, service, alpn="h2", **NO_WATCH) as (stack, context, host):
        client = None
        try:
            edge = stack.edge
            assert edge is not None
            client, conn = await _connect(stack, context, host, rcvbuf=4096, sndbuf=8192)
            assert client.tls.selected_alpn_protocol() == "h2"
            download = _H2Download(client, host)
            await download.ask()
            await asyncio.wait_for(service.closed.wait(), 10)
            await _h2_stream_done(conn)
            await _stop(stack, grace=0.5)
            assert conn not in edge.public_connections
            received, ended = await client.read_to_the_end(10)
            assert ended == "reset", f"a cut h2 connection ended with a {ended}"
            data, _ = download.parse(received)
            assert data < H2_BODY
        finally:
            if client is not None:
                client.sock.close()


async def test_a_client_taking_the_rest_slowly_gets_it_all_within_the_grace(
    tmp_path: Path,
) -> None:
    """The drain waits for the responses still on their way out, not only for the agents'
    streams: an HTTP/2 client whose stream is done while most of its DATA still waits in the
    edge's TLS layer starts reading when the stop begins, slowly (at most 4 KiB every 40 ms:
    over 2 s, longer than the stop's wait after the grace), and gets every byte, END_STREAM,
    the GOAWAY and ``close_notify``; the stop then completes."""
    service = _BigThenCloseOf(H2_BODY)
    async with _exposed_tls(tmp_path, service, alpn="h2", **NO_WATCH) as (stack, context, host):
        client = None
        try:
            edge = stack.edge
            assert edge is not None
            client, conn = await _connect(stack, context, host, rcvbuf=4096, sndbuf=8192)
            download = _H2Download(client, host)
            await download.ask()
            await asyncio.wait_for(service.closed.wait(), 10)
            await _h2_stream_done(conn)
            stack.edge = None
            if stack.admin is not None:
                await stack.admin.aclose()
            stop = asyncio.create_task(edge.stop(grace=STOP_BOUND))
            try:
                await wait_until(lambda: edge.draining, 5, "the stop began")
                received, ended = await client.read_to_the_end(STOP_BOUND, chunk=4096, pause=0.04)
                assert ended == "close_notify", f"the download ended with a {ended}"
                data, seen = download.parse(received)
                assert (data, seen) == (
                    H2_BODY,
                    ["headers 200", "end of stream", "GOAWAY NO_ERROR"],
                )
                await asyncio.wait_for(asyncio.shield(stop), STOP_BOUND)
            finally:
                if not stop.done():
                    stop.cancel()
                    await asyncio.gather(stop, return_exceptions=True)
            assert conn not in edge.public_connections
        finally:
            if client is not None:
                client.sock.close()


async def test_a_stop_ends_an_idle_admin_connection() -> None:
    """An admin API client keeping its connection open between requests (a pooled client):
    the stop closes it and does not wait for the admin API's idle timeout (60 s)."""
    stack = await Stack().start()
    try:
        edge = stack.edge
        assert edge is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.admin_port)
        try:
            writer.write(
                b"GET /v1/sandboxes HTTP/1.1\r\nHost: admin\r\n"
                b"Authorization: Bearer " + stack.admin_token.encode() + b"\r\n\r\n"
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200 ")
            await _stop(stack, grace=0.2)
            rest = await asyncio.wait_for(_drain(reader), 10)
            assert b"HTTP/1.1" not in rest  # nothing more than the rest of the one response
        finally:
            writer.transport.abort()
    finally:
        await stack.close()


async def _drain(reader: asyncio.StreamReader) -> bytes:
    """Everything until the end of the connection (EOF or reset)."""
    out = bytearray()
    try:
        while chunk := await reader.read(65536):
            out += chunk
    except ConnectionError:
        pass
    return bytes(out)


async def test_a_stop_does_not_wait_for_a_tls_handshake(tmp_path: Path) -> None:
    """A client that connects to the HTTPS listener and never sends its ClientHello (the
    handshake's bound, ``head_timeout``, is 300 s here): the stop does not wait for it."""
    stack, _context = await _tls_stack(tmp_path, head_timeout=300)
    sock = socket.socket()
    try:
        edge = stack.edge
        assert edge is not None
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", edge.public_port)), 5)
        await asyncio.sleep(0.2)  # accepted: the handshake waits for the ClientHello
        await _stop(stack, grace=0.2)
    finally:
        sock.close()
        await stack.close()


async def test_a_stop_resets_an_agent_that_reads_nothing() -> None:
    """An agent that stops reading while the edge relays uploads to it: the stop does not wait
    for its connection's close (its watch, ``dead_timeout``, 300 s here) and resets it, as
    the GO_AWAY and the rest never reached it."""
    stack = await Stack(dead_timeout=300, heartbeat_interval=100).start()
    try:
        async with silent_agent_flooded(stack) as (edge, session, sock):
            await wait_until(
                lambda: session.output_backlog > 0, 10, "bytes the agent does not take, unsent"
            )
            await _stop(stack, grace=0.5)
            assert session not in edge.agent_connections
            assert await asyncio.to_thread(read_until_end, sock) == "reset"
    finally:
        await stack.close()
