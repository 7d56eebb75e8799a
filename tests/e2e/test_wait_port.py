"""Waiting for a sandbox port through the edge: the admin endpoint, the SDK, and the failure modes
(not ready in time, nobody listening, bad input, the agent not connected or leaving mid-wait).

Services are real listeners on 127.0.0.1 inside the test process (the agent dials them as it
dials any sandbox service); a socket bound to port 0 but not yet listening is a port that is ours
and refuses connects until the test makes it listen.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from tunneld.client import (
    InvalidPortError,
    PortNotReadyError,
    SandboxNotConnectedError,
    TunnelClient,
    TunnelError,
    ValidationError,
)

from .conftest import Stack, wait_until

pytestmark = pytest.mark.anyio


class Health:
    """GET /health answers 503 ``failures`` times, then 200; every request line is recorded."""

    def __init__(self, failures: int, path: bytes = b"/health") -> None:
        self.failures = failures
        self.path = path
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def serve(self, sock: socket.socket) -> Health:
        sock.listen()
        self.server = await asyncio.start_server(self._handle, sock=sock)
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        self.requests.append(head.split(b"\r\n", 1)[0])
        ok = head.startswith(b"GET " + self.path + b" ") and len(self.requests) > self.failures
        status = b"200 OK" if ok else b"503 Service Unavailable"
        writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def wait_path(port: int, sandbox: str = "sb1") -> str:
    return f"/v1/sandboxes/{sandbox}/ports/{port}/wait"


async def test_admin_wait_returns_once_the_service_is_healthy(
    stack: Stack, reserved: socket.socket
) -> None:
    agent = await stack.agent("sb1")
    port = reserved.getsockname()[1]
    assert stack.admin is not None
    body = {"path": "/health", "interval": 100, "timeout": 20}
    call = asyncio.ensure_future(stack.admin.post(wait_path(port), json=body))
    # The wait is under way (the agent probes a port nobody serves yet); then the service starts.
    await wait_until(lambda: agent.port_watches.active == 1, what="the agent's watch")
    assert not call.done()
    server = await Health(failures=2).serve(reserved)
    try:
        r = await asyncio.wait_for(call, 20)
    finally:
        await server.close()
    assert r.status_code == 200, r.text
    assert r.json() == {"port": port, "ready": True}
    assert server.requests == [b"GET /health HTTP/1.1"] * 3
    await wait_until(lambda: agent.port_watches.active == 0, what="the watch to end")


async def test_tcp_mode_needs_only_a_listener(stack: Stack, reserved: socket.socket) -> None:
    await stack.agent("sb1")
    server = await Health(failures=1000).serve(reserved)  # 503 forever: tcp does not care
    try:
        r = await stack.admin.post(wait_path(reserved.getsockname()[1]), json={"mode": "tcp"})
    finally:
        await server.close()
    assert r.status_code == 200
    assert server.requests == []


async def test_timeout_is_504_with_the_last_status(stack: Stack, reserved: socket.socket) -> None:
    await stack.agent("sb1")
    port = reserved.getsockname()[1]
    server = await Health(failures=1000).serve(reserved)
    try:
        body = {"path": "/health", "interval": 100, "timeout": 0.5}
        r = await stack.admin.post(wait_path(port), json=body)
    finally:
        await server.close()
    assert r.status_code == 504
    data = r.json()
    assert data["code"] == "PORT_NOT_READY"
    assert data["port"] == port and data["lastStatus"] == 503
    assert "HTTP 503" in data["error"]


async def test_nobody_listening_is_504_saying_why(stack: Stack, reserved: socket.socket) -> None:
    await stack.agent("sb1")
    loop = asyncio.get_running_loop()
    started = loop.time()
    r = await stack.admin.post(
        wait_path(reserved.getsockname()[1]), json={"mode": "tcp", "timeout": 0.4}
    )
    assert loop.time() - started < 5
    assert r.status_code == 504
    assert r.json()["lastStatus"] is None
    assert "connection refused" in r.json()["error"]


@pytest.mark.parametrize(
    ("port", "body", "code", "words"),
    [
        (3000, {}, "INVALID_PORT", "excluding 3000"),
        (80, {}, "INVALID_PORT", "1024-65535"),
        (8000, {"mode": "udp"}, "INVALID_REQUEST", "mode"),
        (8000, {"path": "health"}, "INVALID_REQUEST", "path"),
        (8000, {"statusMin": 400, "statusMax": 200}, "INVALID_REQUEST", "statusMin"),
        (8000, {"statusMax": 600}, "INVALID_REQUEST", "statusMax"),
        (8000, {"timeout": 0}, "INVALID_REQUEST", "timeout"),
        (8000, {"timeout": 301}, "INVALID_REQUEST", "timeout"),
        (8000, {"interval": "fast"}, "INVALID_REQUEST", "interval"),
        (8000, {"colour": "red"}, "INVALID_REQUEST", "colour"),
    ],
)
async def test_bad_input_is_400_json(
    stack: Stack, port: int, body: dict[str, Any], code: str, words: str
) -> None:
    await stack.agent("sb1")
    r = await stack.admin.post(wait_path(port), json=body)
    assert r.status_code == 400, r.text
    assert r.json()["code"] == code
    assert words in r.json()["error"]


async def test_bad_json_and_method(stack: Stack) -> None:
    r = await stack.admin.post(wait_path(8000), content=b"{nope")
    assert r.status_code == 400 and r.json()["code"] == "INVALID_JSON"
    r = await stack.admin.get(wait_path(8000))
    assert r.status_code == 405 and r.headers["allow"] == "POST"


async def test_no_agent_is_503(stack: Stack) -> None:
    r = await stack.admin.post(wait_path(8000, "nobody"), json={})
    assert r.status_code == 503
    assert r.json()["code"] == "SANDBOX_NOT_CONNECTED"


async def test_agent_leaving_mid_wait_is_503_not_a_hang(
    stack: Stack, reserved: socket.socket
) -> None:
    agent = await stack.agent("sb1")
    call = asyncio.ensure_future(
        stack.admin.post(wait_path(reserved.getsockname()[1]), json={"timeout": 120})
    )
    await wait_until(lambda: agent.port_watches.active == 1, what="the agent's watch")
    session = agent.session
    assert session is not None and session.transport is not None
    session.transport.abort()  # the link drops (the agent will reconnect; the wait must not)
    r = await asyncio.wait_for(call, 10)
    assert r.status_code == 503
    assert r.json()["code"] == "SANDBOX_NOT_CONNECTED"
    assert "disconnected while waiting" in r.json()["error"]
    # The agent dropped its probe loop with the session: nothing leaks.
    await wait_until(lambda: agent.port_watches.active == 0, what="the watch to stop")


async def test_an_agent_without_watch_port_is_told_to_upgrade(stack: Stack) -> None:
    await stack.agent("sb1")
    assert stack.edge is not None
    state = stack.edge.registry.get("sb1")
    assert state is not None and state.session is not None
    state.session.agent_version = 1  # what an agent from before watch_port says in its hello
    r = await stack.admin.post(wait_path(8000), json={})
    assert r.status_code == 501
    assert r.json()["code"] == "AGENT_TOO_OLD"


async def test_the_agents_watch_limit_is_429(stack: Stack) -> None:
    agent = await stack.agent("sb1")
    agent.port_watches.limit = 0
    r = await stack.admin.post(wait_path(8000), json={})
    assert r.status_code == 429
    assert r.json()["code"] == "TOO_MANY_WATCHES"


# -- the SDK -------------------------------------------------------------------------------------


def sdk(stack: Stack) -> TunnelClient:
    assert stack.edge is not None
    return TunnelClient(f"http://127.0.0.1:{stack.edge.admin_port}", token=stack.admin_token)


async def test_sdk_wait_for_port_and_its_alias(stack: Stack, reserved: socket.socket) -> None:
    await stack.agent("sb1")
    port = reserved.getsockname()[1]
    server = await Health(failures=1).serve(reserved)
    try:
        async with sdk(stack) as client:
            sb = client.sandbox("sb1")
            await sb.wait_for_port(port, path="/health", interval=0.1, timeout=10)
            assert len(server.requests) == 2
            await sb.waitForPort(port, mode="tcp")
            await sb.wait_for_port(port, path="/health", status=200)
    finally:
        await server.close()


async def test_sdk_timeout_raises_port_not_ready_with_the_last_status(
    stack: Stack, reserved: socket.socket
) -> None:
    await stack.agent("sb1")
    port = reserved.getsockname()[1]
    server = await Health(failures=1000).serve(reserved)
    try:
        async with sdk(stack) as client:
            with pytest.raises(PortNotReadyError) as exc:
                await client.sandbox("sb1").wait_for_port(
                    port, path="/health", interval=0.1, timeout=0.5
                )
    finally:
        await server.close()
    assert exc.value.last_status == 503
    assert exc.value.status == 504 and exc.value.code == "PORT_NOT_READY"
    assert isinstance(exc.value, TimeoutError)


async def test_sdk_expose_port_waits_first(stack: Stack, reserved: socket.socket) -> None:
    agent = await stack.agent("sb1")
    port = reserved.getsockname()[1]
    async with sdk(stack) as client:
        sb = client.sandbox("sb1")
        # Not ready: nothing is exposed.
        with pytest.raises(PortNotReadyError) as exc:
            await sb.expose_port(port, wait={"mode": "tcp", "timeout": 0.3})
        assert exc.value.last_status is None
        assert await sb.get_exposed_ports() == []
        # Ready once the service listens: exposed after the wait.
        call = asyncio.ensure_future(sb.expose_port(port, name="api", wait=10))
        await wait_until(lambda: agent.port_watches.active == 1, what="the agent's watch")
        server = await Health(failures=0, path=b"/").serve(reserved)  # wait=10: GET / 2xx
        try:
            exposed = await asyncio.wait_for(call, 20)
        finally:
            await server.close()
        assert exposed.port == port and exposed.name == "api"
        assert [p.port for p in await sb.get_exposed_ports()] == [port]


async def test_sdk_errors(stack: Stack) -> None:
    async with sdk(stack) as client:
        sb = client.sandbox("sb1")
        with pytest.raises(SandboxNotConnectedError):
            await sb.wait_for_port(8000)
        with pytest.raises(InvalidPortError):
            await sb.wait_for_port(3000)
        for kwargs in (
            {"mode": "udp"},
            {"path": "health"},
            {"status": (400, 200)},
            {"status": "200"},
            {"timeout": 0},
            {"timeout": 301},
            {"interval": -1},
        ):
            with pytest.raises(ValidationError):
                await sb.wait_for_port(8000, **kwargs)
        with pytest.raises(ValidationError):
            await sb.expose_port(8000, wait="yes")  # type: ignore[arg-type]
        with pytest.raises(TunnelError):
            await sb.expose_port(8000, wait=True)  # no agent: nothing exposed either
        assert await sb.get_exposed_ports() == []
