"""A hostile (or just scripted) edge for agent tests: the real sans-IO ``Session`` over a socket.

It welcomes any agent with the exposures it is given, records every event in a queue, and lets a
test open streams the real edge never would (unexposed ports, the agent's own API port), send
bytes on them, reset them, or close the link.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from agent.core import Agent, AgentConfig
from protocol import control
from protocol.events import ControlReceived, DataReceived, Event, StreamAccepted, StreamReset
from protocol.session import Role, Session


def _exposure(port: int) -> control.Exposure:
    return control.Exposure(port, f"t{port}", f"http://{port}-sb1-t{port}.test/")


class HostileEdge(asyncio.Protocol):
    def __init__(self, exposures: Iterable[int] = ()) -> None:
        self.session = Session(Role.EDGE)
        self.exposures = {p: _exposure(p) for p in exposures}
        # Ports to open a preview stream to in the same write as the Welcome / an Ok reply (the
        # real edge may do that: a client was waiting), as (port, data) pairs.
        self.open_after_welcome: list[tuple[int, bytes]] = []
        self.open_after_reply: list[tuple[int, bytes]] = []
        self.opened: list[int] = []
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.Event()
        self.heartbeat_s = 10.0  # what the welcome announces

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.session.receive_data(data)
        for event in self.session.events_received():
            if isinstance(event, ControlReceived):
                self._answer(event.message)
            if isinstance(event, DataReceived) and event.data:
                self.session.acknowledge(event.stream_id, len(event.data))
            self.events.put_nowait(event)
        self.flush()

    def _answer(self, message: object) -> None:
        if isinstance(message, control.Hello):
            welcome = control.Welcome("s", self.heartbeat_s, {}, tuple(self.exposures.values()))
            self.session.send_control(welcome)
            opens, self.open_after_welcome = self.open_after_welcome, []
        elif isinstance(message, control.Expose):
            self.exposures[message.port] = _exposure(message.port)
            reply = (self.exposures[message.port],)
            self.session.send_control(control.Ok(message.id, reply))
            opens, self.open_after_reply = self.open_after_reply, []
        elif isinstance(message, control.Unexpose):
            self.exposures.pop(message.port, None)
            self.session.send_control(control.Ok(message.id))
            opens, self.open_after_reply = self.open_after_reply, []
        elif isinstance(message, control.ListExposures):
            reply = tuple(self.exposures.values())
            self.session.send_control(control.Ok(message.id, reply))
            opens, self.open_after_reply = self.open_after_reply, []
        else:
            return
        for port, data in opens:
            self.opened.append(self.open(port, "preview", data, flush=False))

    def tell(self, message: control.Message) -> None:
        """Send a control message the way the real edge tells the agent about admin changes."""
        if isinstance(message, control.Expose):
            self.exposures[message.port] = _exposure(message.port)
        elif isinstance(message, control.Unexpose):
            self.exposures.pop(message.port, None)
        self.session.send_control(message)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()

    def flush(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(self.session.data_to_send())

    def open(self, port: int, via: str = "preview", data: bytes = b"", flush: bool = True) -> int:
        sid = self.session.open_stream(port, via, "203.0.113.9:4444")
        if data:
            self.session.send_data(sid, data)
        if flush:
            self.flush()
        return sid

    async def outcome(self, sid: int, timeout: float = 10) -> Event:
        """The first StreamAccepted or StreamReset of stream ``sid`` (other events are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self.events.get()
                if isinstance(event, (StreamAccepted, StreamReset)) and event.stream_id == sid:
                    return event

    async def reply(self, request_id: int, timeout: float = 10) -> control.Message:
        """The agent's Ok or Error for control request ``request_id`` (other events are
        skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self.events.get()
                if isinstance(event, ControlReceived):
                    message = event.message
                    if isinstance(message, control.Ok | control.Error) and message.id == request_id:
                        return message

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
async def hostile_edge(
    exposures: Iterable[int] = (), edge: HostileEdge | None = None, **options: Any
) -> AsyncIterator[tuple[HostileEdge, Agent]]:
    """A started ``HostileEdge`` and an ``Agent`` connected to it (not running its loop);
    ``options`` go to AgentConfig."""
    loop = asyncio.get_running_loop()
    edge = edge or HostileEdge(exposures)
    server = await loop.create_server(lambda: edge, "127.0.0.1", 0)
    agent = Agent(
        AgentConfig("127.0.0.1", server.sockets[0].getsockname()[1], "sb1", "t", **options)
    )
    try:
        await agent.connect_once()
        yield edge, agent
    finally:
        await agent.stop()
        server.close()
        if edge.transport is not None:
            edge.transport.close()
        await server.wait_closed()
