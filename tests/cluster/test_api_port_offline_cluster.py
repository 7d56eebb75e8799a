"""The agent's control API port, exposed through the admin API of a cluster while the sandbox
is offline (through any node): 200 and stored, as no node can ask the agent; when the agent
connects (to another node), its welcome lists the port, and the agent unexposes it, so every
node drops it and Redis no longer has it. (No node holds a session, so none is asked: a node
forwards an expose only to the owner the feed names, tunneld/exposefwd.py.) Exposed through a
node that does not hold the agent's session (400 as on the owner; 200, then removed by the
owner, when the owner gives no verdict): tests/cluster/test_api_port_expose_cluster.py.
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
