"""A port's token changed through another node (the change arrives in the owner's feed as an
``ExposurePut``): the owner resets the live preview connections opened with the old token, as
it does for a change made through its own admin API or agent
(tests/e2e/test_token_change_cuts_live_connections.py); one it missed while cut off from Redis
arrives in the Resync, with the same effect. Two in-process edges on one real Redis; the change
is written through node A's registry, so it reaches B only by the feed."""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.conftest import read_to_end
from tests.e2e.origin import Origin
from tests.faults.faultproxy import FaultProxy

from .nodes import Cluster, Node, wait_for

pytestmark = pytest.mark.anyio


async def _served_on(
    cluster: Cluster, node: Node
) -> tuple[Origin, asyncio.StreamReader, asyncio.StreamWriter]:
    """sb1's agent on ``node``, an origin exposed through ``node``'s admin API, and a
    keep-alive connection to ``node``'s public port that one request was served on."""
    origin = await cluster.origin()
    await cluster.agent(node, "sb1")
    r = await node.admin.post("/v1/sandboxes/sb1/ports", json={"port": origin.port})
    assert r.status_code == 200, r.text
    host = r.json()["exposedAt"].split("//", 1)[1].split("/", 1)[0].encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", node.edge.public_port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"hello from origin"), 10)
    except BaseException:
        writer.close()
        raise
    return origin, reader, writer


async def test_a_token_changed_through_another_node_cuts_the_owners_live_connections(
    cluster: Cluster,
) -> None:
    a = await cluster.node("node-a")
    b = await cluster.node("node-b")
    origin, reader, writer = await _served_on(cluster, b)
    try:
        await a.edge.registry.commit_expose("sb1", origin.port, token="fresh")
        await wait_for(lambda: b.edge.registry.match("sb1", origin.port, "fresh"), what="B's view")
        assert await read_to_end(reader) == b""  # before: the connection stayed open
    finally:
        writer.close()
    assert origin.requests == 1


async def test_a_token_change_missed_while_cut_off_cuts_them_at_the_resync(
    tcp_cluster: Cluster,
) -> None:
    """The owner was cut off from Redis while the token changed: the Resync that brings its view
    up to date resets the old token's live connections too."""
    cluster = tcp_cluster
    async with FaultProxy("127.0.0.1", cluster.redis.port) as proxy:
        a = await cluster.node("node-a")
        b = await cluster.node("node-b", f"redis://127.0.0.1:{proxy.port}/0")  # B via the proxy
        origin, reader, writer = await _served_on(cluster, b)
        try:
            proxy.refuse()
            proxy.drop()  # B misses what A does now
            await wait_for(lambda: not b.store.feed_connected, what="B to notice")
            await a.edge.registry.commit_expose("sb1", origin.port, token="fresh")
            proxy.accept()
            await wait_for(
                lambda: b.edge.registry.match("sb1", origin.port, "fresh"), what="the resync"
            )
            assert await read_to_end(reader) == b""
        finally:
            writer.close()
        assert origin.requests == 1
        await cluster.close()  # before the proxy goes: B's store closes without a new outage
