"""In a cluster, an expose made through another node than the one holding the agent's session:
that node forwards it over its node link to the owner node (tunneld/exposefwd.py), whose agent
gives the verdict, so the answer is the owner's: the agent's control API port is 400
INVALID_PORT with nothing stored on any node (as on a single node:
tests/faults/test_agent_api_port_admin_expose.py), any other port 200 and served. When the
owner cannot give the verdict (a node from before forwarded exposes, no answer in time) the
landing node answers 200 and stores it as before, and the owner, whose agent refuses it,
removes it from the shared store, so no node lists it and its URL is a 404 on every node.
Exposed while the agent is offline: tests/cluster/test_api_port_offline_cluster.py."""

from __future__ import annotations

import pytest

from protocol import control
from tunneld import exposefwd, nodelink

from .nodes import Cluster, Node, wait_for

pytestmark = pytest.mark.anyio


async def _listed(node: Node) -> list[int]:
    r = await node.admin.get("/v1/sandboxes/sb1/ports")
    assert r.status_code == 200, r.text
    return [p["port"] for p in r.json()["ports"]]


async def _agent_on_b(cluster: Cluster) -> tuple[Node, Node]:
    node_a, node_b = [await cluster.node(name) for name in ("node-a", "node-b")]
    await cluster.agent(node_b, "sb1")
    await wait_for(
        lambda: node_a.edge.cluster.owners.get("sb1", ("",))[0] == "node-b",
        what="node-a to see node-b own sb1",
    )
    assert node_a.edge.registry.get("sb1") is None  # node-a holds no session: it must ask
    return node_a, node_b


async def test_an_api_port_exposed_through_another_node_is_refused_there(
    cluster: Cluster,
) -> None:
    node_a, node_b = await _agent_on_b(cluster)
    agent = cluster.agents[0][0]
    api = await agent.serve_local_api("127.0.0.1", 0)
    try:
        r = await node_a.admin.post("/v1/sandboxes/sb1/ports", json={"port": api.port})
        assert r.status_code == 400, r.text
        assert r.json()["code"] == "INVALID_PORT"
        assert f"Port {api.port} is not exposed." in r.json()["error"]
        assert await node_a.store.load_all() == []
        assert await node_b.store.caught_up(5) and await node_a.store.caught_up(5)
        for node in (node_a, node_b):
            assert node.records() == []
            assert await _listed(node) == []
        assert api.port not in agent.exposures

        # Another port goes the same way and is accepted: 200, stored, served.
        r = await node_a.admin.post(
            "/v1/sandboxes/sb1/ports", json={"port": 8000, "name": "web", "inspect": True}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["port"] == 8000 and body["name"] == "web" and body["inspect"] is True
        assert body["exposedAt"].startswith("http://8000-sb1-")
        stored = await node_a.store.load_all()
        assert [(s.sandbox_id, s.port) for s in stored] == [("sb1", 8000)]
        assert [x.port for x in node_a.records()] == [8000]  # answered once its view had it
        await wait_for(lambda: 8000 in agent.exposures, what="the agent to serve port 8000")
    finally:
        await api.close()


async def _old_behaviour(cluster: Cluster, node_a: Node, node_b: Node) -> None:
    """node-a answers 200 and stores the API port; node-b's agent refuses it and it goes."""
    agent = cluster.agents[0][0]
    api = await agent.serve_local_api("127.0.0.1", 0)
    try:
        r = await node_a.admin.post("/v1/sandboxes/sb1/ports", json={"port": api.port})
        assert r.status_code == 200, r.text
        url = r.json()["exposedAt"]
        assert url.startswith(f"http://{api.port}-sb1-")
        r = await node_a.admin.post("/v1/sandboxes/sb1/ports", json={"port": 8000})
        assert r.status_code == 200, r.text
        for node in (node_a, node_b):
            await wait_for(
                lambda n=node: [r.port for r in n.records()] == [8000],
                what="only port 8000 exposed",
            )
            assert await _listed(node) == [8000]
            async with node.public(url) as public:
                gone = await public.get("/")
            assert gone.status_code == 404, gone.text
        stored = await node_a.store.load_all()
        assert [(r.sandbox_id, r.port) for r in stored] == [("sb1", 8000)]
        await wait_for(lambda: 8000 in agent.exposures, what="the agent to serve port 8000")
        assert api.port not in agent.exposures
        r = await node_a.admin.delete(f"/v1/sandboxes/sb1/ports/{api.port}")
        assert r.status_code == 204, r.text
    finally:
        await api.close()


async def test_an_owner_from_before_forwarded_exposes_is_not_asked(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # node-b's welcome on the link says version 2: it would drop a link that sent it `expose`.
    monkeypatch.setattr(nodelink, "LINK_VERSION", nodelink.WAIT_LINK_VERSION)
    node_a, node_b = await _agent_on_b(cluster)
    asked: list[control.Expose] = []
    monkeypatch.setattr(exposefwd, "serve_expose", lambda link, message: asked.append(message))
    await _old_behaviour(cluster, node_a, node_b)
    assert asked == []
    assert node_a.edge.cluster.links["node-b"].result().usable()  # the link was kept


async def test_an_owner_that_does_not_answer_in_time_leaves_it_to_the_feed(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    node_a, node_b = await _agent_on_b(cluster)
    asked: list[control.Expose] = []
    monkeypatch.setattr(exposefwd, "serve_expose", lambda link, message: asked.append(message))
    monkeypatch.setattr(exposefwd, "reply_budget", lambda cluster: 0.3)
    await _old_behaviour(cluster, node_a, node_b)
    assert [m.sandbox for m in asked] == ["sb1", "sb1"]  # asked, never answered


async def test_a_node_runs_a_forwarded_expose_only_for_a_session_it_holds(
    cluster: Cluster,
) -> None:
    """A forwarded expose for a sandbox node-b holds no session of is refused there, with
    nothing stored: a node cannot use another to expose what that one would not."""
    node_a, node_b = await _agent_on_b(cluster)
    link, _epoch = await node_a.edge.cluster.route("sb1")
    request_id, future = link.waits.new()
    link.session.send_control(control.Expose(request_id, 8000, sandbox="sb2"))
    link.flush()
    reply = await future
    assert isinstance(reply, control.Error)
    assert (reply.code, reply.status_code) == ("SANDBOX_NOT_CONNECTED", 503)
    assert await node_a.store.load_all() == []
    assert node_b.records() == []
