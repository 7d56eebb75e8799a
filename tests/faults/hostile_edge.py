"""A hostile (or just scripted) edge for agent tests: the real sans-IO ``Session`` over a socket.

It welcomes any agent with the exposures it is given, records every event in a queue, and lets a
test open streams the real edge never would (unexposed ports, the agent's own API port), send
bytes on them, reset them, or close the link.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

from agent.core import Agent, AgentConfig
from protocol import control
from protocol.events import ControlReceived, DataReceived, Event, StreamAccepted, StreamReset
from protocol.session import Role, Session


class HostileEdge(asyncio.Protocol):
    def __init__(self, exposures: Iterable[int] = ()) -> None:
        self.session = Session(Role.EDGE)
        self.exposures = tuple(control.Exposure(p, f"t{p}", f"http://{p}.test/") for p in exposures)
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.session.receive_data(data)
        for event in self.session.events_received():
            if isinstance(event, ControlReceived) and isinstance(event.message, control.Hello):
                self.session.send_control(control.Welcome("s", 10.0, {}, self.exposures))
            if isinstance(event, DataReceived) and event.data:
                self.session.acknowledge(event.stream_id, len(event.data))
            self.events.put_nowait(event)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()

    def flush(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(self.session.data_to_send())

    def open(self, port: int, via: str = "preview", data: bytes = b"") -> int:
        sid = self.session.open_stream(port, via, "203.0.113.9:4444")
        if data:
            self.session.send_data(sid, data)
        self.flush()
        return sid

    async def outcome(self, sid: int, timeout: float = 10) -> Event:
        """The first StreamAccepted or StreamReset of stream ``sid`` (other events are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self.events.get()
                if isinstance(event, (StreamAccepted, StreamReset)) and event.stream_id == sid:
                    return event

    async def read_stream(self, sid: int, timeout: float = 10, limit: int = 1 << 20) -> bytes:
        """Bytes the agent sends on ``sid`` until it ends or resets the stream."""
        out = bytearray()
        async with asyncio.timeout(timeout):
            while len(out) < limit:
                event = await self.events.get()
                if getattr(event, "stream_id", None) != sid:
                    continue
                if isinstance(event, DataReceived):
                    out += event.data
                    if event.end_stream:
                        break
                elif isinstance(event, StreamReset):
                    break
        return bytes(out)


@asynccontextmanager
async def hostile_edge(exposures: Iterable[int] = ()) -> AsyncIterator[tuple[HostileEdge, Agent]]:
    """A started ``HostileEdge`` and an ``Agent`` connected to it (not running its loop)."""
    loop = asyncio.get_running_loop()
    edge = HostileEdge(exposures)
    server = await loop.create_server(lambda: edge, "127.0.0.1", 0)
    agent = Agent(AgentConfig("127.0.0.1", server.sockets[0].getsockname()[1], "sb1", "t"))
    try:
        await agent.connect_once()
        yield edge, agent
    finally:
        await agent.stop()
        server.close()
        if edge.transport is not None:
            edge.transport.close()
        await server.wait_closed()
