"""Bound: a local process on a watched port cannot hold a probe with an endless status line.

docs/agent.md, Waiting for a port: "an ``http`` probe sends ``GET path`` ... and reads only the
status line", and a watch that is not ready ends with the last check's reason (``connection
refused``, ``timed out``, ``not an HTTP response``). Any process in the sandbox may listen on the
watched port; one that answers a status line without an end (no newline, megabytes of it) gets
``not an HTTP response`` from the first probe, read to a small bound, instead of being buffered
until the probe's timeout.

Real sockets on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agent.portwatch import WatchSpec, watch_port

pytestmark = pytest.mark.anyio

CHUNK = b"x" * 65536
MOST = 1024  # chunks: at most 64 MiB of status line per connection


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


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
