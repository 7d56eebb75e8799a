"""Issue 7 row 5: an Upgrade request turns the connection into a raw tunnel only after a 101.

Before, ``Connection: upgrade`` + ``Upgrade:`` switched the connection to raw relay at once: if
the service answered anything but 101, every later request on that connection reached it
unparsed, with a spoofed ``Host`` and ``X-Forwarded-*`` and no 421 check. Now the edge reads the
status line of that one response: on 101 it relays raw (client bytes sent early are held, then
delivered); otherwise it relays that response and ends the connection.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.conftest import any_parser_stack  # noqa: F401 - fixture
from tests.faults.conftest import Stack
from tests.faults.origins import ScriptedOrigin

pytestmark = pytest.mark.anyio

UPGRADE = b"Connection: Upgrade\r\nUpgrade: websocket\r\n"


async def _read_all(reader: asyncio.StreamReader, timeout: float = 10) -> bytes:
    """Read until the edge closes the connection (EOF or reset), bounded in time."""
    out = bytearray()
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        left = deadline - asyncio.get_running_loop().time()
        assert left > 0, f"the connection stayed open: {bytes(out)[:200]!r}"
        try:
            chunk = await asyncio.wait_for(reader.read(65536), left)
        except ConnectionResetError:
            return bytes(out)
        except TimeoutError:
            raise AssertionError(f"the connection stayed open: {bytes(out)[:200]!r}") from None
        if not chunk:
            return bytes(out)
        out += chunk


async def test_non_101_answer_keeps_later_requests_parsed(any_parser_stack: Stack) -> None:  # noqa: F811
    stack = any_parser_stack
    origin = await stack.origin()
    await stack.agent("sb1")
    exposed = await stack.expose("sb1", origin.port)
    host = stack.host_of(exposed["exposedAt"]).encode()
    assert stack.edge is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
    try:
        # The origin answers the upgrade request with a plain 200 (it does not speak WebSocket),
        # then the client tries a second request with another Host and spoofed forwarding headers.
        writer.write(b"GET /headers HTTP/1.1\r\nHost: " + host + b"\r\n" + UPGRADE + b"\r\n")
        writer.write(
            b"GET /headers HTTP/1.1\r\nHost: 9999-other-tok.localhost\r\n"
            b"X-Forwarded-For: 6.6.6.6\r\nX-Sandbox-Name: other\r\n\r\n"
        )
        await writer.drain()
        answer = await _read_all(reader)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert b"6.6.6.6" not in answer and b"9999-other" not in answer and b'"other"' not in answer
    assert origin.requests == 1, "a request after the refused upgrade reached the service"
    seen = [(n.lower(), v) for n, v in origin.last_headers]
    assert (b"host", b"localhost:%d" % origin.port) in seen


class _UpgradeOrigin(ScriptedOrigin):
    """A raw service: reads one head, answers ``status``; after a 101 it echoes every byte."""

    def __init__(self, status: bytes) -> None:
        super().__init__()
        self.status = status
        self.received: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        self.received.append(head)
        if self.status == b"101":
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\n\r\n"
            )
        else:
            writer.write(b"HTTP/1.1 " + self.status + b" No\r\ncontent-length: 2\r\n\r\nno")
        # after a 101 echo everything; otherwise (keep-alive) record what comes next
        while data := await asyncio.wait_for(reader.read(65536), 10):
            self.received.append(data)
            if self.status == b"101":
                writer.write(data)
                await writer.drain()


async def test_101_makes_a_raw_tunnel_and_early_bytes_arrive(stack: Stack) -> None:
    async with _UpgradeOrigin(b"101") as origin:
        port, received = origin.port, origin.received
        await stack.agent("sb1")
        exposed = await stack.expose("sb1", port)
        host = stack.host_of(exposed["exposedAt"]).encode()
        assert stack.edge is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
        # bytes right behind the head, before the 101: held by the edge, then delivered raw
        writer.write(b"GET /ws HTTP/1.1\r\nHost: " + host + b"\r\n" + UPGRADE + b"\r\nearly")
        await writer.drain()
        got = await asyncio.wait_for(reader.readuntil(b"early"), 10)
        assert got.startswith(b"HTTP/1.1 101 ")
        # raw both ways now: even something that looks like a request is not parsed
        writer.write(b"GET / HTTP/1.1\r\nHost: elsewhere\r\n\r\n")
        await writer.drain()
        echoed = await asyncio.wait_for(reader.readuntil(b"elsewhere\r\n\r\n"), 10)
        assert echoed == b"GET / HTTP/1.1\r\nHost: elsewhere\r\n\r\n"
        writer.close()
        assert b"host: localhost:%d" % port in received[0]


async def test_refused_upgrade_drops_early_bytes_and_closes(stack: Stack) -> None:
    async with _UpgradeOrigin(b"400") as origin:
        port, received = origin.port, origin.received
        await stack.agent("sb1")
        exposed = await stack.expose("sb1", port)
        host = stack.host_of(exposed["exposedAt"]).encode()
        assert stack.edge is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: " + host + b"\r\n" + UPGRADE + b"\r\n"
            b"GET /admin HTTP/1.1\r\nHost: evil\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
        )
        await writer.drain()
        answer = await _read_all(reader)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 400 ") and answer.endswith(b"no"), answer
        assert len(received) == 1, f"bytes after a refused upgrade reached the service: {received}"
