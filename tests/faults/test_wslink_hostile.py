"""WebSocket frames that carry no session bytes on the agent link (relay/wslink.py): a Ping, a
Close, a text message, a refused upgrade.

Edge side: a hostile WebSocket client (wsproto on a raw socket, 127.0.0.1) completes the
agent-link upgrade, authenticates as a real agent would (a real ``Session`` in binary
messages), and then sends one of them. A Ping gets its Pong and the session goes on; a Close
gets a Close back and the edge ends the session, logged; a text message ends the link with a
log line saying so. Each time the edge's tables end up empty.

Agent side: the agent's WebSocket link is the same code (``MuxProtocol`` with a client
``WebSocketLink``), so a hostile edge sends the same frames to a real agent: it answers the
Ping and stays connected, answers the Close, leaves on a text message and on a refused
upgrade, and each time says so in its log and connects again.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import wsproto
import wsproto.events as wse

import relay.mux
from agent.core import Agent, AgentConfig
from protocol import control
from protocol.events import ControlReceived, PingAcknowledged
from protocol.session import Role, Session
from relay.mux import link_closed_log
from relay.wslink import AGENT_PATH, SUBPROTOCOL
from tests.e2e.conftest import wait_until
from tunneld.auth import agent_token

from .conftest import Stack, log_messages, stack  # noqa: F401  (the fixture)

pytestmark = pytest.mark.anyio


class WsPeer:
    """One end of an agent link over WebSocket, driven by hand: wsproto for the WebSocket, a
    real sans-IO ``Session`` for what the binary messages carry."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        role: Role,
    ) -> None:
        client = role is Role.AGENT
        self.reader = reader
        self.writer = writer
        self.ws = wsproto.WSConnection(
            wsproto.ConnectionType.CLIENT if client else wsproto.ConnectionType.SERVER
        )
        self.session = Session(role)
        self.ws_events: list[wse.Event] = []
        self.session_events: list[object] = []
        self.eof = False

    def send(self, event: wse.Event) -> None:
        self.writer.write(self.ws.send(event))

    def flush_session(self) -> None:
        data = self.session.data_to_send()
        if data:
            self.send(wse.BytesMessage(data=b"".join(data)))

    async def until(self, done: Callable[[], object], timeout: float = 10) -> None:
        """Read (answering nothing by itself) until ``done()`` or EOF."""
        async with asyncio.timeout(timeout):
            while not done():
                if self.eof:
                    raise AssertionError("the peer closed the connection first")
                try:
                    data = await self.reader.read(65536)
                except ConnectionResetError:
                    data = b""
                if not data:
                    self.eof = True
                    self.ws.receive_data(None)
                else:
                    self.ws.receive_data(data)
                for event in self.ws.events():
                    self.ws_events.append(event)
                    if isinstance(event, wse.BytesMessage):
                        self.session.receive_data(event.data)
                        self.session_events += self.session.events_received()
                self.flush_session()

    def saw(self, kind: type, **fields: object) -> Any:
        for event in self.ws_events:
            if isinstance(event, kind) and all(getattr(event, k) == v for k, v in fields.items()):
                return event
        return None

    async def closed(self, timeout: float = 10) -> None:
        await self.until(lambda: self.eof, timeout)

    def close(self) -> None:
        self.writer.close()


# -- the edge, facing a hostile WebSocket client ------------------------------------------------
async def _hostile_agent(edge_stack: Stack, sandbox_id: str = "sb1") -> WsPeer:
    """Upgrade to the agent link and authenticate: the edge then holds a session for it."""
    assert edge_stack.edge is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", edge_stack.edge.agent_port)
    peer = WsPeer(reader, writer, Role.AGENT)
    peer.send(wse.Request(host="edge", target=AGENT_PATH, subprotocols=[SUBPROTOCOL]))
    await peer.until(lambda: peer.saw(wse.AcceptConnection))
    token = agent_token(edge_stack.secret, sandbox_id)
    peer.session.send_control(control.Hello(sandbox_id, token, control.UNWATCH_PORT_VERSION))
    peer.flush_session()
    await peer.until(lambda: _control(peer, control.Welcome))
    entry = edge_stack.edge.registry.get(sandbox_id)
    assert entry is not None and entry.session is not None
    return peer


