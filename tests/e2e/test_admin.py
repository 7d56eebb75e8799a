"""Admin API and SDK against the real edge; exposures made from both sides are one set."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from agent.core import BACKOFF_FIRST
from agent.local_api import start_local_api
from tunneld.client import (
    AuthenticationError,
    ConflictError,
    ExposedPort,
    InvalidPortError,
    TunnelClient,
)

from .conftest import Stack, raw_request, wait_until

pytestmark = pytest.mark.anyio

PORT_MESSAGE = (
    "Invalid port number: {}. Must be 1024-65535, excluding 3000 (sandbox control plane)."
)


@pytest.mark.parametrize(
    "port, shown", [(80, "80"), (3000, "3000"), (70000, "70000"), ("8080", "8080")]
)
async def test_invalid_ports_get_the_exact_message(stack: Stack, port: object, shown: str) -> None:
    r = await stack.admin.post("/v1/sandboxes/sb1/ports", json={"port": port})
    assert r.status_code == 400
    assert r.json() == {"error": PORT_MESSAGE.format(shown), "code": "INVALID_PORT"}


async def test_admin_requires_token(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{stack.edge.admin_port}") as anon:
        for method, path in (
            ("GET", "/v1/sandboxes"),
            ("POST", "/v1/sandboxes/sb1/ports"),
            ("GET", "/metrics"),
        ):
            r = await anon.request(method, path, json={"port": 8000})
            assert r.status_code == 401, path
            assert r.json()["code"] == "UNAUTHORIZED"
            assert r.headers["www-authenticate"].startswith("Bearer")
        r = await anon.get("/v1/sandboxes", headers={"authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert (await anon.get("/healthz")).json() == {"status": "ok"}


async def test_admin_errors_are_json(stack: Stack) -> None:
    admin = stack.admin
    cases = [
        (admin.post("/v1/sandboxes/sb1/ports", content=b"{not json"), 400, "INVALID_JSON"),
        (admin.post("/v1/sandboxes/sb1/ports", json={"prot": 8000}), 400, "INVALID_REQUEST"),
        (admin.post("/v1/sandboxes/sb1/ports", json={}), 400, "INVALID_REQUEST"),
        (admin.post("/v1/sandboxes/Bad_Id/ports", json={"port": 8000}), 400, "INVALID_SANDBOX_ID"),
        (
            admin.post("/v1/sandboxes/sb1/ports", json={"port": 8000, "token": "UPPER"}),
            400,
            "INVALID_TOKEN_FORMAT",
        ),
        (admin.put("/v1/sandboxes/sb1/ports", json={"port": 8000}), 405, "METHOD_NOT_ALLOWED"),
        (admin.get("/v1/nothing"), 404, "NOT_FOUND"),
        (admin.delete("/v1/sandboxes/sb1/ports/80"), 400, "INVALID_PORT"),
        (admin.post("/v1/sandboxes/sb1/ports", content=b"x" * 70_000), 413, "BODY_TOO_LARGE"),
    ]
    for request, status, code in cases:
        r = await request
        assert r.status_code == status, (code, r.text)
        assert r.json()["code"].startswith(code), r.text
        assert r.json()["error"]


async def test_expose_offline_then_agent_gets_it_in_welcome(stack: Stack) -> None:
    r = await stack.admin.post("/v1/sandboxes/sb1/ports", json={"port": 8000, "name": "api"})
    assert r.status_code == 200
    url = r.json()["exposedAt"]
    agent = await stack.agent("sb1")
    assert agent.exposures == {8000}  # the agent keeps ports only; URLs come from the edge
    assert url.startswith("http://8000-sb1-")


async def test_token_conflict_is_409(stack: Stack) -> None:
    await stack.expose("sb1", 8000, token="shared")
    r = await stack.admin.post("/v1/sandboxes/sb1/ports", json={"port": 8001, "token": "shared"})
    assert r.status_code == 409
    assert r.json() == {
        "error": "Token 'shared' is already in use by port 8000. Please use a different token.",
        "code": "TOKEN_IN_USE",
    }


async def test_list_sandboxes_and_metrics(stack: Stack) -> None:
    await stack.agent("sb1")
    await stack.expose("sb1", 8000)
    await stack.expose("sb2", 8001)
    r = await stack.admin.get("/v1/sandboxes")
    sandboxes = {s["id"]: s for s in r.json()["sandboxes"]}
    assert sandboxes["sb1"]["connected"] is True
    assert sandboxes["sb2"]["connected"] is False
    assert [p["port"] for p in sandboxes["sb1"]["ports"]] == [8000]
    metrics = (await stack.admin.get("/metrics")).text
    assert "tunneld_agents_connected 1.0" in metrics
    assert "tunneld_exposures 2.0" in metrics


async def test_sdk_round_trip_against_real_edge(stack: Stack) -> None:
    agent = await stack.agent("sb1")
    async with TunnelClient(
        f"http://127.0.0.1:{stack.edge.admin_port}", stack.admin_token
    ) as client:
        sandbox = client.sandbox("sb1")
        p = await sandbox.expose_port(8001, name="web")
        assert isinstance(p, ExposedPort) and p.port == 8001 and p.name == "web"
        assert p.exposed_at.startswith("http://8001-sb1-")
        q = await sandbox.exposePort(8000, token="tok_1")
        assert q.url == f"http://8000-sb1-tok_1.localhost:{stack.edge.public_port}/"
        assert [e.port for e in await sandbox.get_exposed_ports()] == [8000, 8001]
        # the agent heard about both before expose returned
        assert set(agent.exposures) == {8000, 8001}
        with pytest.raises(InvalidPortError) as info:
            await sandbox.expose_port(3000)
        assert info.value.message == PORT_MESSAGE.format(3000)
        with pytest.raises(ConflictError):
            await sandbox.expose_port(8002, token="tok_1")
        await sandbox.unexpose_port(8001)
        await sandbox.unexpose_port(8001)  # idempotent
        assert [e.port for e in await sandbox.getExposedPorts()] == [8000]
        assert set(agent.exposures) == {8000}
    async with TunnelClient(f"http://127.0.0.1:{stack.edge.admin_port}", "nope") as bad:
        with pytest.raises(AuthenticationError):
            await bad.sandbox("sb1").get_exposed_ports()


async def test_agent_local_api_and_admin_agree(stack: Stack) -> None:
    agent = await stack.agent("sb1")
    api = await start_local_api(agent, "127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.port}") as local:
            r = await local.post("/v1/ports", json={"port": 8000, "name": "from-inside"})
            assert r.status_code == 200, r.text
            inside_url = r.json()["exposedAt"]
            r = await local.post("/api/expose-port", json={"port": 8001, "name": "legacy"})
            assert r.status_code == 200 and r.json()["success"] is True
            await stack.expose("sb1", 8002, name="from-outside")
            admin_view = (await stack.admin.get("/v1/sandboxes/sb1/ports")).json()["ports"]
            local_view = (await local.get("/v1/ports")).json()["ports"]
            assert admin_view == local_view
            assert [p["port"] for p in admin_view] == [8000, 8001, 8002]
            assert admin_view[0] == {"port": 8000, "exposedAt": inside_url, "name": "from-inside"}
            r = await local.delete("/api/exposed-ports/8001")
            assert r.status_code == 200
            await stack.admin.delete("/v1/sandboxes/sb1/ports/8000")
            admin_view = (await stack.admin.get("/v1/sandboxes/sb1/ports")).json()["ports"]
            local_view = (await local.get("/v1/ports")).json()["ports"]
            assert (
                admin_view
                == local_view
                == [{"port": 8002, "exposedAt": admin_view[0]["exposedAt"], "name": "from-outside"}]
            )
            r = await local.post("/v1/ports", json={"port": 3000})
            assert r.status_code == 400
            assert r.json()["error"] == PORT_MESSAGE.format(3000)
    finally:
        await api.close()


async def test_reconnect_keeps_urls(stack: Stack) -> None:
    origin = await stack.origin()
    agent = await stack.agent("sb1")
    exposed = await stack.expose("sb1", origin.port)
    metrics = (await stack.admin.get("/metrics")).text
    assert "tunneld_agent_reconnects_total 0.0" in metrics  # the first session is no reconnect
    old_session = stack.edge.registry.get("sb1").session
    old_session.transport.abort()  # an unclean loss of the tunnel connection

    def reconnected() -> bool:
        state = stack.edge.registry.get("sb1")
        return state.session is not None and state.session is not old_session and agent.connected

    await wait_until(reconnected, 10, "the agent to reconnect")
    metrics = (await stack.admin.get("/metrics")).text
    assert "tunneld_agent_reconnects_total 1.0" in metrics
    ports = (await stack.admin.get("/v1/sandboxes/sb1/ports")).json()["ports"]
    assert [p["exposedAt"] for p in ports] == [exposed["exposedAt"]]
    # the same URL reaches the service through the new session
    async with stack.client(exposed["exposedAt"]) as client:
        r = await client.get("/")
    assert r.status_code == 200 and r.content == b"hello from origin"


async def test_new_session_replaces_old_one(stack: Stack) -> None:
    """A replaced agent stays away: it must not dial again and take the session back (flapping)."""
    origin = await stack.origin()
    first = await stack.agent("sb1")
    dialled = 0
    connect_once = first.connect_once

    async def counting_connect_once(*args: object) -> object:
        nonlocal dialled
        dialled += 1
        return await connect_once(*args)  # type: ignore[arg-type]

    first.connect_once = counting_connect_once  # type: ignore[method-assign]
    second = await stack.agent("sb1")
    await wait_until(lambda: not first.connected, 5, "the first agent to be replaced")
    current = stack.edge.registry.get("sb1").session
    assert current.session_id == second.session_id
    # Watch for many times the quickest retry: neither a new dial nor a session change.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(2.0, 20 * BACKOFF_FIRST)
    while loop.time() < deadline:
        assert dialled == 0, "the replaced agent dialled the edge again"
        assert stack.edge.registry.get("sb1").session is current
        assert second.connected and not first.connected
        await asyncio.sleep(0.02)
    exposed = await stack.expose("sb1", origin.port)
    async with stack.client(exposed["exposedAt"]) as client:
        assert (await client.get("/")).status_code == 200


async def test_agent_token_is_bound_to_its_sandbox(stack: Stack) -> None:
    from agent.core import Agent, AgentConfig
    from tunneld.auth import agent_token

    await stack.expose("sb2", 8000)
    # sb1's valid token cannot claim sandbox sb2
    thief = Agent(
        AgentConfig("127.0.0.1", stack.edge.agent_port, "sb2", agent_token(stack.secret, "sb1"))
    )
    with pytest.raises(ConnectionError):
        await thief.connect_once()
    assert thief.last_refusal is not None and thief.last_refusal[0] == "AUTH_FAILED"
    assert stack.edge.registry.get("sb2").session is None
    r = await stack.admin.get("/metrics")
    assert "tunneld_agent_auth_failures_total 1.0" in r.text


async def test_readyz_says_ready_only_between_start_and_stop(stack: Stack) -> None:
    """No token needed (a load balancer's probe); 503 with the reason before start() finished
    and from the moment stop() begins (draining), while /healthz stays 200."""
    from tunneld.admin import AdminServer
    from tunneld.edge import EdgeServer

    r = await stack.admin.get("/readyz", headers={"authorization": ""})
    assert (r.status_code, r.json()) == (200, {"status": "ready"})
    not_started = EdgeServer(stack.edge.config, asyncio.get_running_loop())
    starting = AdminServer(not_started)._readiness()
    assert starting.status == 503 and b"starting" in starting.body
    origin = await stack.origin()
    await stack.agent("sb1")
    exposed = await stack.expose("sb1", origin.port)
    async with stack.client(exposed["exposedAt"]) as client:
        async with client.stream("GET", "/sse") as sse:  # a live stream: stop() drains it
            assert sse.status_code == 200
            stopping = asyncio.get_running_loop().create_task(stack.edge.stop(grace=3))
            await wait_until(lambda: stack.edge.draining, 5, "the drain to begin")
            r = await stack.admin.get("/readyz")  # the kept-alive admin connection
            assert r.status_code == 503
            assert r.json()["status"] == "not ready" and "draining" in r.json()["reasons"][0]
            assert (await stack.admin.get("/healthz")).status_code == 200
            origin.sse_release.set()
        await stopping


async def test_metrics_count_refusals_sessions_store_writes_and_open_connections(
    stack: Stack,
) -> None:
    def value(text: str, name: str) -> float:
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        raise AssertionError(f"{name} not in the metrics")

    origin = await stack.origin()
    agent = await stack.agent("sb1")
    exposed = await stack.expose("sb1", origin.port)
    host = stack.host_of(exposed["exposedAt"])
    bad = host.replace("-sb1-", "-sb1-x", 1)
    for _ in range(3):
        answer = await raw_request(
            stack.edge.public_port, f"GET / HTTP/1.1\r\nHost: {bad}\r\n\r\n".encode()
        )
        assert answer.startswith(b"HTTP/1.1 404 ")
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
    await wait_until(lambda: len(stack.edge.public_connections) == 1, 5, "the connection")
    text = (await stack.admin.get("/metrics")).text
    assert value(text, 'tunneld_public_refusals_total{code="INVALID_TOKEN"}') == 3
    assert value(text, "tunneld_public_connections_open") == 1
    assert value(text, "tunneld_store_write_seconds_count") == 1  # the expose
    assert value(text, "tunneld_agent_session_seconds_count") == 0
    writer.close()
    await agent.stop()
    await wait_until(lambda: stack.edge.registry.get("sb1").session is None, 5, "the agent gone")
    text = (await stack.admin.get("/metrics")).text
    assert value(text, "tunneld_agent_session_seconds_count") == 1
    del reader
