"""Backpressure end to end: a slow reader is bounded by flow control and stalls only itself."""

from __future__ import annotations

import asyncio
import hashlib
import socket

import pytest

from protocol.frames import DEFAULT_MAX_STREAM_WINDOW
from relay.buffers import READ_SIZE
from relay.mux import LOCAL_HIGH_WATER, TUNNEL_HIGH_WATER

from .conftest import Stack
from .origin import pattern_sha256

pytestmark = pytest.mark.anyio

# What one stream may hold in one process: its receive window, what its local transport may
# queue before credit stops, and the read in flight on each side.
STREAM_BOUND = DEFAULT_MAX_STREAM_WINDOW + LOCAL_HIGH_WATER + 2 * READ_SIZE


def _edge_buffered(stack: Stack) -> tuple[int, int]:
    """(bytes held for the slowest public connection, bytes queued on the tunnel transports)."""
    worst = 0
    for conn in stack.edge.public_connections:
        if conn.mux is None or conn.transport is None:
            continue
        # Bytes the edge holds for this stream sit in its transport's write buffer; the
        # unacknowledged credit counts those same bytes, so it must not exceed the window.
        held = conn.transport.get_write_buffer_size()
        assert conn.mux.session.stream_receive_unacked(conn.stream_id) <= DEFAULT_MAX_STREAM_WINDOW
        worst = max(worst, held)
    tunnel = sum(
        s.transport.get_write_buffer_size() for s in stack.edge.agent_connections if s.transport
    )
    return worst, tunnel


def _agent_buffered(stack: Stack) -> tuple[int, int]:
    worst = 0
    tunnel = 0
    for agent, _ in stack.agents:
        mux = agent.session
        if mux is None:
            continue
        for sid, endpoint in mux.streams.items():
            held = mux.session.stream_send_buffered(sid)
            if endpoint.transport is not None:
                held += endpoint.transport.get_write_buffer_size()
            worst = max(worst, held)
        if mux.transport is not None:
            tunnel += mux.transport.get_write_buffer_size()
    return worst, tunnel


async def test_slow_reader_is_bounded_and_does_not_stall_others(stack: Stack) -> None:
    origin = await stack.origin()
    await stack.agent("sb1")
    exposed = await stack.expose("sb1", origin.port)
    host = stack.host_of(exposed["exposedAt"]).encode()

    # The slow client: a small receive buffer, reading 64 KiB every 62.5 ms (1 MiB/s).
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", stack.edge.public_port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=64 * 1024)
    writer.write(b"GET /bytes?n=268435456&seed=3 HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    slow_read = 0
    stop = asyncio.Event()

    async def slow() -> None:
        nonlocal slow_read
        while not stop.is_set():
            data = await reader.read(64 * 1024)
            if not data:
                return
            slow_read += len(data)
            await asyncio.sleep(0.0625)

    peak = {"edge": 0, "agent": 0, "edge_tunnel": 0, "agent_tunnel": 0}

    async def sample() -> None:
        while not stop.is_set():
            edge, edge_tunnel = _edge_buffered(stack)
            agent, agent_tunnel = _agent_buffered(stack)
            peak["edge"] = max(peak["edge"], edge)
            peak["agent"] = max(peak["agent"], agent)
            peak["edge_tunnel"] = max(peak["edge_tunnel"], edge_tunnel)
            peak["agent_tunnel"] = max(peak["agent_tunnel"], agent_tunnel)
            await asyncio.sleep(0.01)

    slow_task = asyncio.create_task(slow())
    sampler = asyncio.create_task(sample())
    await asyncio.sleep(1.0)  # let the slow stream fill every buffer it can

    # A second client on the same sandbox (same session) downloads 64 MiB meanwhile.
    n = 64 << 20
    h = hashlib.sha256()
    fast_read = 0
    async with stack.client(exposed["exposedAt"], timeout=60) as client:
        async with client.stream("GET", "/bytes", params={"n": n, "seed": 4}) as r:
            async for chunk in r.aiter_raw():
                h.update(chunk)
                fast_read += len(chunk)
    slow_at_fast_done = slow_read
    await asyncio.sleep(0.5)
    stop.set()
    writer.close()
    await asyncio.gather(slow_task, sampler, return_exceptions=True)

    assert fast_read == n and h.hexdigest() == pattern_sha256(n, 4)
    # The fast download finished while the slow one had moved only a few MiB: no head-of-line.
    assert slow_at_fast_done < 16 << 20, slow_at_fast_done
    assert slow_read > 0
    # Memory held for the slow stream stays within its flow-control bound on both sides,
    # and the shared tunnel transports never queue more than their high-water mark plus a flush.
    assert peak["edge"] <= STREAM_BOUND, peak
    assert peak["agent"] <= STREAM_BOUND, peak
    assert peak["edge_tunnel"] <= TUNNEL_HIGH_WATER + DEFAULT_MAX_STREAM_WINDOW, peak
    assert peak["agent_tunnel"] <= TUNNEL_HIGH_WATER + DEFAULT_MAX_STREAM_WINDOW, peak
