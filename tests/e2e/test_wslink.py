"""The agent link over WebSocket (for egress that allows only HTTP(S)) on the same agent port."""

from __future__ import annotations

import asyncio

import pytest

from protocol.frames import FrameReader, FrameType

from .conftest import Stack, raw_request, wait_until

pytestmark = pytest.mark.anyio


async def test_agent_over_websocket_serves_preview_traffic(stack: Stack) -> None:
    origin = await stack.origin()
    await stack.agent("sb1", websocket=True)
    edge_session = stack.edge.registry.get("sb1").session
    assert edge_session.link is not None and edge_session.link.open
    exposed = await stack.expose("sb1", origin.port)
    async with stack.client(exposed["exposedAt"]) as client:
        r = await client.get("/bytes", params={"n": 5_000_000, "seed": 2})
        assert r.status_code == 200 and len(r.content) == 5_000_000
        r = await client.post("/upload", content=b"y" * 3_000_000)
        assert r.json()["length"] == 3_000_000
    # a raw agent still works on the same listener
    raw = await stack.agent("sb2")
    assert raw.connected and stack.edge.registry.get("sb2").session.link is None


async def test_websocket_upgrade_for_another_path_is_refused(stack: Stack) -> None:
    answer = await raw_request(
        stack.edge.agent_port,
        b"GET /other HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 404")


async def test_garbage_on_the_agent_port_is_closed(stack: Stack) -> None:
    """Junk on the agent port gets a short HTTP error, one GO_AWAY frame or nothing; then the
    edge closes the connection itself (EOF or RST, well within the deadline) and keeps nothing."""
    for junk in (b"GET / HTTP/1.1\r\n\r\n", b"hello there\r\n", b"\x00" * 64):
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.agent_port)
        try:
            writer.write(junk)
            await writer.drain()
            answer = b""
            try:
                # read() returns at EOF only: a connection left open fails on the deadline
                answer = await asyncio.wait_for(reader.read(), 15)
            except ConnectionResetError:
                pass  # a reset is a close too
        finally:
            writer.close()
        assert b"Traceback" not in answer, answer
        assert answer == b"" or answer.startswith(b"HTTP/1.1 4") or _is_go_away(answer), answer
    await wait_until(lambda: not stack.edge.agent_connections, 5, "the edge to drop them all")
    assert stack.edge.registry.sandboxes() == []


def _is_go_away(data: bytes) -> bool:
    """The raw link's answer to junk: one GO_AWAY frame (with its error code), nothing else."""
    reader = FrameReader()
    reader.feed(data)
    frame = reader.next_frame()
    return frame is not None and frame.type == FrameType.GO_AWAY and reader.buffered == 0
