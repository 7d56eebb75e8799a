"""A local service that ended its side and reads nothing more cannot hold a stream for ever.

The service half-closes at once (FIN, then never reads nor closes). The edge sends the stream
more than the kernel holds for such a reader, then ends its side too: the agent begins a clean
close of its local connection, but its transport keeps the unsent rest as long as the service
reads nothing, and with it the socket and the stream's entry in the session, for the whole
session. Once a ``dead_timeout`` passes without the service taking a byte, the agent resets the
connection instead (the service did not get everything, so it sees a reset, not a clean end).

Real sockets on 127.0.0.1: a scripted edge (tests/faults/hostile_edge.py) and an agent with a
2 s dead timeout; the service's receive buffer and the agent socket's send buffer are set small
so the transport holds bytes whatever the kernel's autotuning does.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

from agent.core import Agent
from protocol.events import DataReceived
from protocol.session import SessionConfig
from tests.e2e.conftest import wait_until
from tests.faults.hostile_edge import HostileEdge, hostile_edge

pytestmark = pytest.mark.anyio

CHUNK = 64 * 1024
LIVENESS = 30.0  # generous: the agent acts after one or two 2 s dead timeouts


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the agent runs on asyncio (or uvloop), never trio


def _edge_and_agent(port: int) -> contextlib.AbstractAsyncContextManager[tuple[HostileEdge, Agent]]:
    edge = HostileEdge([port])
    edge.heartbeat_s = 0.5
    session = SessionConfig(heartbeat_interval=0.5, dead_timeout=2.0)
    return hostile_edge(edge=edge, session=session)


async def test_a_service_that_ended_and_stopped_reading_is_reset() -> None:
    loop = asyncio.get_running_loop()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # accepted sockets inherit it
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    service: socket.socket | None = None
    try:
        async with _edge_and_agent(port) as (edge, agent):
            session = agent.session
            assert session is not None
            sid = edge.open(port)
            async with asyncio.timeout(LIVENESS):
                service, _ = await loop.sock_accept(listener)
            service.shutdown(socket.SHUT_WR)  # the service's side ends; it never reads again

            # The agent passes the service's FIN on as the end of the stream.
            async with asyncio.timeout(LIVENESS):
                while True:
                    event = await edge.events.get()
                    if (
                        isinstance(event, DataReceived)
                        and event.stream_id == sid
                        and event.end_stream
                    ):
                        break
            endpoint = session.streams[sid]
            transport = endpoint.transport
            assert transport is not None
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

            # Send, as the stream's credit allows, until the agent's transport holds bytes the
            # kernel would not take; then end the edge's side right behind them.
            sent = 0
            for _ in range(2000):
                if edge.session.stream_send_buffered(sid) == 0:
                    if transport.get_write_buffer_size():
                        break
                    edge.session.send_data(sid, b"x" * CHUNK)
                    edge.flush()
                    sent += CHUNK
                await asyncio.sleep(0.01)
            else:
                pytest.fail(f"the agent's transport never held bytes ({sent} bytes sent)")
            edge.session.end_stream(sid)
            edge.flush()

            # The agent reset its connection: the stream is gone from its table...
            await wait_until(
                lambda: sid not in session.streams,
                LIVENESS,
                "the agent let go of a connection whose service reads nothing",
            )
            assert transport.is_closing()
            # ...and the service sees a reset, not a clean end of what it was sent.
            received = 0
            with pytest.raises(ConnectionResetError):
                async with asyncio.timeout(LIVENESS):
                    while received <= sent:
                        data = await loop.sock_recv(service, 1 << 20)
                        if not data:
                            break
                        received += len(data)
            assert received < sent
            # The session is still up: only that connection was cut.
            assert agent.connected
    finally:
        if service is not None:
            service.close()
        listener.close()
