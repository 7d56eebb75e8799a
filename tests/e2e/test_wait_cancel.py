"""An admin client that leaves in the middle of a long wait for a port stops the agent's probes
(``unwatch_port``), only agents that say they understand it are sent the message, and the
connection watch does not lose a request pipelined behind the wait.

The probe target is a real listener that counts every connection the agent's probes make and
answers 503 (not ready), so the wait goes on until someone stops it. "The probes stopped" is
asserted on that count: once the agent has dropped its watch, the count stays the same over many
further probe intervals."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from agent.portwatch import MIN_INTERVAL_MS
from protocol import control
from tunneld.client import TunnelClient
from tunneld.edge import EdgeSession

from .conftest import Stack, wait_until

pytestmark = pytest.mark.anyio

INTERVAL_MS = MIN_INTERVAL_MS
# Probe intervals over which a stopped watch must not probe again (a sleep over a window in
# which nothing may happen, with the counter that would show it: docs/testing.md).
QUIET_INTERVALS = 10


class CountingService:
    """Counts connections (each probe is one) and answers each request 503."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> CountingService:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def service() -> AsyncIterator[CountingService]:
    s = await CountingService().start()
    try:
        yield s
    finally:
        await s.close()


def _wait_request(stack: Stack, port: int, timeout: float = 120, sandbox: str = "sb1") -> bytes:
    body = orjson.dumps({"interval": INTERVAL_MS, "timeout": timeout})
    return (
        b"POST /v1/sandboxes/%s/ports/%d/wait HTTP/1.1\r\nhost: admin\r\n"
        b"authorization: Bearer %s\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s"
        % (sandbox.encode(), port, stack.admin_token.encode(), len(body), body)
    )


async def _open_admin(stack: Stack) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert stack.edge is not None
    return await asyncio.open_connection("127.0.0.1", stack.edge.admin_port)


async def _quiet(service: CountingService) -> None:
    """The count must not move over QUIET_INTERVALS probe intervals."""
    before = service.connections
    await asyncio.sleep(QUIET_INTERVALS * INTERVAL_MS / 1000)
    assert service.connections == before, "the agent kept probing after the client left"


async def test_client_leaving_mid_wait_stops_the_agents_probes(
    stack: Stack, service: CountingService
) -> None:
    agent = await stack.agent("sb1")
    session = agent_session_on_edge(stack)
    _reader, writer = await _open_admin(stack)
    writer.write(_wait_request(stack, service.port))
    await writer.drain()
    await wait_until(lambda: service.connections >= 3, timeout=10, what="the agent's probes")
    assert agent.port_watches.active == 1
    writer.transport.abort()  # the admin client is gone (a killed orchestrator)
    await wait_until(lambda: agent.port_watches.active == 0, timeout=5, what="the watch to stop")
    await _quiet(service)
    # The edge forgot the request, and the agent's session is still up: another wait works.
    assert session is not None and agent_session_on_edge(stack) is session
    assert not session.port_waits and len(session.pending) == 0
    assert stack.admin is not None
    r = await stack.admin.post(
        f"/v1/sandboxes/sb1/ports/{service.port}/wait", json={"interval": 100, "timeout": 0.3}
    )
    assert r.status_code == 504 and r.json()["lastStatus"] == 503


def agent_session_on_edge(stack: Stack) -> EdgeSession | None:
    assert stack.edge is not None
    state = stack.edge.registry.get("sb1")
    return state.session if state is not None else None


async def test_half_close_of_the_client_counts_as_leaving(
    stack: Stack, service: CountingService
) -> None:
    """EOF from the client ends the wait too (as Go's net/http cancels a request's context)."""
    agent = await stack.agent("sb1")
    reader, writer = await _open_admin(stack)
    writer.write(_wait_request(stack, service.port))
    writer.write_eof()
    await wait_until(lambda: service.connections >= 1, timeout=10, what="the agent's probes")
    await wait_until(lambda: agent.port_watches.active == 0, timeout=5, what="the watch to stop")
    await _quiet(service)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # no answer, just the close
    writer.close()


