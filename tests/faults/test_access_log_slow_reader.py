"""Nothing altered: with the access log on, every response reaches every client byte for byte,
while one client reads slowly and another fast on the same edge.

The C path writes a whole response's output into its last output's buffer when nothing else
refers to that any more (tunneld/_speedups.c ``output_bytes``). A client that reads slowly makes
the transport keep what it could not write yet (a reference to that output, or a copy of its
rest): the next response, another client's, must then get a buffer of its own. Here a slow client
has pipelined responses of many sizes waiting in the edge while a fast one is served request by
request; each body is unique to its request, so a byte written into the wrong buffer shows.
"""

from __future__ import annotations

import asyncio
import re
import socket

import pytest

from tests.e2e.conftest import wait_until
from tests.speedups_impl import implementation  # noqa: F401  (the fixture)

from .conftest import Stack
from .origins import ScriptedOrigin

# With the C extension's functions and with their pure-Python references (tests/speedups_impl.py).
pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("implementation")]

SLOW_REQUESTS = 40
FAST_REQUESTS = 120
SIZES = (100, 3_000, 700, 12_000, 40, 5_000, 1_500)  # below and above the last output's size


def body(tag: bytes, size: int) -> bytes:
    """``size`` bytes that name their request (``tag``) all along."""
    unit = b"<" + tag + b">"
    return (unit * (size // len(unit) + 1))[:size]


class Sized(ScriptedOrigin):
    """Answers ``GET /TAG/SIZE`` with a body of SIZE bytes made from TAG, in one write."""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await reader.readuntil(b"\r\n\r\n"):
            tag, size = re.match(rb"GET /(\w+)/(\d+) ", head).groups()  # type: ignore[union-attr]
            data = body(tag, int(size))
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(data), data)
            )
            await writer.drain()


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(head, body) of one response with a Content-Length."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
    return head, await reader.readexactly(length)


def request(host: bytes, tag: str, size: int) -> bytes:
    return b"GET /%s/%d HTTP/1.1\r\nhost: %s\r\n\r\n" % (tag.encode(), size, host)


async def test_a_slow_readers_waiting_responses_are_never_written_over(logged_stack: Stack) -> None:
    stack = logged_stack
    assert stack.edge is not None
    async with Sized() as service:
        host = await stack.preview_host(service.port)
        port = stack.edge.public_port

        slow = socket.create_connection(("127.0.0.1", port))
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.setblocking(False)
        slow_reader, slow_writer = await asyncio.open_connection(sock=slow, limit=1 << 20)
        fast_reader, fast_writer = None, None
        try:
            slow_writer.transport.pause_reading()  # nothing read until the end
            wanted = [(f"s{i}", SIZES[i % len(SIZES)] + i) for i in range(SLOW_REQUESTS)]
            slow_writer.write(request(host, *wanted[0]))
            await wait_until(lambda: stack.edge.public_connections, what="the slow connection")
            (conn,) = stack.edge.public_connections
            # the edge's side sends little at a time too: its transport keeps what waits
            conn.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
            )
            for tag, size in wanted[1:]:  # one at a time: each response whole in one read
                await asyncio.sleep(0.02)
                slow_writer.write(request(host, tag, size))
            await asyncio.sleep(0.3)  # the edge holds what it could not send
            assert conn.transport.get_write_buffer_size() > 0, "the edge's writes never waited"

            fast_reader, fast_writer = await asyncio.open_connection("127.0.0.1", port)
            for i in range(FAST_REQUESTS):
                tag, size = f"f{i}", SIZES[(i * 3) % len(SIZES)] + i
                fast_writer.write(request(host, tag, size))
                head, got = await asyncio.wait_for(read_response(fast_reader), 10)
                assert got == body(tag.encode(), size), f"fast response {i} altered"
                assert head.lower().count(b"\r\nx-request-id: ") == 1, head

            slow_writer.transport.resume_reading()
            for i, (tag, size) in enumerate(wanted):
                head, got = await asyncio.wait_for(read_response(slow_reader), 10)
                assert got == body(tag.encode(), size), f"slow response {i} altered"
                assert head.lower().count(b"\r\nx-request-id: ") == 1, head
        finally:
            slow_writer.transport.abort()
            if fast_writer is not None:
                fast_writer.transport.abort()