def _control(peer: WsPeer, kind: type) -> list[Any]:
    return [
        e.message
        for e in peer.session_events
        if isinstance(e, ControlReceived) and isinstance(e.message, kind)
    ]


def _no_session_left(edge_stack: Stack, sandbox_id: str = "sb1") -> bool:
    assert edge_stack.edge is not None
    entry = edge_stack.edge.registry.get(sandbox_id)
    return (
        not edge_stack.edge.agent_connections
        and not edge_stack.edge.pending_agents
        and (entry is None or entry.session is None)
    )


@pytest.fixture
def link_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="tunnel.mux")
    caplog.set_level(logging.INFO, logger="tunneld")
    caplog.set_level(logging.INFO, logger="tunnel")
    return caplog


async def test_a_ping_gets_a_pong_and_the_session_goes_on(
    stack: Stack,  # noqa: F811
) -> None:
    peer = await _hostile_agent(stack)
    try:
        assert stack.edge is not None
        session = stack.edge.registry.get("sb1").session
        peer.send(wse.Ping(payload=b"are you there"))
        await peer.until(lambda: peer.saw(wse.Pong, payload=b"are you there"))
        # the same session still answers: a control request and a session-level ping
        peer.session.send_control(control.ListExposures(7))
        peer.session.ping(0.0)
        peer.flush_session()
        await peer.until(lambda: [m for m in _control(peer, control.Ok) if m.id == 7])
        await peer.until(
            lambda: [e for e in peer.session_events if isinstance(e, PingAcknowledged)]
        )
        assert stack.edge.registry.get("sb1").session is session
        assert not peer.eof
    finally:
        peer.close()
    await wait_until(lambda: _no_session_left(stack), 10, "the edge to drop the session")


async def test_a_close_gets_a_close_and_the_edge_ends_the_session(
    stack: Stack,  # noqa: F811
    link_log: pytest.LogCaptureFixture,
) -> None:
    peer = await _hostile_agent(stack)
    try:
        peer.send(wse.CloseConnection(code=1000, reason="bye"))
        await peer.closed()
    finally:
        peer.close()
    assert peer.saw(wse.CloseConnection, code=1000), peer.ws_events  # the edge's answer
    await wait_until(lambda: _no_session_left(stack), 10, "the edge to drop the session")
    assert log_messages(link_log, "agent link closed: WebSocket closed (1000)")
    assert [m for m in log_messages(link_log, "sandbox sb1") if "after" in m], "end not logged"


async def test_session_bytes_read_with_a_close_still_reach_the_session(
    stack: Stack,  # noqa: F811
    link_log: pytest.LogCaptureFixture,
) -> None:
    """A GO_AWAY and a Close in one read: the GO_AWAY in front of the Close is not dropped with
    the link, so the edge logs the agent's orderly end, not a lost link."""
    peer = await _hostile_agent(stack)
    try:
        peer.session.close()  # GO_AWAY(NORMAL), sent in the same write as the Close
        data = b"".join(peer.session.data_to_send())
        peer.writer.write(
            peer.ws.send(wse.BytesMessage(data=data))
            + peer.ws.send(wse.CloseConnection(code=1000, reason="bye"))
        )
        await peer.closed()
    finally:
        peer.close()
    await wait_until(lambda: _no_session_left(stack), 10, "the edge to drop the session")
    ends = [m for m in log_messages(link_log, "sandbox sb1") if " after " in m]
    assert ends and "ended after" in ends[0] and "NORMAL by the agent" in ends[0], ends


async def test_a_text_message_ends_the_link(
    stack: Stack,  # noqa: F811
    link_log: pytest.LogCaptureFixture,
) -> None:
    peer = await _hostile_agent(stack)
    try:
        peer.send(wse.TextMessage(data="hello?"))
        await peer.closed()
    finally:
        peer.close()
    await wait_until(lambda: _no_session_left(stack), 10, "the edge to drop the session")
    assert log_messages(link_log, "agent link closed: text message on the agent link")
    assert [m for m in log_messages(link_log, "sandbox sb1") if "after" in m], "end not logged"


