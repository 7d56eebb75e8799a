"""Bound: the records one inspected connection keeps live (tunneld/inspect.py
``MAX_LIVE_PER_CONNECTION``), driven over real sockets.

A client pipelining requests on one inspected connection while the service answers none of them
would make a live record (request head, body prefix) per request; past 16 unanswered ones the
edge forwards further requests but does not record them, and counts them as skipped. The unit
test (tests/test_inspect_buffer.py) checks ConnectionRecorder alone; this one goes through the
public listener, the agent and a service that answers only once every request has arrived.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.conftest import wait_until
from tunneld.inspect import MAX_LIVE_PER_CONNECTION

from .conftest import Stack, stack  # noqa: F401  (the fixture)

pytestmark = pytest.mark.anyio

PIPELINED = 40
IO_TIMEOUT = 10.0
ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


class Withholding:
    """A service that reads ``PIPELINED`` request heads before it answers any of them."""

    def __init__(self) -> None:
        self.heads = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Withholding:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen = b""
        try:
            while self.heads < PIPELINED:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                seen += chunk
                self.heads = seen.count(b"\r\n\r\n")
            writer.write(ANSWER * PIPELINED)
            await writer.drain()
            await reader.read()  # until the edge ends the connection
        except ConnectionError:
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_a_connection_pipelining_unanswered_requests_keeps_16_live_records(
    stack: Stack,  # noqa: F811
) -> None:
    assert stack.edge is not None and stack.admin is not None
    service = await Withholding().start()
    try:
        host = await stack.preview_host(service.port, inspect=True)
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
        try:
            writer.write(
                b"".join(
                    b"GET /r%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (i, host) for i in range(PIPELINED)
                )
            )
            await wait_until(
                lambda: service.heads >= PIPELINED,
                timeout=IO_TIMEOUT,
                what="every pipelined request to reach the service",
            )
            answers = b""
            async with asyncio.timeout(IO_TIMEOUT):
                while answers.count(b"HTTP/1.1 200") < PIPELINED:
                    chunk = await reader.read(65536)
                    assert chunk, answers
                    answers += chunk
        finally:
            writer.close()
        response = await stack.admin.get("/v1/sandboxes/sb1/requests")
        assert response.status_code == 200, response.text
        body = response.json()
        recorded = sorted(r["target"] for r in body["requests"])
        assert MAX_LIVE_PER_CONNECTION == 16
        assert recorded == sorted(f"/r{i}" for i in range(MAX_LIVE_PER_CONNECTION))
        assert body["skipped"] == PIPELINED - MAX_LIVE_PER_CONNECTION
    finally:
        service.close()
