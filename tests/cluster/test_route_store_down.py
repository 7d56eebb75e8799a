"""Redis down before a node ever dialed the owner of a sandbox: the landing node knows the owner
from its feed but not the owner's node-link address, which is in Redis. A request that must go
to the owner is answered 503 ``SANDBOX_NOT_CONNECTED`` saying the cluster store cannot be read
(``Cluster.route``), as when the owner itself cannot be read: a preview request gets that
answer, not silence, and a wait for a port gets it, not a 500."""

from __future__ import annotations

import httpx
import pytest

from .nodes import Cluster, Node, exposed_through_b

pytestmark = pytest.mark.anyio


async def _owner_address_unknown_to_a(cluster: Cluster) -> tuple[Node, str, int]:
    a = await cluster.node("node-a")
    b = await cluster.node("node-b")
    origin = await cluster.origin()
    await cluster.agent(b, "sb1")
    url = await exposed_through_b(a, b, origin.port)
    assert "node-b" not in a.edge.cluster.nodes and not a.edge.cluster.links  # never dialed
    cluster.redis.stop()
    return a, url, origin.port


def _store_unreadable(r: httpx.Response) -> None:
    body = r.json()
    assert (r.status_code, body["code"]) == (503, "SANDBOX_NOT_CONNECTED"), r.text
    assert "the cluster store cannot be read" in body["error"], body


async def test_a_preview_request_is_answered_503_when_the_owners_address_cannot_be_read(
    cluster: Cluster,
) -> None:
    a, url, _port = await _owner_address_unknown_to_a(cluster)
    try:
        async with a.public(url) as client:
            _store_unreadable(await client.get("/"))
    finally:
        cluster.redis.start()


async def test_a_wait_is_answered_503_when_the_owners_address_cannot_be_read(
    cluster: Cluster,
) -> None:
    a, _url, port = await _owner_address_unknown_to_a(cluster)
    try:
        _store_unreadable(
            await a.admin.post(f"/v1/sandboxes/sb1/ports/{port}/wait", json={"timeout": 1})
        )
    finally:
        cluster.redis.start()
