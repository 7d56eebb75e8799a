"""Claims of docs/agent.md and docs/protocol.md about the agent's link to the edge: what its hello
says, the keepalive it adopts from a welcome, the reconnect schedule after ``REPLACED``, and the
log lines it writes for each way a connect or a session ends.

A small fake edge on 127.0.0.1 (a real socket and a sans-IO ``Session(Role.EDGE)``) answers the
agent's hello the way each test needs; the agent is the real ``agent.core.Agent``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from agent import core
from agent.core import Agent, AgentConfig, EdgeAddress
from protocol import control
from protocol.errors import GoAwayCode
from protocol.events import ControlReceived
from protocol.session import Role, Session, SessionConfig

ROOT = Path(__file__).resolve().parents[2]
AGENT_DOC = (ROOT / "docs" / "agent.md").read_text(encoding="utf-8")
PROTOCOL_DOC = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
LOG = "tunnel.agent"

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


def flat(text: str) -> str:
    return " ".join(text.split())


class FakeEdge(asyncio.Protocol):
    """Answers a hello with ``welcome`` (``heartbeat_s``, one exposure), or refuses it; then
    optionally sends ``GO_AWAY(goaway)`` and closes, or (``silent``) ignores the agent."""

    def __init__(self, owner: FakeEdgeServer) -> None:
        self.owner = owner
        self.session = Session(Role.EDGE)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.owner.silent and self.owner.hellos:
            return  # never reads again: the agent hears nothing
        self.session.receive_data(data)
        for event in self.session.events_received():
            if isinstance(event, ControlReceived) and isinstance(event.message, control.Hello):
                self.owner.hellos.append(event.message)
                self._answer()
        assert self.transport is not None
        self.transport.writelines(self.session.data_to_send())
        if self.session.closed:
            self.transport.close()

    def _answer(self) -> None:
        owner = self.owner
        if owner.refuse is not None:
            self.session.send_control(control.Error("AUTH_FAILED", owner.refuse))
            self.session.close(GoAwayCode.AUTH_FAILED)
            return
        exposure = control.Exposure(8000, "tok", "http://8000-abc123-tok.localhost:8080/")
        welcome = control.Welcome(owner.session_id, owner.heartbeat_s, {}, (exposure,))
        self.session.send_control(welcome)
        if owner.goaway is not None:
            self.session.close(owner.goaway)


class FakeEdgeServer:
    def __init__(
        self,
        *,
        heartbeat_s: float = 10.0,
        goaway: GoAwayCode | None = None,
        refuse: str | None = None,
        silent: bool = False,
    ) -> None:
        self.heartbeat_s = heartbeat_s
        self.goaway = goaway
        self.refuse = refuse
        self.silent = silent
        self.session_id = "5d2761e60be52799"
        self.hellos: list[control.Hello] = []
        self.port = 0


@asynccontextmanager
async def fake_edge(server: FakeEdgeServer) -> AsyncIterator[FakeEdgeServer]:
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: FakeEdge(server), "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        await listener.wait_closed()


@asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[Agent]:
    task = asyncio.get_running_loop().create_task(agent.run())
    try:
        yield agent
    finally:
        await asyncio.wait_for(agent.stop(), 5)
        task.cancel()
        try:
            await asyncio.wait_for(task, 5)
        except asyncio.CancelledError:
            pass


@pytest.fixture
def agent_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger=LOG)
    return caplog


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOG]


async def wait_for_line(
    caplog: pytest.LogCaptureFixture, pattern: str, timeout: float = 10.0
) -> tuple[int, str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        for level, message in lines(caplog):
            if re.fullmatch(pattern, message):
                return level, message
        if loop.time() > deadline:
            raise AssertionError(f"no log line {pattern!r} within {timeout} s: {lines(caplog)}")
        await asyncio.sleep(0.01)


def doc_example(prefix: str) -> str:
    """The one example log line of docs/agent.md that starts with ``prefix``."""
    found = [line for line in AGENT_DOC.splitlines() if line.startswith(prefix)]
    assert len(found) == 1, (prefix, found)
    return found[0]


def as_pattern(example: str, **variable: str) -> str:
    """``example`` as a regex: each ``variable`` value (as the doc writes it) matches ``\\S+``,
    the delay any number."""
    example = re.sub(r"retrying in [0-9.]+ s$", "retrying in DELAY s", example)
    pattern = re.escape(example).replace("DELAY", "[0-9.]+")
    for text in variable.values():
        pattern = pattern.replace(re.escape(text), r"\S+")
    return pattern


def config(edge: EdgeAddress, session: SessionConfig | None = None) -> AgentConfig:
    return AgentConfig(
        edge.host,
        edge.port,
        "abc123",
        "token",
        servers=(edge,),
        session=session or SessionConfig(),
        connect_timeout=5.0,
    )


# -- what the agent says in its hello --------------------------------------------------------------


async def test_the_agents_hello_says_the_version_the_doc_names() -> None:
    """protocol.md: '3 (`UNWATCH_PORT_VERSION`, what tunnel-agent sends today)'."""
    match = re.search(r"(\d) \(`(\w+)`, what tunnel-agent sends today\)", flat(PROTOCOL_DOC))
    assert match
    async with fake_edge(FakeEdgeServer()) as edge:
        agent = Agent(config(EdgeAddress("127.0.0.1", edge.port)))
        async with running(agent):
            await asyncio.wait_for(agent.connected_event.wait(), 10)
        assert [h.version for h in edge.hellos][:1] == [int(match.group(1))]
        assert getattr(control, match.group(2)) == int(match.group(1))
        assert edge.hellos[0].sandbox_id == "abc123" and edge.hellos[0].token == "token"


# -- keepalive adopted from the welcome ------------------------------------------------------------


async def test_the_agent_pings_at_a_shorter_heartbeat_and_waits_1_5_intervals() -> None:
    """protocol.md, keepalive: 'The agent pings at the welcome's `heartbeat_s` instead when that
    is shorter (never more often than every 0.2 s), and then waits at least 1.5 of its own
    intervals before it declares the edge dead'. Its own dead timeout here is shorter than
    1.5 intervals, so the 1.5 decides."""
    text = flat(PROTOCOL_DOC)
    floor = re.search(r"never more often than every ([0-9.]+) s", text)
    factor = re.search(r"waits at least ([0-9.]+) of its own intervals", text)
    assert floor and factor
    assert float(floor.group(1)) == core.MIN_HEARTBEAT
    async with fake_edge(FakeEdgeServer(heartbeat_s=4.0)) as edge:
        own = SessionConfig(heartbeat_interval=10.0, dead_timeout=1.0)
        agent = Agent(config(EdgeAddress("127.0.0.1", edge.port), own))
        async with running(agent):
            await asyncio.wait_for(agent.connected_event.wait(), 10)
            assert agent.session is not None
            session = agent.session.session
            assert session.dead_timeout == float(factor.group(1)) * 4.0


# -- reconnects ------------------------------------------------------------------------------------


async def test_after_replaced_the_agent_waits_20_to_40_s_with_one_error_line(
    agent_log: pytest.LogCaptureFixture,
) -> None:
    """agent.md, reconnects: after `GO_AWAY REPLACED` the agent waits 20 to 40 s (not ~0.1 s),
    and says so in one error line."""
    match = re.search(r"`GO_AWAY REPLACED`\) it waits (\d+)\u2013(\d+) s", flat(AGENT_DOC))
    assert match
    low, high = int(match.group(1)), int(match.group(2))
    async with fake_edge(FakeEdgeServer(goaway=GoAwayCode.REPLACED)) as edge:
        async with running(Agent(config(EdgeAddress("127.0.0.1", edge.port)))):
            level, line = await wait_for_line(
                agent_log,
                r"edge session \S+ ended: .*: another agent connected as sandbox abc123 and "
                r"replaced this one; retrying in (\d+) s",
            )
    assert level == logging.ERROR
    delay = re.search(r"retrying in (\d+) s$", line)
    assert delay and low <= int(delay.group(1)) <= high
    assert len(edge.hellos) == 1  # no second attempt while it waits


# -- log lines -------------------------------------------------------------------------------------


async def test_a_session_the_edge_ends_is_the_documented_line(
    agent_log: pytest.LogCaptureFixture,
) -> None:
    example = doc_example("edge session 9fea0b6ad15530ff ended: GO_AWAY SHUTTING_DOWN")
    async with fake_edge(FakeEdgeServer(goaway=GoAwayCode.SHUTTING_DOWN)) as edge:
        async with running(Agent(config(EdgeAddress("127.0.0.1", edge.port)))):
            level, _ = await wait_for_line(
                agent_log, as_pattern(example, session="9fea0b6ad15530ff")
            )
    assert level == logging.WARNING


async def test_a_silent_edge_ends_in_the_documented_timeout_line(
    agent_log: pytest.LogCaptureFixture,
) -> None:
    example = doc_example("edge session 66ffc904e4599503 ended: TIMEOUT")
    async with fake_edge(FakeEdgeServer(heartbeat_s=0.2, silent=True)) as edge:
        own = SessionConfig(heartbeat_interval=0.2, dead_timeout=0.5)
        async with running(Agent(config(EdgeAddress("127.0.0.1", edge.port), own))):
            level, _ = await wait_for_line(
                agent_log, as_pattern(example, session="66ffc904e4599503")
            )
    assert level == logging.WARNING


async def test_a_refused_hello_is_the_documented_line(
    agent_log: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The doc's example names the edge by host name: the line also names the address that name
    resolved to ('edge.example.com:7000 at 203.0.113.7:7000')."""
    example = doc_example(
        "cannot connect to edge edge.example.com:7000 at 203.0.113.7:7000: refused"
    )
    message = re.search(r"refused by the edge: (.*) \(AUTH_FAILED\)", example)
    assert message
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo

    async def getaddrinfo(host: Any, port: Any, **kwargs: Any) -> Any:
        if host != "edge.example.com":
            return await real(host, port, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port))]

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    async with fake_edge(FakeEdgeServer(refuse=message.group(1))) as edge:
        entry = EdgeAddress("edge.example.com", edge.port)
        async with running(Agent(config(entry))):
            level, _ = await wait_for_line(
                agent_log,
                as_pattern(example.replace(":7000", f":{edge.port}"), address="203.0.113.7"),
            )
    assert level == logging.WARNING


