"""Backpressure end to end: a slow reader is bounded by flow control and stalls only itself.

The buffers are measured at every write, not by a sampler: ``MuxProtocol.flush`` (every write to
the tunnel transport) and ``StreamEndpoint.receive_from_peer`` / ``forward`` (every write to a
local socket, every local read queued in the session) are wrapped to record the sizes right after
they ran, which is where a buffer peaks. The bounds are the mechanism's own constants.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import Callable
from typing import Any

import pytest

from agent.core import AgentSession
from protocol.frames import DEFAULT_MAX_STREAM_WINDOW, MAX_FRAME_PAYLOAD
from protocol.session import SessionConfig
from relay.buffers import READ_SIZE
from relay.mux import LOCAL_HIGH_WATER, TUNNEL_HIGH_WATER, MuxProtocol, StreamEndpoint
from tunneld.public import PublicConnection

from .conftest import Stack, wait_until
from .origin import pattern_sha256

pytestmark = pytest.mark.anyio

# What the edge may hold for one stream: what its socket to the client queued before it crossed
# the high-water mark (plus the frame that crossed it), then at most the stream's window, whose
# credit it holds while the socket stays above the mark.
EDGE_STREAM_BOUND = LOCAL_HIGH_WATER + MAX_FRAME_PAYLOAD + DEFAULT_MAX_STREAM_WINDOW
# What the agent may hold for one stream: the session queue that makes it pause reading the
# service (plus the read that crossed it), and its socket to the service's write buffer.
AGENT_STREAM_BOUND = SessionConfig().stream_send_high_water + READ_SIZE + LOCAL_HIGH_WATER
# A flush emits DATA only up to one frame past the tunnel's high-water mark; frame headers and
# control frames (window updates, pings: 12 bytes each) come on top.
TUNNEL_BOUND = TUNNEL_HIGH_WATER + MAX_FRAME_PAYLOAD + 16 * 1024


class Peaks:
    """Largest buffer sizes seen right after each write, per side."""

    def __init__(self) -> None:
        self.edge_stream = 0  # a public connection's write buffer (the slow client's bytes)
        self.agent_stream = 0  # bytes the agent queued in the session + its local write buffer
        self.edge_tunnel = 0
        self.agent_tunnel = 0
        self.unacked = 0  # largest unacknowledged credit of one stream on the edge
        self.writes = 0

    def tunnel(self, mux: MuxProtocol) -> None:
        if mux.transport is None:
            return
        self.writes += 1
        size = mux.transport.get_write_buffer_size()
        if isinstance(mux, AgentSession):
            self.agent_tunnel = max(self.agent_tunnel, size)
            for sid, endpoint in list(mux.streams.items()):
                self.agent_side(mux, sid, endpoint)
        else:
            self.edge_tunnel = max(self.edge_tunnel, size)

    def agent_side(self, mux: MuxProtocol, sid: int, endpoint: StreamEndpoint) -> None:
        held = mux.session.stream_send_buffered(sid)
        if endpoint.transport is not None:
            held += endpoint.transport.get_write_buffer_size()
        self.agent_stream = max(self.agent_stream, held)

    def endpoint(self, endpoint: StreamEndpoint) -> None:
        mux = endpoint.mux
        if isinstance(endpoint, PublicConnection):
            if endpoint.transport is not None:
                size = endpoint.transport.get_write_buffer_size()
                self.edge_stream = max(self.edge_stream, size)
            if endpoint.stream_id in mux.streams and not mux.session.closed:
                unacked = mux.session.stream_receive_unacked(endpoint.stream_id)
                self.unacked = max(self.unacked, unacked)
        elif endpoint.stream_id in mux.streams:
            self.agent_side(mux, endpoint.stream_id, endpoint)


@pytest.fixture
def peaks(monkeypatch: pytest.MonkeyPatch) -> Peaks:
    p = Peaks()

    def after(method: Callable[..., Any], record: Callable[[Any], None]) -> Callable[..., Any]:
        def wrapper(self: Any, *args: Any) -> Any:
            result = method(self, *args)
            record(self)
            return result

        return wrapper

    monkeypatch.setattr(MuxProtocol, "flush", after(MuxProtocol.flush, p.tunnel))
    for name in ("receive_from_peer", "forward"):
        monkeypatch.setattr(StreamEndpoint, name, after(getattr(StreamEndpoint, name), p.endpoint))
    return p


async def test_slow_reader_is_bounded_and_does_not_stall_others(stack: Stack, peaks: Peaks) -> None:
    origin = await stack.origin()
    agent = await stack.agent("sb1")
    exposed = await stack.expose("sb1", origin.port)
    host = stack.host_of(exposed["exposedAt"]).encode()
    # Small kernel buffers on the tunnel, both ways (set before any bulk transfer, so the advertised
    # window never grew, and fixed, so send-buffer autotuning cannot grow them): a stalled reader
    # then backs its peer up into the transport within a window's worth of data, instead of into
    # megabytes of loopback buffers. Without SO_SNDBUF a sender's buffer could autotune past
    # everything its credit allowed it to send, and its transport never backed up (a CI failure).
    edge_mux = stack.edge.registry.get("sb1").session
    agent_mux = agent.session
    for mux in (edge_mux, agent_mux):
        tunnel_sock = mux.transport.get_extra_info("socket")
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            tunnel_sock.setsockopt(socket.SOL_SOCKET, option, 64 * 1024)

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
            await asyncio.sleep(0.0625)  # the reader's pace, not synchronisation

    slow_task = asyncio.create_task(slow())
    try:
        # The slow stream has filled what it may: the edge's socket to the client is above its
        # high-water mark, so the edge holds the stream's credit.
        await wait_until(
            lambda: peaks.edge_stream >= LOCAL_HIGH_WATER, 10, "the slow stream to back up"
        )

        # Meanwhile, on the same session: a 64 MiB download and four 8 MiB uploads (several
        # streams' windows of upload data, so the edge has more to send than the tunnel takes).
        n, up = 64 << 20, 8 << 20
        h = hashlib.sha256()
        fast_read = 0
        async with stack.client(exposed["exposedAt"], timeout=60) as client:

            async def download() -> None:
                nonlocal fast_read
                async with client.stream("GET", "/bytes", params={"n": n, "seed": 4}) as r:
                    async for chunk in r.aiter_raw():
                        h.update(chunk)
                        fast_read += len(chunk)

            async def upload() -> dict[str, Any]:
                body = b"u" * (1 << 20)

                async def chunks():  # type: ignore[no-untyped-def]
                    for _ in range(up >> 20):
                        yield body

                r = await client.post("/upload", content=chunks())
                return r.json()

            async def stall_each_tunnel_reader() -> None:
                """Stop one side reading the tunnel, then the other: the writer's tunnel queue
                must fill up towards its mark while the reader is stalled (a fast loopback never
                fills it), and the peaks below show it stopped there."""
                for reader_mux, writer_mux in ((edge_mux, agent_mux), (agent_mux, edge_mux)):
                    reader_mux.transport.pause_reading()
                    try:
                        await wait_until(
                            lambda w=writer_mux: (
                                w.transport.get_write_buffer_size() >= TUNNEL_HIGH_WATER // 2
                            ),
                            20,
                            f"{type(writer_mux).__name__}'s tunnel to back up while its reader "
                            "is stalled",
                        )
                    finally:
                        reader_mux.transport.resume_reading()

            _, *uploaded, _ = await asyncio.gather(
                download(), *(upload() for _ in range(4)), stall_each_tunnel_reader()
            )
        slow_at_fast_done = slow_read
    finally:
        stop.set()
        writer.close()
        slow_task.cancel()
        try:
            await asyncio.wait_for(slow_task, 5)
        except (asyncio.CancelledError, ConnectionError):
            pass

    assert fast_read == n and h.hexdigest() == pattern_sha256(n, 4)
    digest = hashlib.sha256(b"u" * up).hexdigest()
    assert uploaded == [{"length": up, "sha256": digest}] * 4, uploaded
    # The fast transfers finished while the slow one had moved only a few MiB: no head-of-line.
    assert slow_at_fast_done < 16 << 20, slow_at_fast_done
    assert slow_read > 0
    # Measured at every write (thousands of them), so the peaks are real peaks.
    assert peaks.writes > 1000, peaks.writes
    # Memory held for the slow stream stays within its flow-control bound on both sides...
    assert peaks.edge_stream <= EDGE_STREAM_BOUND, vars(peaks)
    assert peaks.agent_stream <= AGENT_STREAM_BOUND, vars(peaks)
    assert peaks.unacked <= DEFAULT_MAX_STREAM_WINDOW, vars(peaks)
    # ...and each tunnel transport, filled while its reader was stalled, queues at most one frame
    # past its high-water mark (the upload loads the edge's tunnel, the downloads the agent's).
    assert peaks.edge_tunnel <= TUNNEL_BOUND, vars(peaks)
    assert peaks.agent_tunnel <= TUNNEL_BOUND, vars(peaks)


async def test_an_upload_sent_before_the_agent_dialled_does_not_wait_for_a_heartbeat() -> None:
    """Bytes that reach the agent while it is still connecting to the service are written once
    it connects, and their window updates must leave at once: they used to wait for the next
    heartbeat, stalling any upload over one window (256 KiB) for heartbeat_interval (10 s by
    default; 60 s here, so the old behaviour cannot pass the 30 s bound below)."""
    stack = await Stack(heartbeat_interval=60.0, dead_timeout=180.0).start()
    try:
        origin = await stack.origin()
        await stack.agent("sb1", session=SessionConfig(heartbeat_interval=60.0, dead_timeout=180.0))
        url = (await stack.expose("sb1", origin.port))["exposedAt"]
        body = bytes(range(256)) * 4096  # 1 MiB: four windows
        async with stack.client(url) as client:
            response = await asyncio.wait_for(client.post("/upload", content=body), 30)
        assert response.status_code == 200
        assert response.json() == {
            "length": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
        }
    finally:
        await stack.close()