@pytest.mark.parametrize(
    "event",
    [
        wse.Ping(payload=b"x"),
        wse.CloseConnection(code=1001),
        wse.TextMessage(data="hi"),
    ],
    ids=["ping", "close", "text"],
)
async def test_before_the_hello_the_same_frames_leave_nothing_behind(
    stack: Stack,  # noqa: F811
    link_log: pytest.LogCaptureFixture,
    event: wse.Event,
) -> None:
    assert stack.edge is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.agent_port)
    peer = WsPeer(reader, writer, Role.AGENT)
    try:
        peer.send(wse.Request(host="edge", target=AGENT_PATH, subprotocols=[SUBPROTOCOL]))
        await peer.until(lambda: peer.saw(wse.AcceptConnection))
        peer.send(event)
        if isinstance(event, wse.Ping):
            await peer.until(lambda: peer.saw(wse.Pong, payload=b"x"))
            assert stack.edge.agent_connections  # still there, waiting for its hello
        else:
            await peer.closed()
    finally:
        peer.close()
    await wait_until(lambda: _no_session_left(stack), 10, "the edge to drop the connection")
    if isinstance(event, wse.CloseConnection):
        assert peer.saw(wse.CloseConnection, code=1001)
        assert log_messages(link_log, "agent link closed: WebSocket closed (1001)")
    elif isinstance(event, wse.TextMessage):
        assert log_messages(link_log, "agent link closed: text message")


async def test_a_close_from_a_peer_that_reads_nothing_still_ends_the_session(
    link_log: pytest.LogCaptureFixture,
) -> None:
    """The peer stops reading, asks for pongs until the edge has output it cannot send, then
    sends a Close: the edge's Close reply waits behind that output, so the socket stays open
    while the WebSocket is closed. The session still gets flushed meanwhile (its heartbeat, its
    dead-peer timer, its GO_AWAY at shutdown), and there is nothing to send it in any more: it
    must neither raise (which stopped the session's timer, so the sandbox stayed "connected"
    for good, and made the edge's stop fail) nor leave the session registered."""
    edge_stack = await Stack(heartbeat_interval=0.5, dead_timeout=2.0).start()
    stopped = False
    try:
        assert edge_stack.edge is not None
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(
            loop.sock_connect(sock, ("127.0.0.1", edge_stack.edge.agent_port)), 10
        )
        reader, writer = await asyncio.open_connection(sock=sock)
        peer = WsPeer(reader, writer, Role.AGENT)
        peer.send(wse.Request(host="edge", target=AGENT_PATH, subprotocols=[SUBPROTOCOL]))
        await peer.until(lambda: peer.saw(wse.AcceptConnection))
        token = agent_token(edge_stack.secret, "sb1")
        peer.session.send_control(control.Hello("sb1", token, control.UNWATCH_PORT_VERSION))
        peer.flush_session()
        await peer.until(lambda: _control(peer, control.Welcome))
        (session,) = edge_stack.edge.agent_connections
        writer.transport.pause_reading()  # from now on nothing is read
        ping = peer.ws.send(wse.Ping(payload=b"p" * 125))
        for _ in range(40):  # 520 KB of pings: more pongs than the socket buffers take
            writer.write(ping * 100)
            await asyncio.wait_for(writer.drain(), 10)
        await wait_until(lambda: session.output_backlog > 0, 10, "pongs the edge cannot send")
        writer.write(peer.ws.send(wse.CloseConnection(code=1000)))
        await asyncio.wait_for(writer.drain(), 10)
        await wait_until(
            lambda: log_messages(link_log, "agent link closed: WebSocket closed (1000)"),
            10,
            "the edge to read the Close",
        )
        # The heartbeat runs, then the dead-peer timer ends the session.
        await wait_until(
            lambda: edge_stack.edge is not None and edge_stack.edge.registry.get("sb1") is None,
            10,
            "the session to end",
        )
        assert log_messages(link_log, "TIMEOUT by the edge")
        await edge_stack.close()  # a GO_AWAY to every session: must not raise
        stopped = True
        writer.transport.abort()
    finally:
        if not stopped:
            await edge_stack.close()


