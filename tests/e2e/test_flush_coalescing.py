"""Writes to the tunnel are coalesced per loop iteration: the ends of many streams in one
iteration leave in a few tunnel writes, not one (or two) per stream (relay/mux.py,
docs/architecture.md "Small reads are coalesced")."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from .conftest import Stack, wait_until

pytestmark = pytest.mark.anyio

STREAMS = 20


@pytest.mark.parametrize("anyio_backend", [("asyncio", {"use_uvloop": False})], ids=["asyncio"])
async def test_the_ends_of_many_streams_share_tunnel_writes(stack: Stack) -> None:
    # asyncio only: the test counts the writes by wrapping the transport's method, which
    # uvloop's transports (C types) do not allow
    origin = await stack.origin()
    await stack.agent("sb1")
    exposed = await stack.expose("sb1", origin.port)
    host = stack.host_of(exposed["exposedAt"])
    assert stack.edge is not None
    clients = []
    for _ in range(STREAMS):
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        clients.append((reader, writer))
    for reader, _writer in clients:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        assert await asyncio.wait_for(reader.readexactly(length), 10) == b"hello from origin"
    (session,) = stack.edge.agent_connections
    transport: Any = session.transport
    writes: list[int] = []
    real = transport.writelines

    def counted(data: Any) -> None:
        writes.append(1)
        real(data)

    transport.writelines = counted
    try:
        for _reader, writer in clients:  # all in this iteration: the edge reads 20 EOFs at once
            writer.close()
        await wait_until(lambda: not stack.edge.public_connections, 10, "the connections to end")
    finally:
        transport.writelines = real
    # each stream's FIN and its close: 2 x STREAMS frames, in a handful of writes (one per loop
    # iteration that ended or closed streams), not one write each
    assert 1 <= len(writes) <= STREAMS // 4, writes
