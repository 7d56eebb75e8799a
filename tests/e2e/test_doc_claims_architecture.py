"""Claims of docs/architecture.md (and protocol.md's edge behaviour) that no test checked, against
a real EdgeServer on 127.0.0.1 with a hand-driven agent: a ``protocol.Session`` over a real
socket, so a test can do what tunnel-agent never does (open a stream, flood requests) and see
exactly which frames and codes the edge answers with.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from protocol import control
from protocol.errors import GoAwayCode, ResetCode
from protocol.events import (
    ConnectionTerminated,
    ControlReceived,
    DataReceived,
    Event,
    GoAwayReceived,
    PingAcknowledged,
    StreamOpened,
    StreamReset,
)
from protocol.frames import PREFACE
from protocol.session import Role, Session
from tunneld.auth import agent_token

from .conftest import Stack

pytestmark = pytest.mark.anyio


class RawAgent:
    """An agent link driven by hand. Edge pushes (expose/unexpose) are acked as tunnel-agent
    would, so that the admin API answers; every event is kept in ``events``."""

    def __init__(self) -> None:
        self.session = Session(Role.AGENT)
        self.events: list[Event] = []
        self.eof = False
        self.mute = False  # True: read and record, but send nothing (not even PING|ACKs)
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(
        self, port: int, sandbox_id: str, token: str, *, welcome: bool = True
    ) -> RawAgent:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        self.session.send_control(control.Hello(sandbox_id, token, control.UNWATCH_PORT_VERSION))
        self.flush()
        self._task = asyncio.get_running_loop().create_task(self._pump())
        if welcome:
            await self.wait_for(
                lambda e: isinstance(e, ControlReceived) and isinstance(e.message, control.Welcome)
            )
        return self

    def flush(self) -> None:
        data = b"".join(bytes(b) for b in self.session.data_to_send())
        if data and not self.mute and not self.writer.is_closing():
            self.writer.write(data)

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await self.reader.read(65536)
            except ConnectionError:
                data = b""
            if not data:
                self.eof = True
                self._changed.set()
                return
            self.session.receive_data(data, loop.time())
            for event in self.session.events_received():
                self.events.append(event)
                message = getattr(event, "message", None)
                if isinstance(message, control.Expose | control.Unexpose):
                    self.session.send_control(control.Ok(message.id))
            self.flush()
            self._changed.set()

    async def wait_for(self, predicate: Callable[[Event], bool], timeout: float = 10) -> Event:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if predicate(event):
                    return event
            seen = len(self.events)
            if self.eof:
                raise AssertionError(f"the edge closed the link; events: {self.events[-5:]}")
            self._changed.clear()
            remaining = deadline - loop.time()
            assert remaining > 0, f"timed out; last events: {self.events[-5:]}"
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    async def wait_closed(self, timeout: float = 10) -> None:
        assert self._task is not None
        await asyncio.wait_for(asyncio.shield(self._task), timeout)
        assert self.eof

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def messages(self, kind: type) -> list[Any]:
        return [
            e.message
            for e in self.events
            if isinstance(e, ControlReceived) and isinstance(e.message, kind)
        ]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.writer.close()


async def raw_agent(
    stack: Stack, sandbox_id: str = "sb1", *, token: str | None = None, welcome: bool = True
) -> RawAgent:
    assert stack.edge is not None
    if token is None:
        token = agent_token(stack.secret, sandbox_id)
    return await RawAgent().start(stack.edge.agent_port, sandbox_id, token, welcome=welcome)


@pytest.fixture
async def limited_stack() -> AsyncIterator[Stack]:
    s = await Stack(control_rate=0.001, control_burst=1).start()
    try:
        yield s
    finally:
        await s.close()


# --------------------------------------------------------------------------- a hostile agent


async def test_an_agent_that_opens_a_stream_loses_its_session(stack: Stack) -> None:
    """architecture.md, every reply path is capped: the edge takes no streams from agents, a
    SYN is a protocol error (GO_AWAY, connection closed), not an RST for each."""
    agent = await raw_agent(stack)
    try:
        agent.session.open_stream(8000, "direct")
        agent.flush()
        await agent.wait_closed()
        assert GoAwayReceived(GoAwayCode.PROTOCOL_ERROR) in agent.events
        assert not agent.of(StreamReset)  # no RST(REFUSED_STREAM): the whole session ended
    finally:
        await agent.close()


async def test_a_message_the_edge_does_not_serve_is_answered_unexpected_message(
    stack: Stack,
) -> None:
    """protocol.md, error codes: a message the edge does not serve gets UNEXPECTED_MESSAGE,
    and the session goes on."""
    agent = await raw_agent(stack)
    try:
        agent.session.send_control(control.WatchPort(id=7, port=8000))
        agent.flush()
        await agent.wait_for(
            lambda e: isinstance(e, ControlReceived) and isinstance(e.message, control.Error)
        )
        (error,) = agent.messages(control.Error)
        assert error.code == "UNEXPECTED_MESSAGE"
        agent.session.send_control(control.ListExposures(8))
        agent.flush()
        await agent.wait_for(
            lambda e: isinstance(e, ControlReceived) and isinstance(e.message, control.Ok)
        )
        assert agent.messages(control.Ok) == [control.Ok(8)]
        assert not agent.eof
    finally:
        await agent.close()


async def test_1000_refused_control_requests_end_the_session(limited_stack: Stack) -> None:
    """architecture.md, every reply path is capped: control requests past the rate limit are
    refused with RATE_LIMITED, and 1000 refusals close the session
    (GO_AWAY(TOO_MANY_REQUESTS))."""
    agent = await raw_agent(limited_stack)
    try:
        for request_id in range(1, 1002):  # the burst of 1, then 1000 refused
            agent.session.send_control(control.ListExposures(request_id))
        agent.flush()
        await agent.wait_for(lambda e: isinstance(e, GoAwayReceived))
        assert agent.of(GoAwayReceived) == [GoAwayReceived(GoAwayCode.TOO_MANY_REQUESTS)]
        assert [m.id for m in agent.messages(control.Ok)] == [1]
        refusals = agent.messages(control.Error)
        assert {m.code for m in refusals} == {"RATE_LIMITED"}
        assert len(refusals) == 999  # the 1000th refusal is the GO_AWAY itself
        await agent.wait_closed()
    finally:
        await agent.close()


# --------------------------------------------------------------------------- ends of a stream


async def _open_preview_stream(
    stack: Stack, agent: RawAgent, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """A client request on ``port``'s preview URL, arrived at the agent as a stream."""
    assert stack.edge is not None
    exposed = await stack.expose("sb1", port)
    host = stack.host_of(exposed["exposedAt"])
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
    writer.write(f"GET /slow HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    opened = await agent.wait_for(lambda e: isinstance(e, StreamOpened))
    assert isinstance(opened, StreamOpened) and (opened.port, opened.via) == (port, "preview")
    sid = opened.stream_id
    await agent.wait_for(lambda e: isinstance(e, DataReceived) and e.stream_id == sid)
    return reader, writer, sid


async def _unexposed_reset(agent: RawAgent, sid: int) -> StreamReset:
    event = await agent.wait_for(lambda e: isinstance(e, StreamReset) and e.stream_id == sid)
    assert isinstance(event, StreamReset)
    return event


async def test_unexpose_resets_a_live_stream_with_unexposed_and_cuts_the_client(
    stack: Stack,
) -> None:
    """architecture.md, the path of one request, step 8: unexpose resets the port's streams
    (UNEXPOSED) and aborts the client connections; after a response byte, with an RST."""
    agent = await raw_agent(stack)
    try:
        reader, writer, sid = await _open_preview_stream(stack, agent, 8000)
        agent.session.accept_stream(sid)
        agent.session.send_data(sid, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial")
        agent.flush()
        assert await asyncio.wait_for(reader.readuntil(b"partial"), 10)
        response = await stack.admin.delete("/v1/sandboxes/sb1/ports/8000")  # type: ignore[union-attr]
        assert response.status_code == 204
        assert await _unexposed_reset(agent, sid) == StreamReset(sid, ResetCode.UNEXPOSED, True)
        with pytest.raises(ConnectionResetError):  # an RST, never a clean end of a short body
            await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert not agent.of(ConnectionTerminated)  # only that stream
    finally:
        await agent.close()


async def test_unexpose_before_any_response_byte_is_the_404_of_a_new_request(
    stack: Stack,
) -> None:
    """architecture.md, step 8: a stream that ends before any response byte gets a JSON error
    page; when the port was unexposed that page is 404 INVALID_TOKEN, what a new request to
    the URL gets (not a 502/503)."""
    agent = await raw_agent(stack)
    try:
        reader, writer, sid = await _open_preview_stream(stack, agent, 8001)
        response = await stack.admin.delete("/v1/sandboxes/sb1/ports/8001")  # type: ignore[union-attr]
        assert response.status_code == 204
        assert await _unexposed_reset(agent, sid) == StreamReset(sid, ResetCode.UNEXPOSED, True)
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 404 ")
        assert b'"code":"INVALID_TOKEN"' in answer
    finally:
        await agent.close()


@pytest.mark.parametrize("code", [ResetCode.CONNECT_REFUSED, ResetCode.CONNECT_FAILED], ids=str)
async def test_a_failed_dial_is_a_502_upstream_connect_failed(
    stack: Stack, code: ResetCode
) -> None:
    """architecture.md, step 6: the agent resets the stream with CONNECT_REFUSED or
    CONNECT_FAILED, which the edge turns into 502 UPSTREAM_CONNECT_FAILED (no response byte
    was sent yet). tunnel-agent only ever sends CONNECT_REFUSED in the other tests."""
    agent = await raw_agent(stack)
    try:
        reader, writer, sid = await _open_preview_stream(stack, agent, 8002)
        agent.session.reset_stream(sid, code)
        agent.flush()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 502 ")
        assert b'"code":"UPSTREAM_CONNECT_FAILED"' in answer
    finally:
        await agent.close()


# --------------------------------------------------------------------------- handshake, keepalive


@pytest.mark.parametrize(
    ("sandbox_id", "good_token", "code"),
    [("sb1", False, "AUTH_FAILED"), ("admin", True, "RESERVED_SANDBOX_ID")],
)
async def test_a_refused_hello_is_an_error_then_goaway_auth_failed(
    stack: Stack, sandbox_id: str, good_token: bool, code: str
) -> None:
    """protocol.md, handshake and error codes: a refused hello gets CONTROL error {code,
    message} (no id), then GO_AWAY(AUTH_FAILED) and the connection is closed."""
    token = agent_token(stack.secret, sandbox_id) if good_token else "wrong-token"
    agent = await raw_agent(stack, sandbox_id, token=token, welcome=False)
    try:
        await agent.wait_closed()
        (error,) = agent.messages(control.Error)
        assert (error.code, error.id) == (code, None)
        assert not agent.messages(control.Welcome)
        assert agent.of(GoAwayReceived) == [GoAwayReceived(GoAwayCode.AUTH_FAILED)]
        assert agent.events.index(GoAwayReceived(GoAwayCode.AUTH_FAILED)) > 0  # after the error
    finally:
        await agent.close()


async def test_the_edge_ends_a_silent_agent_with_goaway_timeout() -> None:
    """protocol.md, keepalive: a side that receives nothing for the dead timeout sends
    GO_AWAY(TIMEOUT) and closes (the edge's, configured short here)."""
    stack = await Stack(heartbeat_interval=0.3, dead_timeout=1.0).start()
    try:
        agent = await raw_agent(stack)
        agent.mute = True  # reads the edge's PINGs, answers none
        await agent.wait_closed()
        assert agent.of(GoAwayReceived) == [GoAwayReceived(GoAwayCode.TIMEOUT)]
        assert not agent.messages(control.Error)
        await agent.close()
    finally:
        await stack.close()


async def test_no_hello_within_the_handshake_timeout_is_a_close_without_goaway() -> None:
    """protocol.md, keepalive: tunneld's edge does not wait the dead timeout for a hello: a
    connection that sent none within handshake_timeout is closed, with no GO_AWAY."""
    stack = await Stack(handshake_timeout=0.5).start()
    try:
        assert stack.edge is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.agent_port)
        writer.write(PREFACE)  # a valid start, then silence
        try:
            received = await asyncio.wait_for(reader.read(), 10)
        except ConnectionResetError:
            received = b""
        writer.close()
        assert received == b""  # not even a GO_AWAY frame
    finally:
        await stack.close()


# --------------------------------------------------------------------------- control replies


async def test_ok_for_an_expose_has_the_one_exposure_and_for_a_list_all_sorted_by_port(
    stack: Stack,
) -> None:
    """protocol.md, error codes: the ok for an agent's expose carries the one resulting
    exposure; ok for list carries all of them, sorted by port."""
    agent = await raw_agent(stack)
    try:
        for port in (9000, 8000):
            await stack.expose("sb1", port)
        agent.session.send_control(control.Expose(1, 8500, name="mid"))
        agent.flush()
        await agent.wait_for(
            lambda e: (
                isinstance(e, ControlReceived)
                and isinstance(e.message, control.Ok)
                and e.message.id == 1
            )
        )
        (ok,) = [m for m in agent.messages(control.Ok) if m.id == 1]
        assert [(x.port, x.name) for x in ok.exposures] == [(8500, "mid")]
        agent.session.send_control(control.ListExposures(2))
        agent.flush()
        await agent.wait_for(
            lambda e: (
                isinstance(e, ControlReceived)
                and isinstance(e.message, control.Ok)
                and e.message.id == 2
            )
        )
        (listed,) = [m for m in agent.messages(control.Ok) if m.id == 2]
        assert [x.port for x in listed.exposures] == [8000, 8500, 9000]
    finally:
        await agent.close()


# --------------------------------------------------------------------------- raw TCP


async def test_raw_tcp_is_answered_101_only_after_the_agents_ack(stack: Stack) -> None:
    """protocol.md, streams: raw TCP for orchestrators relies on the ACK: the edge answers
    101 only once it arrives (so a refused connect can still be a 502)."""
    assert stack.edge is not None
    agent = await raw_agent(stack)
    client = socket.create_connection(("127.0.0.1", stack.edge.admin_port), timeout=10)
    try:
        client.sendall(
            b"GET /v1/sandboxes/sb1/ports/8000/tcp HTTP/1.1\r\nhost: admin\r\n"
            + f"authorization: Bearer {stack.admin_token}\r\n".encode()
            + b"connection: upgrade\r\nupgrade: tcp\r\n\r\n"
        )
        opened = await agent.wait_for(lambda e: isinstance(e, StreamOpened))
        assert isinstance(opened, StreamOpened) and (opened.port, opened.via) == (8000, "direct")
        # A PING round trip: everything the edge wrote before answering it (a premature 101
        # included) is in the client's socket buffer by then (loopback writes are immediate).
        agent.session.ping(asyncio.get_running_loop().time())
        agent.flush()
        await agent.wait_for(lambda e: isinstance(e, PingAcknowledged))
        client.setblocking(False)
        with pytest.raises(BlockingIOError):
            client.recv(4096)  # nothing yet: no ACK, no 101
        agent.session.accept_stream(opened.stream_id)
        agent.flush()
        client.settimeout(10)
        answer = await asyncio.get_running_loop().run_in_executor(None, client.recv, 4096)
        assert answer.startswith(b"HTTP/1.1 101 ")
    finally:
        client.close()
        await agent.close()
