"""In-process cluster nodes for the tests: EdgeServers on one real Redis, agents, origins."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable

import httpx

from agent.core import Agent, AgentConfig
from tests.e2e.origin import Origin
from tunneld.auth import agent_token
from tunneld.config import Config
from tunneld.edge import EdgeServer
from tunneld.redis_store import RedisStore

from .conftest import RedisServer


async def wait_for(predicate: Callable[[], object], timeout: float = 10, what: str = "it") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


async def exposed_through_b(a: Node, b: Node, port: int) -> str:
    """``port`` of sb1, whose agent is on B, exposed through B, its owner (through A it would be
    forwarded on a node link: tunneld/exposefwd.py); its preview URL once A knows the owner and
    sees the exposure."""
    r = await b.admin.post("/v1/sandboxes/sb1/ports", json={"port": port})
    assert r.status_code == 200, r.text
    await wait_for(lambda: a.edge.cluster.owners.get("sb1", ("",))[0] == "node-b", what="owner")
    await wait_for(lambda: a.edge.registry.exposures("sb1"), what="A to see the exposure")
    return str(r.json()["exposedAt"])


class Node:
    def __init__(self, edge: EdgeServer, admin_token: str) -> None:
        self.edge = edge
        self.store: RedisStore = edge.registry.store  # type: ignore[assignment]
        self.admin = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{edge.admin_port}",
            headers={"authorization": f"Bearer {admin_token}"},
            timeout=30,
        )

    def public(self, url: str) -> httpx.AsyncClient:
        host = url.split("//", 1)[1].split("/", 1)[0]
        return httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.edge.public_port}", headers={"host": host}, timeout=10
        )

    def records(self) -> list:
        return self.edge.registry.records()


class Cluster:
    def __init__(self, redis: RedisServer) -> None:
        self.redis = redis
        self.admin_token = secrets.token_urlsafe(12)
        self.secret = secrets.token_urlsafe(12)
        self.nodes: list[Node] = []
        self.agents: list[tuple[Agent, asyncio.Task[None]]] = []
        self.origins: list[Origin] = []

    async def node(self, name: str, url: str | None = None, **settings: object) -> Node:
        config = Config(
            public_port=0,
            agent_port=0,
            admin_port=0,
            node_port=0,
            admin_token=self.admin_token,
            secret=self.secret,
            grace_period=0.2,
            # nodes of one process share a host: the hand-over would be taken instead of the
            # node link, which these tests are about (tests/cluster/test_handover.py sets it)
            **{"handover": False, "control_timeout": 2.0, **settings},  # type: ignore[arg-type]
        )
        store = RedisStore(url or self.redis.url, node_id=name, ping_interval=0.2)
        edge = EdgeServer(config, asyncio.get_running_loop(), store)
        await edge.start()
        node = Node(edge, self.admin_token)
        self.nodes.append(node)
        await wait_for(lambda: store.resyncs >= 1, what=f"{name}'s feed")
        return node

    async def agent(self, node: Node, sandbox_id: str, **options: object) -> Agent:
        token = agent_token(self.secret, sandbox_id)
        agent = Agent(
            AgentConfig(
                "127.0.0.1",
                node.edge.agent_port,
                sandbox_id,
                token,
                **options,  # type: ignore[arg-type]
            )
        )
        task = asyncio.get_running_loop().create_task(agent.run())
        self.agents.append((agent, task))
        await asyncio.wait_for(agent.connected_event.wait(), 10)
        return agent

    async def origin(self) -> Origin:
        origin = await Origin().start()
        self.origins.append(origin)
        return origin

    async def close(self) -> None:
        agents, nodes, origins = self.agents, self.nodes, self.origins
        self.agents, self.nodes, self.origins = [], [], []
        for agent, task in agents:
            await agent.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for node in nodes:
            await node.admin.aclose()
            await node.edge.stop(grace=0.2)
        for origin in origins:
            await origin.close()