async def test_one_address_logs_one_warning_per_round_and_connecting_at_debug(
    agent_log: pytest.LogCaptureFixture, refusing: int
) -> None:
    """agent.md: 'With one entry that resolves to one address ... the `connecting to` line is at
    debug level'; an entry given as an address is named once (no ' at ...')."""
    async with running(Agent(config(EdgeAddress("127.0.0.1", refusing)))):
        level, _ = await wait_for_line(
            agent_log,
            rf"cannot connect to edge 127\.0\.0\.1:{refusing}: ConnectionRefusedError: .*; "
            r"retrying in [0-9.]+ s",
        )
    assert level == logging.WARNING
    connecting = [lv for lv, m in lines(agent_log) if m.startswith("connecting to ")]
    assert connecting and set(connecting) == {logging.DEBUG}


async def test_connected_line_is_the_documented_one(agent_log: pytest.LogCaptureFixture) -> None:
    example = doc_example("connected to edge edge.example.com:7000 via proxy")
    # without a proxy, and named by address: the same line without ' via proxy ...'
    example = re.sub(r" via proxy \S+", "", example)
    async with fake_edge(FakeEdgeServer()) as edge:
        async with running(Agent(config(EdgeAddress("127.0.0.1", edge.port)))) as agent:
            await asyncio.wait_for(agent.connected_event.wait(), 10)
            level, _ = await wait_for_line(
                agent_log,
                as_pattern(example.replace("edge.example.com:7000", f"127.0.0.1:{edge.port}")),
            )
    assert level == logging.INFO
