"""Bounds of port watches against local processes: an endless status line, a half-closed client.

docs/agent.md, Waiting for a port: "an ``http`` probe sends ``GET path`` ... and reads only the
status line", and a watch that is not ready ends with the last check's reason (``connection
refused``, ``timed out``, ``not an HTTP response``). Any process in the sandbox may listen on the
watched port; one that answers a status line without an end (no newline, megabytes of it) gets
``not an HTTP response`` from the first probe, read to a small bound, instead of being buffered
until the probe's timeout. And "a client that closes (or half-closes) its connection stops its
watch at once".

Real sockets on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import orjson
import pytest

from agent.local_api import LocalAPI
from agent.portwatch import WatchSpec, watch_port
from tests.e2e.conftest import anyio_backend, wait_until

pytestmark = pytest.mark.anyio
__all__ = ["anyio_backend"]  # asyncio and uvloop

CHUNK = b"x" * 65536
MOST = 1024  # chunks: at most 64 MiB of status line per connection


async def test_a_status_line_without_an_end_is_not_an_http_response() -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 ")
            for _ in range(MOST):
                writer.write(CHUNK)
                await writer.drain()
            await reader.read()  # then hold the connection until the probe closes it
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the probe hung up: what the test wants
        finally:
            writer.close()

    server = await asyncio.start_server(endless, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    observations = []
    try:
        spec = WatchSpec(port, "http", "/", interval=0.1, timeout=2.0)
        async with asyncio.timeout(20):
            result = await watch_port(spec, ("127.0.0.1",), observations.append)
    finally:
        server.close()
        await server.wait_closed()
    assert not result.ready
    first = observations[0]  # the first probe already knows
    assert first.error is not None and first.error.startswith("not an HTTP response"), first
    assert result.message(spec).startswith(
        f"Port {port} was not ready within 2 s (last check: not an HTTP response"
    )


class Controller:
    connected = True
    sandbox_id = "sb1"

    async def expose(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("not used")

    async def unexpose(self, port: int) -> None:
        raise AssertionError("not used")

    async def list_exposures(self) -> list[Any]:
        return []


async def test_a_client_that_half_closes_stops_its_watch() -> None:
    """docs/agent.md: "a client that closes (or half-closes) its connection stops its watch at
    once" (the full close is tests/agent/test_port_watch.py's)."""
    with socket.socket() as reserved:  # bound, never listening: the watch would run 5 min
        reserved.bind(("127.0.0.1", 0))
        port = reserved.getsockname()[1]
        async with LocalAPI(Controller(), port=0) as api:
            reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
            try:
                body = orjson.dumps({"port": port, "mode": "tcp"})
                writer.write(
                    b"POST /api/port-watch HTTP/1.1\r\nhost: localhost\r\ncontent-type: "
                    b"application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
                )
                async with asyncio.timeout(10):
                    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
                    assert b'"watching"' in await reader.readuntil(b"\n\n")
                assert api.watches.active == 1
                writer.write_eof()  # the request is complete; the client sends nothing more
                await wait_until(lambda: api.watches.active == 0, 10, "the watch to stop")
                async with asyncio.timeout(10):
                    rest = await reader.read()  # the answer ends without a result event
                assert b'"ready"' not in rest and b'"error"' not in rest, rest
            finally:
                writer.close()
