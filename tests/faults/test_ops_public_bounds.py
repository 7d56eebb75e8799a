"""docs/operations.md, Limits: two per-connection bounds of the public side no test drove.

- "public head timeout | `head_timeout` ... (408 before the first request; **a slow later head
  ends the connection**)": a keep-alive client that starts its next head and never finishes it
  (slowloris after one good request) does not keep its connection, nor its place in the
  connection limits, until `keepalive_timeout` or `idle_timeout`;
- "chunk-size line | 4096 bytes": a chunk-size line (size and extensions) or a trailer line the
  client never ends is refused with 400 once it passes 4096 bytes, whole or dripped, so the
  edge keeps at most that much of one; a long line within the bound still goes through.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import orjson
import pytest

from tests.e2e.conftest import Stack, wait_until
from tunneld.httphead import MAX_CHUNK_LINE

pytestmark = pytest.mark.anyio


async def _ended(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything until the edge ends the connection (FIN or reset), within ``timeout``."""
    data = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), timeout):
            data += chunk
    except ConnectionResetError:
        pass
    return data


async def test_a_slow_later_head_ends_the_keep_alive_connection() -> None:
    stack = await Stack(head_timeout=0.5).start()  # keepalive_timeout 75 s, idle_timeout 1 h
    writer: asyncio.StreamWriter | None = None
    try:
        edge = stack.edge
        assert edge is not None
        origin = await stack.origin()
        host = await stack.preview_host(origin.port)
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.public_port)
        writer.write(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        first = await asyncio.wait_for(reader.readuntil(b"hello from origin"), 10)
        assert first.startswith(b"HTTP/1.1 200 ")
        writer.write(b"GET / HTTP/1.1\r\nHost: " + host[:5])  # and nothing more
        rest = await _ended(reader, 10)  # 20 x head_timeout: far below keepalive_timeout
        assert not rest.startswith(b"HTTP/"), rest[:200]  # no second answer: just the end
        await wait_until(lambda: not edge.public_connections, 5, "the connection to be gone")
        assert origin.connections == 1
    finally:
        if writer is not None:
            writer.close()
        await stack.close()


@contextlib.asynccontextmanager
async def _connection(
    stack: Stack,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    assert stack.edge is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
    try:
        yield reader, writer
    finally:
        writer.close()


def _chunked_head(host: bytes) -> bytes:
    return b"POST /upload HTTP/1.1\r\nHost: " + host + b"\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("dripped", [False, True], ids=["whole", "dripped"])
@pytest.mark.parametrize("where", ["size-line", "trailer"])
async def test_a_chunk_line_past_4096_bytes_is_400(where: str, dripped: bool) -> None:
    stack = await Stack().start()
    try:
        assert stack.edge is not None
        origin = await stack.origin()
        host = await stack.preview_host(origin.port)
        # within the bound: a 4000-byte extension, a 4000-byte trailer, relayed
        within = b"a" * 4000
        body = b"5;ext=" + within + b"\r\nhello\r\n0\r\nx-t: " + within + b"\r\n\r\n"
        async with _connection(stack) as (reader, writer):
            writer.write(_chunked_head(host) + body)
            answer = await asyncio.wait_for(reader.readuntil(b"}"), 10)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
        assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["length"] == 5
        # past it, never ended: refused
        prefix = b"5;ext=" if where == "size-line" else b"5\r\nhello\r\n0\r\nx-t: "
        line = prefix + b"a" * (MAX_CHUNK_LINE + 16)  # no CRLF, ever
        async with _connection(stack) as (reader, writer):
            # read while writing: the 400 is taken as it comes, whatever a later piece meets
            ended = asyncio.ensure_future(_ended(reader, 10))
            writer.write(_chunked_head(host))
            pieces = [line[i : i + 1000] for i in range(0, len(line), 1000)] if dripped else [line]
            try:
                for piece in pieces:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.01 if dripped else 0)
            except ConnectionError:
                pass  # refused before the last piece
            answer = await ended
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
        assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["code"] == "BAD_REQUEST"
    finally:
        await stack.close()
