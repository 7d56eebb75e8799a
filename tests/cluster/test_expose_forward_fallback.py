"""A forwarded admin expose answered before the landing node's view has the owner's write
(tunneld/exposefwd.py: its feed is away or slow): the answer is built from the owner's reply,
with the same fields as the answer from the view (``exposure_json``), ``publicPort`` of a
``tcp`` exposure included (the owner says it in the reply's ``public_port``, to a node whose
link hello says it reads it), and a node from before that field is never sent it."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from protocol import control
from tunneld import nodelink
from tunneld.redis_store import ExposurePut

from .nodes import Cluster, Node, wait_for

pytestmark = pytest.mark.anyio


async def _agent_on_b(cluster: Cluster) -> tuple[Node, Node]:
    first = random.randint(61000, 65000)
    ports = f"{first}-{first + 7}"  # every node binds a tcp exposure's port (SO_REUSEPORT)
    node_a = await cluster.node("node-a", public_tcp_ports=ports, reuse_port=True)
    node_b = await cluster.node("node-b", public_tcp_ports=ports, reuse_port=True)
    await cluster.agent(node_b, "sb1")
    await wait_for(
        lambda: node_a.edge.cluster.owners.get("sb1", ("",))[0] == "node-b",
        what="node-a to see node-b own sb1",
    )
    return node_a, node_b


def _hold_feed(node: Node, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """``node`` applies no exposure from its feed until the event is set, and its view counts
    as not caught up (as while its feed is away): it answers from the owner's reply."""
    release = asyncio.Event()
    edge = node.edge
    apply = edge._apply_store_change

    async def held(change: Any) -> None:
        if isinstance(change, ExposurePut):
            await release.wait()
        await apply(change)

    async def not_caught_up(timeout: float) -> bool:
        return False

    monkeypatch.setattr(edge, "_apply_store_change", held)
    monkeypatch.setattr(node.store, "caught_up", not_caught_up)
    return release


async def _exposed(node: Node, body: dict[str, Any]) -> dict[str, Any]:
    r = await node.admin.post("/v1/sandboxes/sb1/ports", json=body)
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


async def _listed(node: Node, port: int) -> dict[str, Any]:
    await wait_for(lambda: port in {r.port for r in node.records()}, what="the view to have it")
    r = await node.admin.get("/v1/sandboxes/sb1/ports")
    assert r.status_code == 200, r.text
    (listed,) = [p for p in r.json()["ports"] if p["port"] == port]
    return dict(listed)


@pytest.mark.parametrize(
    "body",
    [
        {"port": 9000, "protocol": "tcp", "name": "db"},
        {"port": 8000, "name": "web", "inspect": True},
    ],
    ids=["tcp", "http"],
)
async def test_an_answer_before_the_view_caught_up_has_the_views_fields(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, body: dict[str, Any]
) -> None:
    node_a, _node_b = await _agent_on_b(cluster)
    release = _hold_feed(node_a, monkeypatch)
    answer = await _exposed(node_a, body)
    assert body["port"] not in {r.port for r in node_a.records()}  # answered from the reply
    release.set()
    assert answer == await _listed(node_a, body["port"])  # what node-a answers from its view
    if body.get("protocol") == "tcp":
        assert answer["exposedAt"].endswith(f":{answer['publicPort']}")


async def test_a_node_from_before_public_port_is_not_sent_it(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """node-a's link hello says version 3, as a node from before ``public_port`` did: node-b's
    reply leaves the field out (such a node would take it for a protocol error and drop the
    link), and node-a answers as such a node did, without ``publicPort``."""
    monkeypatch.setattr(nodelink, "LINK_VERSION", nodelink.EXPOSE_LINK_VERSION)
    node_a, node_b = await _agent_on_b(cluster)
    replies: list[object] = []
    on_control = nodelink.NodeLinkClient.on_control

    def recording(link: nodelink.NodeLinkClient, message: object) -> None:
        replies.append(message)
        on_control(link, message)

    monkeypatch.setattr(nodelink.NodeLinkClient, "on_control", recording)
    release = _hold_feed(node_a, monkeypatch)
    answer = await _exposed(node_a, {"port": 9000, "protocol": "tcp"})
    assert "publicPort" not in answer and answer["protocol"] == "tcp"
    served = [s for s in node_b.edge.cluster.server_links if s.peer_node == "node-a"]
    assert [s.peer_version for s in served] == [nodelink.EXPOSE_LINK_VERSION]
    oks = [m for m in replies if isinstance(m, control.Ok)]
    assert len(oks) == 1 and oks[0].exposures[0].public_port is None
    release.set()
    assert "publicPort" in await _listed(node_a, 9000)
    assert node_a.edge.cluster.links["node-b"].result().usable()
