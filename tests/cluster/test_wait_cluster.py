"""Waiting for a port (``POST /v1/sandboxes/{id}/ports/{port}/wait``, the SDK's
``wait_for_port`` / ``expose_port(wait=...)``) sent to a node that does not hold the sandbox's
agent: the landing node forwards the wait over its node link to the owner node
(tunneld/waitfwd.py), and answers as the owner would: 200 ready, 504 PORT_NOT_READY with the last
status, 503 when the agent leaves, 502 NODE_UNREACHABLE when the owner cannot be reached or goes
away mid-wait; a client that leaves stops the agent's probes across the hop.

Two in-process nodes on a real redis-server; services are real listeners the agent probes."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import httpx
import pytest

from agent.core import Agent
from tests.e2e.test_wait_cancel import INTERVAL_MS, QUIET_INTERVALS, CountingService
from tests.e2e.test_wait_port import Health
from tunneld.client import PortNotReadyError, TunnelClient
from tunneld.nodelink import NodeLinkClient

from .nodes import Cluster, Node, wait_for

pytestmark = pytest.mark.anyio


@pytest.fixture
async def service() -> AsyncIterator[CountingService]:
    s = await CountingService().start()
    try:
        yield s
    finally:
        await s.close()


async def _two_nodes_agent_on_b(cluster: Cluster) -> tuple[Node, Node]:
    a = await cluster.node("node-a")
    b = await cluster.node("node-b")
    await cluster.agent(b, "sb1")
    await wait_for(
        lambda: (
            a.edge.cluster is not None and a.edge.cluster.owners.get("sb1", ("",))[0] == "node-b"
        ),
        what="node-a to see node-b own sb1",
    )
    state = a.edge.registry.get("sb1")
    assert state is None or state.session is None  # A holds no session: the wait must hop
    return a, b


def _agent(cluster: Cluster) -> Agent:
    return cluster.agents[0][0]


def _path(port: int, sandbox: str = "sb1") -> str:
    return f"/v1/sandboxes/{sandbox}/ports/{port}/wait"


def _link(a: Node) -> NodeLinkClient:
    assert a.edge.cluster is not None
    return a.edge.cluster.links["node-b"].result()


def _cut_links(b: Node) -> None:
    """Every node link into B drops at once, and no new one can be made (B's link port is
    closed): to A, exactly what a killed node looks like."""
    cluster = b.edge.cluster
    assert cluster is not None and cluster._listener is not None
    cluster._listener.close()
    for link in list(cluster.server_links):
        assert link.transport is not None
        link.transport.abort()


async def test_a_wait_sent_to_another_node_returns_once_the_port_is_ready(
    cluster: Cluster, reserved: socket.socket
) -> None:
    a, _b = await _two_nodes_agent_on_b(cluster)
    agent = _agent(cluster)
    port = reserved.getsockname()[1]
    body = {"path": "/health", "interval": 100, "timeout": 20}
    call = asyncio.ensure_future(a.admin.post(_path(port), json=body))
    await wait_for(lambda: agent.port_watches.active == 1, what="the agent's watch")
    assert not call.done()
    server = await Health(failures=2).serve(reserved)  # the service starts after a delay
    try:
        r = await asyncio.wait_for(call, 20)
    finally:
        await server.close()
    assert r.status_code == 200, r.text
    assert r.json() == {"port": port, "ready": True}
    assert server.requests == [b"GET /health HTTP/1.1"] * 3
    await wait_for(lambda: agent.port_watches.active == 0, what="the watch to end")


async def test_the_sdk_waits_and_exposes_through_another_node(
    cluster: Cluster, reserved: socket.socket
) -> None:
    a, b = await _two_nodes_agent_on_b(cluster)
    port = reserved.getsockname()[1]
    async with TunnelClient(
        f"http://127.0.0.1:{a.edge.admin_port}", token=cluster.admin_token, timeout=10
    ) as client:
        sb = client.sandbox("sb1")
        with pytest.raises(PortNotReadyError) as exc:
            await sb.expose_port(port, wait={"mode": "tcp", "timeout": 0.3})
        assert exc.value.last_status is None and exc.value.status == 504
        assert await sb.get_exposed_ports() == []  # not ready: nothing exposed
        server = await Health(failures=0, path=b"/").serve(reserved)
        try:
            await sb.wait_for_port(port, mode="tcp", timeout=10)
            exposed = await sb.expose_port(port, name="api", wait=10)
        finally:
            await server.close()
        assert exposed.port == port
    await wait_for(lambda: b.edge.registry.exposures("sb1"), what="the exposure on B")


async def test_a_timeout_is_504_with_the_last_status_across_nodes(
    cluster: Cluster, reserved: socket.socket
) -> None:
    a, _b = await _two_nodes_agent_on_b(cluster)
    port = reserved.getsockname()[1]
    server = await Health(failures=1000).serve(reserved)
    try:
        body = {"path": "/health", "interval": 100, "timeout": 0.5}
        r = await a.admin.post(_path(port), json=body)
    finally:
        await server.close()
    assert r.status_code == 504, r.text
    data = r.json()
    assert data["code"] == "PORT_NOT_READY"
    assert data["port"] == port and data["lastStatus"] == 503
    assert "HTTP 503" in data["error"]


async def test_bad_input_and_refusals_keep_their_status_across_nodes(
    cluster: Cluster, reserved: socket.socket
) -> None:
    a, _b = await _two_nodes_agent_on_b(cluster)
    r = await a.admin.post(_path(8000), json={"statusMin": 400, "statusMax": 200})
    assert r.status_code == 400 and r.json()["code"] == "INVALID_REQUEST"  # checked on A
    agent = _agent(cluster)
    agent.port_watches.limit = 0
    r = await a.admin.post(_path(reserved.getsockname()[1]), json={})
    assert r.status_code == 429 and r.json()["code"] == "TOO_MANY_WATCHES"  # the agent's, on B
    r = await a.admin.post(_path(8000, "nobody"), json={})
    assert r.status_code == 503 and r.json()["code"] == "SANDBOX_NOT_CONNECTED"


async def test_the_agent_leaving_mid_wait_is_503_across_nodes(
    cluster: Cluster, reserved: socket.socket
) -> None:
    a, b = await _two_nodes_agent_on_b(cluster)
    agent = _agent(cluster)
    call = asyncio.ensure_future(
        a.admin.post(_path(reserved.getsockname()[1]), json={"timeout": 120})
    )
    await wait_for(lambda: agent.port_watches.active == 1, what="the agent's watch")
    state = b.edge.registry.get("sb1")
    assert state is not None and state.session is not None and state.session.transport
    state.session.transport.abort()  # the agent's connection to B drops
    r = await asyncio.wait_for(call, 10)
    assert r.status_code == 503, r.text
    assert r.json()["code"] == "SANDBOX_NOT_CONNECTED"
    assert "disconnected while waiting" in r.json()["error"]


async def test_the_owner_killed_mid_wait_is_502_not_a_hang(
    cluster: Cluster, reserved: socket.socket
) -> None:
    a, b = await _two_nodes_agent_on_b(cluster)
    agent = _agent(cluster)
    call = asyncio.ensure_future(
        a.admin.post(_path(reserved.getsockname()[1]), json={"timeout": 120})
    )
    await wait_for(lambda: agent.port_watches.active == 1, what="the agent's watch")
    _cut_links(b)
    state = b.edge.registry.get("sb1")
    assert state is not None and state.session is not None and state.session.transport
    state.session.transport.abort()  # the owner's sockets all go, as when it is killed
    r = await asyncio.wait_for(call, 10)  # the wait's own timeout is 120 s
    assert r.status_code == 502, r.text
    assert r.json()["code"] == "NODE_UNREACHABLE" and "node-b" in r.json()["error"]


async def test_a_cut_link_fails_the_wait_and_stops_the_probes_on_the_owner(
    cluster: Cluster, service: CountingService
) -> None:
    """Only the node link drops (the agent stays connected to B): A answers 502 at once, and
    B, with nobody left to answer, stops the wait it served, so the agent stops probing."""
    a, b = await _two_nodes_agent_on_b(cluster)
    agent = _agent(cluster)
    body = {"interval": INTERVAL_MS, "timeout": 120}
    call = asyncio.ensure_future(a.admin.post(_path(service.port), json=body))
    await wait_for(lambda: service.connections >= 2, what="the agent's probes")
    _cut_links(b)
    r = await asyncio.wait_for(call, 10)
    assert r.status_code == 502 and r.json()["code"] == "NODE_UNREACHABLE"
    await wait_for(lambda: agent.port_watches.active == 0, timeout=5, what="the watch to stop")
    before = service.connections
    await asyncio.sleep(QUIET_INTERVALS * INTERVAL_MS / 1000)
    assert service.connections == before
    state = b.edge.registry.get("sb1")
    assert state is not None and state.session is not None  # the agent itself is still there


async def test_an_unreachable_owner_is_a_quick_502(cluster: Cluster) -> None:
    a, b = await _two_nodes_agent_on_b(cluster)
    _cut_links(b)
    r = await a.admin.post(_path(8000), json={"timeout": 120})
    assert r.status_code == 502, r.text
    assert r.json()["code"] == "NODE_UNREACHABLE" and "node-b" in r.json()["error"]


async def test_the_client_leaving_stops_the_probes_across_nodes(
    cluster: Cluster, service: CountingService
) -> None:
    a, b = await _two_nodes_agent_on_b(cluster)
    agent = _agent(cluster)
    client = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{a.edge.admin_port}",
        headers={"authorization": f"Bearer {cluster.admin_token}"},
        timeout=30,
    )
    body = {"interval": INTERVAL_MS, "timeout": 120}
    call = asyncio.ensure_future(client.post(_path(service.port), json=body))
    await wait_for(lambda: service.connections >= 2, what="the agent's probes")
    call.cancel()  # the orchestrator gives up: httpx closes the connection
    await asyncio.gather(call, return_exceptions=True)
    await client.aclose()
    await wait_for(lambda: agent.port_watches.active == 0, timeout=5, what="the watch to stop")
    before = service.connections
    await asyncio.sleep(QUIET_INTERVALS * INTERVAL_MS / 1000)
    assert service.connections == before
    # B forgot the forwarded wait, A its link request; the link is still up and usable.
    link = _link(a)
    assert link.usable()
    await wait_for(
        lambda: all(not s.served_waits for s in b.edge.cluster.server_links),  # type: ignore[union-attr]
        what="B to forget the wait",
    )
    r = await a.admin.post(_path(service.port), json={"interval": 100, "timeout": 0.3})
    assert r.status_code == 504 and r.json()["lastStatus"] == 503


async def test_an_owner_from_before_forwarded_waits_is_not_asked(
    cluster: Cluster, reserved: socket.socket
) -> None:
    """An owner whose link welcome does not say it serves waits would drop the link at the
    unknown field: it is not asked, and the client gets 501 NODE_TOO_OLD."""
    a, _b = await _two_nodes_agent_on_b(cluster)
    port = reserved.getsockname()[1]
    r = await a.admin.post(_path(port), json={"mode": "tcp", "timeout": 0.2})
    assert r.status_code == 504  # the link is up (and nothing listens on the port)
    link = _link(a)
    link.peer_version = 1  # what an older node's welcome says (no limits at all)
    r = await a.admin.post(_path(port), json={"timeout": 0.2})
    assert r.status_code == 501 and r.json()["code"] == "NODE_TOO_OLD"
    assert link.usable()


async def test_an_owner_that_never_answers_is_504_node_timeout(
    cluster: Cluster, reserved: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bounded even when the owner keeps the link up but never answers: timeout +
    control_timeout + LINK_TIMEOUT, then 504 NODE_TIMEOUT."""
    import tunneld.waitfwd

    a, _b = await _two_nodes_agent_on_b(cluster)
    asked: list[int] = []
    monkeypatch.setattr(tunneld.waitfwd, "serve_wait", lambda link, message: asked.append(1))
    r = await asyncio.wait_for(
        a.admin.post(_path(reserved.getsockname()[1]), json={"timeout": 0.2}), 30
    )
    assert asked == [1]
    assert r.status_code == 504, r.text
    assert r.json()["code"] == "NODE_TIMEOUT" and "node-b" in r.json()["error"]


async def test_the_owner_bounds_the_waits_it_serves_for_a_link(
    cluster: Cluster, service: CountingService, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tunneld.waitfwd

    a, _b = await _two_nodes_agent_on_b(cluster)
    monkeypatch.setattr(tunneld.waitfwd, "MAX_SERVED_WAITS", 1)
    body = {"interval": INTERVAL_MS, "timeout": 3}
    first = asyncio.ensure_future(a.admin.post(_path(service.port), json=body))
    await wait_for(lambda: service.connections >= 1, what="the first wait's probes")
    r = await a.admin.post(_path(service.port), json=body)
    assert r.status_code == 429 and r.json()["code"] == "TOO_MANY_WATCHES"
    assert "node-b serves too many waits" in r.json()["error"]
    assert (await asyncio.wait_for(first, 20)).status_code == 504  # the first one went on
