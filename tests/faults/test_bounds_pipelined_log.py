"""Bound: requests pipelined on one public connection and not answered yet, as the access log
tracks them (tunneld/accesslog.py ``ConnectionLog.request``: at most 1024).

With ``access_log`` on, every request head the edge forwards waits in its connection's log until
its response is framed. A client can pipeline small requests without end while the service does
not answer (tens of thousands fit in one stream window): the edge stops recording past 1024 on a
connection instead of growing, and still relays what it reads within the stream's window.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.conftest import wait_until
from tests.speedups_impl import implementation  # noqa: F401  (the fixture)
from tunneld.public import PublicConnection

from .conftest import Stack
from .origins import ScriptedOrigin

# With the C extension's functions and with their pure-Python references (tests/speedups_impl.py).
pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("implementation")]

PIPELINED = 3000
CAP = 1024


class Silent(ScriptedOrigin):
    """A service that reads everything and never answers; keeps what it got."""

    def __init__(self) -> None:
        super().__init__()
        self.received = bytearray()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            self.received += data

    def requests(self) -> int:
        return self.received.count(b"GET /x HTTP/1.1\r\n")


async def test_unanswered_pipelined_requests_are_tracked_up_to_1024(logged_stack: Stack) -> None:
    stack = logged_stack
    assert stack.edge is not None
    async with Silent() as service:
        host = await stack.preview_host(service.port)
        one = b"GET /x HTTP/1.1\r\nhost: " + host + b"\r\n\r\n"
        _reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
        try:
            writer.write(one * PIPELINED)
            await asyncio.wait_for(writer.drain(), 10)
            # Every request reached the service: the edge parsed and forwarded all of them.
            await wait_until(
                lambda: service.requests() == PIPELINED,
                timeout=10,
                what="the pipelined requests to reach the service",
            )
            (conn,) = [c for c in stack.edge.public_connections if isinstance(c, PublicConnection)]
            log = conn._access
            assert log is not None
            tracked = len(log._requests)
            assert tracked == CAP, tracked
        finally:
            writer.transport.abort()