# -- the agent, facing a hostile edge ------------------------------------------------------------
class HostileWsEdge:
    """Accepts the agent's upgrade (or refuses it with ``refuse``), welcomes its hello, and
    hands each link to the test as a ``WsPeer``."""

    def __init__(self, refuse: int | None = None) -> None:
        self.refuse = refuse
        self.links: asyncio.Queue[WsPeer] = asyncio.Queue()
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self.peers: list[WsPeer] = []

    async def start(self) -> HostileWsEdge:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        peer = WsPeer(reader, writer, Role.EDGE)
        self.peers.append(peer)
        try:
            await peer.until(lambda: peer.saw(wse.Request))
            if self.refuse is not None:
                peer.send(wse.RejectConnection(status_code=self.refuse, has_body=False))
                await peer.closed()
                return
            peer.send(wse.AcceptConnection(subprotocol=SUBPROTOCOL))
            await peer.until(lambda: _hello(peer))
            peer.session.send_control(control.Welcome("hostile", 10.0, {}, ()))
            peer.flush_session()
            self.links.put_nowait(peer)
        except (AssertionError, TimeoutError, ConnectionError):
            peer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for peer in self.peers:
            peer.writer.transport.abort()
        await self.server.wait_closed()


def _hello(peer: WsPeer) -> bool:
    return any(
        isinstance(e, ControlReceived) and isinstance(e.message, control.Hello)
        for e in peer.session_events
    )


@pytest.fixture
async def agent_of(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Callable[..., Any]]:
    """``await agent_of(edge)``: a real agent over ``ws://`` to the hostile edge, stopped after.
    Its "agent link closed" lines get a fresh rate limit (the module's own is shared)."""
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(relay.mux, "_LINK_LOG", link_closed_log(loop.time()))
    started: list[tuple[Agent, asyncio.Task[None]]] = []

    async def start(edge: HostileWsEdge) -> Agent:
        config = AgentConfig("127.0.0.1", edge.port, "sb1", "token", websocket=True)
        agent = Agent(config)
        started.append((agent, loop.create_task(agent.run())))
        return agent

    try:
        yield start
    finally:
        for agent, task in started:
            await agent.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _next_link(edge: HostileWsEdge, agent: Agent) -> WsPeer:
    peer = await asyncio.wait_for(edge.links.get(), 10)
    await asyncio.wait_for(agent.connected_event.wait(), 10)
    return peer


async def test_the_agent_answers_a_ping_and_stays_connected(
    agent_of: Callable[..., Any],
) -> None:
    edge = await HostileWsEdge().start()
    try:
        agent = await agent_of(edge)
        peer = await _next_link(edge, agent)
        session = agent.session
        peer.send(wse.Ping(payload=b"ping from the edge"))
        await peer.until(lambda: peer.saw(wse.Pong, payload=b"ping from the edge"))
        peer.session.ping(0.0)  # and the session it carries still answers
        peer.flush_session()
        await peer.until(
            lambda: [e for e in peer.session_events if isinstance(e, PingAcknowledged)]
        )
        assert agent.session is session and agent.connected_event.is_set()
        assert edge.connections == 1
    finally:
        await edge.close()


@pytest.mark.parametrize(
    ("event", "line"),
    [
        (wse.CloseConnection(code=1001, reason="going"), "WebSocket closed (1001)"),
        (wse.TextMessage(data="hi"), "text message on the agent link"),
    ],
    ids=["close", "text"],
)
async def test_the_agent_leaves_on_a_close_or_a_text_message_and_connects_again(
    agent_of: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
    event: wse.Event,
    line: str,
) -> None:
    caplog.set_level(logging.INFO)
    edge = await HostileWsEdge().start()
    try:
        agent = await agent_of(edge)
        peer = await _next_link(edge, agent)
        first = agent.session
        peer.send(event)
        await peer.closed()
        if isinstance(event, wse.CloseConnection):
            assert peer.saw(wse.CloseConnection, code=1001), peer.ws_events  # the agent's answer
        assert log_messages(caplog, f"agent link closed: {line}")
        await wait_until(lambda: "ended" in " ".join(log_messages(caplog, "edge session")), 10)
        second = await _next_link(edge, agent)  # it connects again
        assert agent.session is not first and not second.eof
    finally:
        await edge.close()


async def test_the_agent_reports_a_refused_upgrade_and_tries_again(
    agent_of: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    edge = await HostileWsEdge(refuse=403).start()
    try:
        agent = await agent_of(edge)
        await wait_until(lambda: edge.connections >= 2, 10, "the agent to try again")
        assert log_messages(caplog, "agent link closed: WebSocket upgrade refused with HTTP 403")
        assert not agent.connected_event.is_set()
    finally:
        await edge.close()
