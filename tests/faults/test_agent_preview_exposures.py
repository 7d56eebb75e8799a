"""A preview stream reaches only a port the agent knows is exposed (row 15 of the hardening issue).

The edge is authoritative for exposures, but the agent hears about every change (welcome, expose,
unexpose, list replies); a hostile or buggy edge opening preview streams to any other port of the
sandbox is refused with PORT_NOT_ALLOWED and logged. Direct streams (admin/SDK ``connect``) stay
allowed for any valid port: they are authorised by the admin token at the edge.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from protocol import control
from protocol.errors import ResetCode
from protocol.events import StreamAccepted, StreamReset

from .hostile_edge import HostileEdge, hostile_edge
from .origins import ScriptedOrigin

pytestmark = pytest.mark.anyio

REQUEST = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"


class Service(ScriptedOrigin):
    """A sandbox service that counts the connections it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.connections = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        await writer.drain()


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    async with Service() as s:
        yield s


async def test_preview_stream_to_an_unexposed_port_is_reset_and_logged(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "tunnel.agent")
    async with hostile_edge(exposures=[8001]) as (edge, _agent):
        sid = edge.open(service.port, "preview", REQUEST)
        event = await edge.outcome(sid)
    assert isinstance(event, StreamReset), "the agent dialled an unexposed port"
    assert event.code == ResetCode.PORT_NOT_ALLOWED
    assert service.connections == 0
    assert any(
        str(service.port) in r.getMessage() and "not exposed" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


async def test_direct_streams_stay_allowed_for_any_valid_port(service: Service) -> None:
    async with hostile_edge() as (edge, _agent):
        for via in ("direct",):  # the only other `via` the protocol knows
            sid = edge.open(service.port, via, REQUEST)
            assert isinstance(await edge.outcome(sid), StreamAccepted), via
            assert (await edge.read_stream(sid)).endswith(b"ok")


async def test_exposures_follow_welcome_expose_unexpose_and_list(service: Service) -> None:
    port = service.port
    edge = HostileEdge([port])
    edge.open_after_welcome.append((port, REQUEST))  # in the same write as the Welcome
    async with hostile_edge(edge=edge) as (edge, agent):
        assert isinstance(await edge.outcome(edge.opened[0]), StreamAccepted)

        edge.tell(control.Unexpose(1, port))  # admin unexpose
        sid = edge.open(port, "preview", REQUEST)
        assert isinstance(await edge.outcome(sid), StreamReset)

        edge.tell(control.Expose(2, port))  # admin expose
        sid = edge.open(port, "preview", REQUEST)
        assert isinstance(await edge.outcome(sid), StreamAccepted)

        await agent.unexpose(port)  # local API unexpose
        sid = edge.open(port, "preview", REQUEST)
        assert isinstance(await edge.outcome(sid), StreamReset)

        # Local API expose: the edge opens a stream in the same write as its Ok reply.
        edge.open_after_reply.append((port, REQUEST))
        await agent.expose(port)
        assert isinstance(await edge.outcome(edge.opened[1]), StreamAccepted)

        # A list reply is the edge's whole set: a port missing from it is no longer exposed.
        edge.exposures.clear()
        assert await agent.list_exposures() == []
        sid = edge.open(port, "preview", REQUEST)
        assert isinstance(await edge.outcome(sid), StreamReset)
    assert service.connections == 3
