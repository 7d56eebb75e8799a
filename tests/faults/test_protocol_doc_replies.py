"""docs/protocol.md, what the edge answers an agent with where the edge's own state decides: an
`expose` or `unexpose` that the edge fails on for a reason of its own (a bug, an unexpected store
error) still gets an answer, `error {id, code: "INTERNAL_ERROR"}`, rather than nothing (the agent
would wait for its EDGE_TIMEOUT), and the session goes on; a public TCP stream the edge cuts for
idleness is reset with the TIMEOUT code. A real in-process edge on 127.0.0.1 (its exposure write
made to raise, or a short idle timeout); the agent is a hand-driven session over a real socket."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from agent.core import Agent, AgentConfig
from protocol import control
from protocol.errors import ResetCode
from protocol.events import ControlReceived, StreamOpened, StreamReset
from protocol.frames import PREFACE, Frame, FrameReader, FrameType, encode_frame, pack_header
from tests.e2e.conftest import Stack
from tests.e2e.test_doc_claims_architecture import raw_agent
from tests.e2e.test_public_tcp import expose_tcp, tcp_stack
from tunneld.auth import agent_token

PING, CONTROL, ACK = int(FrameType.PING), int(FrameType.CONTROL), 2

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the behaviour is the edge's, not the loop's


def _reply(request_id: int) -> Any:
    def match(event: object) -> bool:
        message = getattr(event, "message", None)
        return isinstance(event, ControlReceived) and getattr(message, "id", None) == request_id

    return match


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("expose_from_agent", control.Expose(1, 8000)),
        ("unexpose_from_agent", control.Unexpose(1, 8000)),
        ("exposure_messages", control.ListExposures(1)),  # served at once, not after a write
    ],
    ids=["expose", "unexpose", "list"],
)
async def test_a_request_the_edge_fails_on_gets_internal_error(
    stack: Stack, caplog: pytest.LogCaptureFixture, method: str, message: Any
) -> None:
    assert stack.edge is not None

    def broken(*args: object) -> object:  # raises when called, awaited or not
        raise RuntimeError("the store broke in an unexpected way")

    agent = await raw_agent(stack)  # welcomed first: the welcome lists the exposures too
    setattr(stack.edge, method, broken)
    try:
        agent.session.send_control(message)
        agent.flush()
        event = await agent.wait_for(_reply(1))
        assert isinstance(event, ControlReceived)
        error = event.message
        assert isinstance(error, control.Error)
        assert (error.code, error.id) == ("INTERNAL_ERROR", 1)
        assert "tunneld log" in error.message
        # the session goes on: the next request is served
        delattr(stack.edge, method)  # the edge's own method again
        agent.session.send_control(control.ListExposures(2))
        agent.flush()
        event = await agent.wait_for(_reply(2))
        assert isinstance(event, ControlReceived) and event.message == control.Ok(2)
        assert not agent.eof
    finally:
        await agent.close()
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
    assert any("failed" in r.getMessage() for r in logged), logged
    caplog.clear()  # the traceback is the point here, not a crash of the test's own making


async def test_an_idle_public_tcp_stream_is_reset_with_timeout() -> None:
    """Reset codes: 'TIMEOUT | 8 | the stream timed out': a public TCP connection silent both
    ways past the edge's idle_timeout is cut, and the agent is told with RST(TIMEOUT) on its
    stream (the client gets a TCP reset, tests/e2e/test_public_tcp.py)."""
    stack = await tcp_stack(idle_timeout=0.5)
    try:
        agent = await raw_agent(stack)
        try:
            public_port = await expose_tcp(stack, "sb1", 9000)
            _reader, writer = await asyncio.open_connection("127.0.0.1", public_port)
            try:
                opened = await agent.wait_for(lambda e: isinstance(e, StreamOpened))
                assert isinstance(opened, StreamOpened) and opened.port == 9000
                sid = opened.stream_id
                agent.session.accept_stream(sid)
                agent.flush()
                reset = await agent.wait_for(
                    lambda e: isinstance(e, StreamReset) and e.stream_id == sid
                )
                assert reset == StreamReset(sid, ResetCode.TIMEOUT, True)
            finally:
                writer.close()
        finally:
            await agent.close()
    finally:
        await stack.close()


async def test_the_edge_pings_every_heartbeat_after_the_handshake() -> None:
    """Keepalive: 'Each side sends a PING every 10 s (`HEARTBEAT_INTERVAL`) after the
    handshake' - the edge's interval (configured short here) is its welcome's `heartbeat_s`, and
    its PINGs come on the wire, each with a new value, while the agent only answers them."""
    stack = await Stack(heartbeat_interval=0.2, dead_timeout=5.0).start()
    try:
        assert stack.edge is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.agent_port)
        try:
            hello = control.Hello("sb1", agent_token(stack.secret, "sb1"))
            writer.write(PREFACE + encode_frame(CONTROL, payload=control.encode_message(hello)))
            frames = FrameReader()
            seen: list[Frame] = []
            while len([f for f in seen if f.type == PING]) < 3:
                data = await asyncio.wait_for(reader.read(65536), 10)
                assert data, f"the edge closed the link: {seen}"
                frames.feed(data)
                while (frame := frames.next_frame()) is not None:
                    seen.append(frame)
                    if frame.type == PING:  # answered, as an agent must
                        writer.write(pack_header(PING, ACK, 0, frame.length))
            welcome = control.decode_message(seen[0].payload)
            assert isinstance(welcome, control.Welcome) and welcome.heartbeat_s == 0.2
            pings = [f for f in seen if f.type == PING]
            assert all(f.flags == 0 and f.stream_id == 0 for f in pings)
            assert len({f.length for f in pings}) == len(pings)  # a new value each time
        finally:
            writer.close()
    finally:
        await stack.close()


async def test_the_agent_waits_its_connect_timeout_for_the_welcome_then_resets() -> None:
    """Keepalive: tunnel-agent, like the edge, does not wait the dead timeout for the other
    side's handshake message: with no `welcome` within its connect timeout (short here) it
    resets the connection, with no GO_AWAY, having sent its preface and `hello` only."""
    received = bytearray()
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[str] = loop.create_future()

    async def silent_edge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                received.extend(data)
            ended.set_result("eof")
        except ConnectionResetError:
            ended.set_result("reset")
        finally:
            writer.close()

    server = await asyncio.start_server(silent_edge, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        agent = Agent(AgentConfig("127.0.0.1", port, "sb1", "token", connect_timeout=0.5))
        with pytest.raises(TimeoutError):
            await agent.connect_once()
        assert await asyncio.wait_for(ended, 10) == "reset"
    finally:
        server.close()
        await server.wait_closed()
    assert bytes(received).startswith(PREFACE)
    frames = FrameReader()
    frames.feed(bytes(received[len(PREFACE) :]))
    sent = []
    while (frame := frames.next_frame()) is not None:
        sent.append(frame)
    assert [f.type for f in sent] == [CONTROL]
    assert isinstance(control.decode_message(sent[0].payload), control.Hello)
