"""The agent dials only loopback ports 1024-65535 except 3000, whatever the edge asks for."""

from __future__ import annotations

import asyncio
import socket

import pytest

from agent.core import Agent, AgentConfig
from protocol import control
from protocol.errors import ResetCode
from protocol.events import ControlReceived, StreamAccepted, StreamReset
from protocol.session import Role, Session

pytestmark = pytest.mark.anyio


class FakeEdge(asyncio.Protocol):
    """A minimal edge built on the same sans-IO session: welcomes the agent, opens streams."""

    def __init__(self) -> None:
        self.session = Session(Role.EDGE)
        self.events: asyncio.Queue[object] = asyncio.Queue()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.session.receive_data(data)
        for event in self.session.events_received():
            if isinstance(event, ControlReceived) and isinstance(event.message, control.Hello):
                self.session.send_control(control.Welcome("s", 10.0, {}, ()))
            self.events.put_nowait(event)
        self.flush()

    def flush(self) -> None:
        if self.transport is not None:
            self.transport.writelines(self.session.data_to_send())


@pytest.mark.parametrize("port", [22, 80, 1023, 3000])
async def test_agent_refuses_ports_outside_the_allowed_range(port: int) -> None:
    loop = asyncio.get_running_loop()
    edge = FakeEdge()
    server = await loop.create_server(lambda: edge, "127.0.0.1", 0)
    agent = Agent(AgentConfig("127.0.0.1", server.sockets[0].getsockname()[1], "sb1", "t"))
    try:
        await agent.connect_once()
        sid = edge.session.open_stream(port, "direct", "1.2.3.4:5")
        edge.flush()
        while True:
            event = await asyncio.wait_for(edge.events.get(), 5)
            assert not isinstance(event, StreamAccepted)
            if isinstance(event, StreamReset):
                break
        assert event.stream_id == sid and event.code == ResetCode.PORT_NOT_ALLOWED
    finally:
        await agent.stop()
        server.close()
        if edge.transport is not None:
            edge.transport.close()
        await server.wait_closed()


async def test_agent_reports_refused_connect() -> None:
    loop = asyncio.get_running_loop()
    edge = FakeEdge()
    server = await loop.create_server(lambda: edge, "127.0.0.1", 0)
    agent = Agent(AgentConfig("127.0.0.1", server.sockets[0].getsockname()[1], "sb1", "t"))
    # Bound but not listening: a connect is refused, and the port stays ours meanwhile (a closed
    # listener's port could be bound by anyone before the agent dials it).
    unused = socket.socket()
    unused.bind(("127.0.0.1", 0))
    free_port = unused.getsockname()[1]
    try:
        await agent.connect_once()
        sid = edge.session.open_stream(free_port, "direct", "1.2.3.4:5")  # preview: unexposed
        edge.flush()
        while True:
            event = await asyncio.wait_for(edge.events.get(), 15)
            if isinstance(event, StreamReset):
                break
        assert event.stream_id == sid
        assert event.code in (ResetCode.CONNECT_REFUSED, ResetCode.CONNECT_FAILED)
    finally:
        unused.close()
        await agent.stop()
        server.close()
        if edge.transport is not None:
            edge.transport.close()
        await server.wait_closed()
