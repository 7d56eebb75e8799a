"""The agent's control API port, exposed through the admin API of a cluster: what the client
sees, and that the exposure ends up on no node and not in Redis.

- Exposed while the sandbox is offline (through any node): 200 and stored, as no node can ask
  the agent; when the agent connects (to another node), its welcome lists the port, and the agent
  unexposes it, so every node drops it and Redis no longer has it.
- Exposed through a node that does not hold the agent's session: that node answers 200 with a
  preview URL (the cluster has no forwarded expose to wait on the agent's answer); the owner
  node's agent refuses the expose, the owner removes it, and from then on no node lists it and
  its URL is a 404 on every node (tests/cluster/test_api_port_expose_cluster.py has the store).
"""

from __future__ import annotations

import asyncio

import pytest

from agent.core import Agent, AgentConfig
from tunneld.auth import agent_token

from .nodes import Cluster, Node, wait_for

pytestmark = pytest.mark.anyio


async def _listed(node: Node) -> list[int]:
    r = await node.admin.get("/v1/sandboxes/sb1/ports")
    assert r.status_code == 200, r.text
    return [p["port"] for p in r.json()["ports"]]


async def test_an_api_port_exposed_while_offline_is_removed_when_the_agent_connects(
    cluster: Cluster,
) -> None:
    node_a, node_b = [await cluster.node(name) for name in ("node-a", "node-b")]
    agent = Agent(
        AgentConfig("127.0.0.1", node_b.edge.agent_port, "sb1", agent_token(cluster.secret, "sb1"))
    )
    api = await agent.serve_local_api("127.0.0.1", 0)  # bound before it connects, as `run` does
    try:
        offline = await node_a.admin.post("/v1/sandboxes/sb1/ports", json={"port": api.port})
        assert offline.status_code == 200, offline.text  # no node can know the port yet
        r = await node_a.admin.post("/v1/sandboxes/sb1/ports", json={"port": 8000})
        assert r.status_code == 200, r.text
        for node in (node_a, node_b):
            await wait_for(
                lambda n=node: len(n.records()) == 2, what="both exposures on every node"
            )

        task = asyncio.get_running_loop().create_task(agent.run())
        cluster.agents.append((agent, task))
        await asyncio.wait_for(agent.connected_event.wait(), 10)
        for node in (node_a, node_b):
            await wait_for(
                lambda n=node: [r.port for r in n.records()] == [8000],
                what=f"port {api.port} removed on every node",
            )
            assert await _listed(node) == [8000]
        stored = await node_a.store.load_all()
        assert [(r.sandbox_id, r.port) for r in stored] == [("sb1", 8000)]
        assert agent.exposures == {8000}
        async with node_a.public(offline.json()["exposedAt"]) as public:
            gone = await public.get("/v1/ports")
        assert gone.status_code == 404, gone.text
    finally:
        await api.close()


async def test_through_another_node_the_client_gets_200_then_no_node_lists_it(
    cluster: Cluster,
) -> None:
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
        # ... which node-b's agent refuses at once: node-b removes the exposure, everywhere.
        for node in (node_a, node_b):
            await wait_for(lambda n=node: n.records() == [], what="the exposure removed")
            assert await _listed(node) == []
            async with node.public(url) as public:
                gone = await public.get("/")
            assert gone.status_code == 404, gone.text
        assert await node_a.store.load_all() == []
        assert api.port not in agent.exposures
        # Removing it again is the usual idempotent 204.
        r = await node_a.admin.delete(f"/v1/sandboxes/sb1/ports/{api.port}")
        assert r.status_code == 204, r.text
    finally:
        await api.close()
