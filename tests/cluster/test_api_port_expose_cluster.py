"""In a cluster, an expose of the agent's control API port made through another node than the
one holding the agent's session: that node answers before the agent is asked (it cannot know
the port), but the owner node, whose agent refuses the expose, removes the exposure from the
shared store, so it does not go on existing on any node: no node lists it and its URL is a 404
on every node (on a single node the admin API answers 400 INVALID_PORT instead:
tests/faults/test_agent_api_port_admin_expose.py; exposed while the agent is offline:
tests/cluster/test_api_port_offline_cluster.py)."""

from __future__ import annotations

import pytest

from .nodes import Cluster, Node, wait_for

pytestmark = pytest.mark.anyio


async def _listed(node: Node) -> list[int]:
    r = await node.admin.get("/v1/sandboxes/sb1/ports")
    assert r.status_code == 200, r.text
    return [p["port"] for p in r.json()["ports"]]


async def test_an_api_port_exposed_through_another_node_is_removed(cluster: Cluster) -> None:
    node_a, node_b = [await cluster.node(name) for name in ("node-a", "node-b")]
    agent = await cluster.agent(node_b, "sb1")
    api = await agent.serve_local_api("127.0.0.1", 0)
    try:
        await wait_for(
            lambda: node_a.edge.cluster.owners.get("sb1", ("",))[0] == "node-b",
            what="node-a to see node-b own sb1",
        )
        r = await node_a.admin.post("/v1/sandboxes/sb1/ports", json={"port": api.port})
        # What the client sees: node-a cannot ask the agent, so 200 and a preview URL ...
        assert r.status_code == 200, r.text
        url = r.json()["exposedAt"]
        assert url.startswith(f"http://{api.port}-sb1-")
        r = await node_a.admin.post("/v1/sandboxes/sb1/ports", json={"port": 8000})
        assert r.status_code == 200, r.text
        # ... which node-b's agent refuses at once: node-b removes the exposure, everywhere.
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
        # Removing it again is the usual idempotent 204.
        r = await node_a.admin.delete(f"/v1/sandboxes/sb1/ports/{api.port}")
        assert r.status_code == 204, r.text
    finally:
        await api.close()
