"""What a hostile or broken edge gets from the agent (continues test_hostile_edge_2.py).

- docs/protocol.md, Ending a session: "On a protocol error the detecting side sends
  ``GO_AWAY(<code>)``, ignores all further input, and closes the connection". The sans-IO session
  is held to that in tests/protocol; here the agent's shell is: a malformed frame from the edge
  gets ``GO_AWAY(PROTOCOL_ERROR)``, a stream opened in the bytes after it is never dialled, the
  agent closes the link, and the service connection of the stream that was live is reset (a cut
  upload is never a clean end), with the reason in the session's end line.
- docs/agent.md, Security: port 3000 and the agent's own API port "can never be exposed (400
  ``INVALID_PORT``...), also when the edge pushes an expose of it": the agent answers an edge's
  ``expose`` of a port it never serves with ``error`` ``INVALID_PORT``, not ``ok``, and does not
  count it as exposed; a flood of them is answered each time and logged a burst, then one a
  second.

Real sockets on 127.0.0.1: a scripted edge (the sans-IO session) and a real service.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from protocol import control
from protocol.errors import GoAwayCode
from protocol.events import ControlReceived, GoAwayReceived, StreamAccepted
from protocol.frames import HEADER, FrameType
from relay.budget import LOG_BURST
from tests.e2e.conftest import wait_until

from .hostile_edge import hostile_edge

pytestmark = pytest.mark.anyio

FLOOD = 1000


class Recorder:
    """A service that reads each connection to its end and records how it ended."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.connections = 0
        self.ends: list[str] = []
        self.server: asyncio.Server | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while data := await reader.read(65536):
                self.received += data
            self.ends.append("eof")
        except ConnectionResetError:
            self.ends.append("reset")
        finally:
            writer.close()


async def test_a_malformed_frame_ends_the_session_with_goaway_and_resets_the_live_stream() -> None:
    service = Recorder()
    server = await asyncio.start_server(service.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with hostile_edge([port]) as (edge, agent):
            session = agent.session
            assert session is not None
            sid = edge.open(port, data=b"the first half of an upload")
            assert isinstance(await edge.outcome(sid), StreamAccepted)
            await wait_until(lambda: len(service.received) == 27, 10, "the upload's first half")

            assert edge.transport is not None
            # A PING frame of protocol version 2, then a stream the agent must never dial.
            edge.transport.write(HEADER.pack(2, FrameType.PING, 0, 0, 7))
            edge.open(port, data=b"after the error")

            async with asyncio.timeout(10):
                while True:
                    event = await edge.events.get()
                    if isinstance(event, GoAwayReceived):
                        break
            assert event.code == GoAwayCode.PROTOCOL_ERROR
            async with asyncio.timeout(10):
                await edge.lost.wait()  # the agent closed the link
                await asyncio.shield(session.closed)
            await wait_until(lambda: service.ends, 10, "the service connection to end")
            assert service.ends == ["reset"]
            assert service.connections == 1
            assert bytes(service.received) == b"the first half of an upload"
            assert session.end_reason is not None and "PROTOCOL_ERROR" in session.end_reason
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("port", [3000, 80, 1023])
async def test_an_edge_expose_of_a_port_the_agent_never_serves_is_an_invalid_port_error(
    port: int,
) -> None:
    async with hostile_edge() as (edge, agent):
        edge.tell(control.Expose(41, port))
        reply = await edge.reply(41)
        assert isinstance(reply, control.Error), reply
        assert reply.code == "INVALID_PORT" and reply.id == 41, reply
        assert f"Invalid port number: {port}." in reply.message
        assert port not in agent.exposures
        # A port it serves is still acknowledged, on the same session.
        edge.tell(control.Expose(42, 8000))
        assert await edge.reply(42) == control.Ok(42)
        assert 8000 in agent.exposures


async def test_a_flood_of_such_exposes_is_answered_each_time_and_logged_boundedly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tunnel.agent")
    async with hostile_edge() as (edge, agent):
        for request_id in range(1, FLOOD + 1):
            edge.session.send_control(control.Expose(request_id, 80))
        edge.flush()
        refused = 0
        async with asyncio.timeout(20):
            while refused < FLOOD:
                event = await edge.events.get()
                if isinstance(event, ControlReceived) and not isinstance(
                    event.message, control.Hello
                ):
                    assert isinstance(event.message, control.Error), event
                    assert event.message.code == "INVALID_PORT"
                    refused += 1
        assert agent.session is not None and not agent.session.session.closed
    lines = [r for r in caplog.records if "asked to expose port 80" in r.getMessage()]
    assert 1 <= len(lines) <= LOG_BURST + 1, len(lines)  # a burst, then at most one a second
