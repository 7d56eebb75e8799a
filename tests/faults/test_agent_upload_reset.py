"""An upload cut short reaches the sandbox service as a reset, never as a clean end (row 2, agent).

A service that reads a body without a length reads until EOF; if a client vanishing, a stream reset
or a lost link looked like EOF, it would take a truncated upload for a complete one. Whatever
ends a stream abnormally, the agent closes the service connection with RST (SO_LINGER 0).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from protocol.errors import ResetCode
from protocol.events import StreamAccepted
from relay.mux import abort_with_reset

from .conftest import FaultStack
from .hostile_edge import hostile_edge
from .origins import ScriptedOrigin

pytestmark = pytest.mark.anyio

HEAD = b"POST /upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
CHUNK = b"4000\r\n" + b"u" * 0x4000 + b"\r\n"


class EofReader(ScriptedOrigin):
    """A service that reads each connection until EOF and reports how it ended."""

    def __init__(self) -> None:
        super().__init__()
        self.outcomes: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
        self.connected = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connected.set()
        received = 0
        try:
            async with asyncio.timeout(30):
                while chunk := await reader.read(65536):
                    received += len(chunk)
            outcome = "eof"
        except ConnectionResetError:
            outcome = "reset"
        except TimeoutError:
            outcome = "timeout"
        self.outcomes.put_nowait((outcome, received))

    async def outcome(self) -> tuple[str, int]:
        return await asyncio.wait_for(self.outcomes.get(), 15)


@pytest.fixture
async def service() -> AsyncIterator[EofReader]:
    async with EofReader() as s:
        yield s


async def test_stream_reset_while_the_agent_is_dialling(service: EofReader) -> None:
    """Open and reset in one write: the agent's connect completes after the reset."""
    async with hostile_edge([service.port]) as (edge, _agent):
        sid = edge.session.open_stream(service.port, "preview", "203.0.113.9:4444")
        edge.session.send_data(sid, HEAD + CHUNK)
        edge.session.reset_stream(sid, ResetCode.CANCEL)
        edge.flush()
        outcome, _ = await service.outcome()
    assert outcome == "reset", "the service took a cancelled upload for a complete one"


async def test_stream_reset_mid_upload(service: EofReader) -> None:
    async with hostile_edge([service.port]) as (edge, _agent):
        sid = edge.open(service.port, "preview", HEAD + CHUNK)
        assert isinstance(await edge.outcome(sid), StreamAccepted)
        await asyncio.wait_for(service.connected.wait(), 10)
        edge.session.send_data(sid, CHUNK)
        edge.session.reset_stream(sid, ResetCode.CANCEL)
        edge.flush()
        outcome, _ = await service.outcome()
    assert outcome == "reset"


async def _upload_then(stack: FaultStack, service: EofReader, cut: str) -> tuple[str, int]:
    await stack.agent("sb1")
    exposed = await stack.expose("sb1", service.port)
    assert stack.edge is not None
    _reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
    host = stack.host_of(exposed["exposedAt"]).encode()
    writer.write(HEAD.replace(b"host: x", b"host: " + host) + CHUNK)
    await writer.drain()
    await asyncio.wait_for(service.connected.wait(), 10)
    writer.write(CHUNK)
    await writer.drain()
    if cut == "client":
        abort_with_reset(writer.transport)  # type: ignore[arg-type]
    else:
        stack.proxy.drop()  # the agent link is lost mid-upload
        writer.close()
    return await service.outcome()


@pytest.mark.parametrize("cut", ["client", "link"])
async def test_upload_cut_short_through_the_edge(service: EofReader, cut: str) -> None:
    stack = await FaultStack().start()
    try:
        outcome, received = await _upload_then(stack, service, cut)
    finally:
        await stack.close()
    assert outcome == "reset", f"{cut} cut: the service saw a clean EOF after {received} bytes"