async def test_an_agent_without_unwatch_is_not_sent_it(
    stack: Stack, service: CountingService
) -> None:
    """An agent whose hello says WATCH_PORT_VERSION (it predates unwatch_port) would drop its
    session at the unknown message: the edge stops waiting but tells it nothing, and the agent
    probes on until its own timeout."""
    agent = await stack.agent("sb1")
    session = agent_session_on_edge(stack)
    assert session is not None
    session.agent_version = control.WATCH_PORT_VERSION
    _reader, writer = await _open_admin(stack)
    writer.write(_wait_request(stack, service.port))
    await writer.drain()
    await wait_until(lambda: agent.port_watches.active == 1, timeout=10, what="the watch")
    writer.transport.abort()
    await wait_until(
        lambda: len(session.pending) == 0,
        what="the edge to stop waiting",
    )
    seen = service.connections
    await wait_until(lambda: service.connections >= seen + 3, timeout=10, what="more probes")
    assert agent.port_watches.active == 1
    assert agent_session_on_edge(stack) is session  # no protocol error: the same session


async def test_a_request_pipelined_behind_a_wait_is_answered_after_it(
    stack: Stack, service: CountingService
) -> None:
    """The connection is read during the wait (to see the client leave); a request sent behind
    the wait is kept and answered after it, in order."""
    await stack.agent("sb1")
    reader, writer = await _open_admin(stack)
    writer.write(_wait_request(stack, service.port, timeout=2))
    await writer.drain()
    await wait_until(lambda: service.connections >= 1, timeout=10, what="the wait to be under way")
    writer.write(b"GET /healthz HTTP/1.1\r\nhost: admin\r\n\r\n")
    await writer.drain()
    first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert first.startswith(b"HTTP/1.1 504 ")
    length = int(first.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    body = orjson.loads(await reader.readexactly(length))
    assert body["code"] == "PORT_NOT_READY" and body["lastStatus"] == 503
    second = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert second.startswith(b"HTTP/1.1 200 ")
    writer.close()


async def test_the_agent_ignores_an_unwatch_for_no_watch(stack: Stack) -> None:
    """An unwatch_port that crosses the watch's own reply (an id the agent no longer runs) is
    ignored: the session stays up."""
    agent = await stack.agent("sb1")
    session = agent_session_on_edge(stack)
    assert session is not None
    session.session.send_control(control.UnwatchPort(12345))
    session.flush()
    assert stack.admin is not None
    r = await stack.admin.post("/v1/sandboxes/sb1/ports", json={"port": 8000})
    assert r.status_code == 200  # the edge -> agent push was acknowledged: the session lives
    assert agent_session_on_edge(stack) is session
    assert 8000 in agent.exposures


async def test_the_agent_says_it_understands_unwatch_port(stack: Stack) -> None:
    await stack.agent("sb1")
    session = agent_session_on_edge(stack)
    assert session is not None
    assert session.agent_version == control.UNWATCH_PORT_VERSION
    assert control.UNWATCH_PORT_VERSION > control.WATCH_PORT_VERSION > control.PROTOCOL_VERSION


async def test_unwatch_port_and_the_node_link_sandbox_field_on_the_wire() -> None:
    msg = control.UnwatchPort(7)
    assert orjson.loads(control.encode_message(msg)) == {"type": "unwatch_port", "id": 7}
    assert control.decode_message(control.encode_message(msg)) == msg
    forwarded = control.WatchPort(3, 8000, sandbox="sb1")
    assert orjson.loads(control.encode_message(forwarded))["sandbox"] == "sb1"
    assert control.decode_message(control.encode_message(forwarded)) == forwarded
    # An agent's watch_port carries no sandbox: byte for byte what a version-2 agent reads.
    assert "sandbox" not in orjson.loads(control.encode_message(control.WatchPort(3, 8000)))
    for bad in ({"id": -1}, {"id": 1, "port": 8000}, {}):
        with pytest.raises(control.ControlError):
            control.decode_message(orjson.dumps({"type": "unwatch_port", **bad}))
    with pytest.raises(control.ControlError):
        control.decode_message(
            orjson.dumps({"type": "watch_port", "id": 1, "port": 8000, "sandbox": ""})
        )


async def test_cancelling_the_sdks_wait_for_port_stops_the_probes(
    stack: Stack, service: CountingService
) -> None:
    """The SDK closes the connection of a call that is cancelled, so the edge sees its client
    leave."""
    agent = await stack.agent("sb1")
    assert stack.edge is not None
    url = f"http://127.0.0.1:{stack.edge.admin_port}"
    async with TunnelClient(url, token=stack.admin_token) as client:
        call = asyncio.ensure_future(
            client.sandbox("sb1").wait_for_port(service.port, interval=0.1, timeout=120)
        )
        await wait_until(lambda: service.connections >= 2, timeout=10, what="the agent's probes")
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
        await wait_until(
            lambda: agent.port_watches.active == 0, timeout=5, what="the watch to stop"
        )
        await _quiet(service)
