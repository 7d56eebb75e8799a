"""Bound: what a hostile edge can make the agent buffer for sandbox services that stop reading.

docs/protocol.md, Flow control: stream credit "is returned only after the application consumed
the bytes (handed them to the destination socket and that socket is below its high-water mark),
so a slow reader stalls only its own stream, and each stalled stream holds at most its own
window"; session credit comes back on delivery, so stalled streams "can never strand it".
tests/e2e/test_backpressure.py checks this for the edge's side (a slow public client); this is the
agent's side: an edge that pushes upload bytes as fast as its credit allows, to services that
accept a connection and never read. For every stream, the agent's write buffer toward the
service stays within ``LOCAL_HIGH_WATER`` + one frame + the stream's window, the edge runs out of
credit, and more stalled streams than the session window covers (72 x 256 KiB > 16 MiB) leave a
new stream of the same session working.

Real sockets on 127.0.0.1; the kernel's share is kept small and fixed (SO_RCVBUF on the service,
SO_SNDBUF on the agent's sockets to it) so the agent's own buffer is what fills. Every wait is
bounded; the feed loop fails as soon as a buffer passes its bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest

from agent.core import LocalEndpoint
from protocol.events import DataReceived, PingAcknowledged, StreamAccepted
from protocol.frames import INITIAL_SESSION_WINDOW, INITIAL_STREAM_WINDOW, MAX_FRAME_PAYLOAD
from relay.mux import LOCAL_HIGH_WATER
from tests.e2e.conftest import wait_until

from .hostile_edge import HostileEdge, hostile_edge

pytestmark = pytest.mark.anyio

# More stalled streams than the session window covers at one stream window each.
STALLED = INITIAL_SESSION_WINDOW // INITIAL_STREAM_WINDOW + 8
CHUNK = b"u" * MAX_FRAME_PAYLOAD
PER_STREAM = 8 << 20  # what the edge would push per stream if the agent kept granting credit
EDGE_QUEUE = 4 * MAX_FRAME_PAYLOAD  # what the edge keeps queued per stream, waiting for credit
KERNEL_BUFFER = 4096  # SO_RCVBUF / SO_SNDBUF: the kernel's share stays small and fixed


class Silent:
    """A service that accepts connections and never reads from them (not even into a buffer)."""

    def __init__(self) -> None:
        self.connections: list[socket.socket] = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, KERNEL_BUFFER)  # inherited
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.sock)
            self.connections.append(conn)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for conn in self.connections:
            conn.close()
        self.sock.close()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.read())  # until EOF (bounded by the stream's one small write)
    await writer.drain()
    writer.close()


@pytest.fixture
async def silent() -> AsyncIterator[Silent]:
    service = Silent()
    service.start()
    try:
        yield service
    finally:
        await service.close()


async def _ping_round_trip(edge: HostileEdge, timeout: float = 10) -> None:
    """After this, every frame the agent sent before its PING ACK has been read by the edge."""
    edge.session.ping(asyncio.get_running_loop().time())
    edge.flush()
    async with asyncio.timeout(timeout):
        while not isinstance(await edge.events.get(), PingAcknowledged):
            pass


async def test_services_that_stop_reading_hold_at_most_their_window_and_strand_nothing(
    silent: Silent, monkeypatch: pytest.MonkeyPatch
) -> None:
    peaks: dict[int, int] = {}
    connection_made = LocalEndpoint.connection_made
    receive_from_peer = LocalEndpoint.receive_from_peer

    def small_kernel_buffer(self: LocalEndpoint, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, KERNEL_BUFFER)
        connection_made(self, transport)

    def measured(self: LocalEndpoint, data: bytes) -> None:
        receive_from_peer(self, data)  # a buffer peaks right after a write
        if self.transport is not None:
            size = self.transport.get_write_buffer_size()
            peaks[self.stream_id] = max(peaks.get(self.stream_id, 0), size)

    monkeypatch.setattr(LocalEndpoint, "connection_made", small_kernel_buffer)
    monkeypatch.setattr(LocalEndpoint, "receive_from_peer", measured)

    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    try:
        async with hostile_edge([silent.port, echo_port]) as (edge, agent):
            assert agent.session is not None
            sids = [edge.open(silent.port) for _ in range(STALLED)]
            for sid in sids:  # every service connection is up before the edge pushes
                assert isinstance(await edge.outcome(sid), StreamAccepted)
            await wait_until(lambda: len(silent.connections) == STALLED, 10, "the accepts")
            pushed = dict.fromkeys(sids, 0)
            queued = dict.fromkeys(sids, 0)
            streams = edge.session._streams  # the edge's view of its credit per stream
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while True:
                assert loop.time() < deadline, f"no steady state within 30 s: {pushed}"
                for sid in sids:
                    buffered = edge.session.stream_send_buffered(sid)
                    pushed[sid] = queued[sid] - buffered
                    while queued[sid] < PER_STREAM and buffered < EDGE_QUEUE:
                        edge.session.send_data(sid, CHUNK)
                        queued[sid] += len(CHUNK)
                        buffered += len(CHUNK)
                edge.flush()
                agent_streams = agent.session.session._streams
                for sid, peak in peaks.items():
                    window = agent_streams[sid].recv_size if sid in agent_streams else 0
                    bound = LOCAL_HIGH_WATER + MAX_FRAME_PAYLOAD + window
                    assert peak <= bound, (sid, peak, bound)
                assert all(n < PER_STREAM for n in pushed.values()), "a stream was never stalled"
                if all(streams[sid].send_window == 0 for sid in sids):
                    # Out of credit everywhere: confirm no update was still on its way.
                    await _ping_round_trip(edge)
                    if all(streams[sid].send_window == 0 for sid in sids):
                        break
                await asyncio.sleep(0.01)

            # Each stalled stream holds its credit in the agent; none was lost or dropped.
            assert sorted(peaks) == sids
            endpoints = [agent.session.streams[sid] for sid in sids]
            assert all(isinstance(e, LocalEndpoint) and e.transport is not None for e in endpoints)
            assert sum(pushed.values()) > INITIAL_SESSION_WINDOW  # more than one session window

            # The session's credit came back on delivery: a new stream still flows both ways.
            sid = edge.open(echo_port, data=b"still flowing")
            edge.session.end_stream(sid)
            edge.flush()
            got = bytearray()
            async with asyncio.timeout(10):
                while True:
                    event = await edge.events.get()
                    if getattr(event, "stream_id", None) != sid:
                        continue
                    if isinstance(event, DataReceived):
                        got += event.data
                        if event.end_stream:
                            break
                    else:
                        assert isinstance(event, StreamAccepted), event
            assert bytes(got) == b"still flowing"
            assert not agent.session.session.closed
    finally:
        echo.close()
        await echo.wait_closed()
