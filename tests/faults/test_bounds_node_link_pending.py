"""Bound: node-link connections that have not authenticated are capped, their warnings
rate-limited (tunneld/nodelink.py ``MAX_PENDING_LINKS``, ``_UNAUTHENTICATED_LOG``).

Anyone who reaches a node's ``node_port`` can connect and send nothing: each such connection is a
whole protocol session held until ``handshake_timeout``, and each one, refused or timed out, was a
warning of its own. A hostile peer that opens them faster than they time out grew the node's
memory without end and wrote its log at will. Past ``MAX_PENDING_LINKS`` a new one is closed at
once; the warnings are a burst of 10, then one a second. A link that is already up keeps serving.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from relay.budget import LOG_BURST, LOG_RATE
from tests.cluster.nodes import Cluster, wait_for
from tunneld.nodelink import MAX_PENDING_LINKS

pytestmark = pytest.mark.anyio

EXTRA = 64  # connections past the cap
HANDSHAKE = 5.0  # node B's handshake_timeout: the silent connections end after it


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """True when the node ended the connection (EOF or reset); False if it stays open past
    twice the handshake timeout (the cap did not close it; the timeout did not either)."""
    try:
        return await asyncio.wait_for(reader.read(1), 2 * HANDSHAKE) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


async def test_silent_node_link_connections_past_the_cap_are_closed_and_logged_in_bounds(
    nodes: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "tunneld.cluster")
    a = await nodes.node("edge-a")
    b = await nodes.node("edge-b", handshake_timeout=HANDSHAKE)
    agent_port = (await nodes.origin()).port
    await nodes.agent(b, "sb1")
    response = await b.admin.post("/v1/sandboxes/sb1/ports", json={"port": agent_port})
    assert response.status_code == 200, response.text
    url = response.json()["exposedAt"]
    async with a.public(url) as client:  # a link A -> B is up before the flood
        assert (await client.get("/")).status_code == 200
    assert b.edge.cluster is not None
    port = b.edge.cluster.port
    loop = asyncio.get_running_loop()
    started = loop.time()

    conns = []
    try:
        for _ in range(MAX_PENDING_LINKS + EXTRA):
            conns.append(await asyncio.open_connection("127.0.0.1", port))
        cluster = b.edge.cluster
        await wait_for(
            lambda: (
                sum(1 for link in cluster.server_links if link.peer_node is None)
                >= MAX_PENDING_LINKS
            ),
            what="the silent connections to be accepted",
        )
        # The ones past the cap are closed by the node at once, not held for the handshake.
        closed = await asyncio.gather(*(_closed_by_peer(r) for r, _ in conns[-EXTRA:]))
        assert all(closed), f"{closed.count(False)} of {EXTRA} past the cap were kept open"
        # They were closed while the first MAX_PENDING_LINKS still wait for their hello (so not
        # by the handshake timeout, which would have ended those first).
        pending = sum(1 for link in cluster.server_links if link.peer_node is None)
        assert pending == MAX_PENDING_LINKS
        # The link that was up before keeps forwarding.
        async with a.public(url) as client:
            assert (await client.get("/")).status_code == 200
        # The rest time out (handshake_timeout): each was a warning of its own.
        await wait_for(
            lambda: not any(link.peer_node is None for link in cluster.server_links),
            what="the silent connections to time out",
        )
    finally:
        for _, writer in conns:
            writer.close()
    elapsed = loop.time() - started
    lines = [r for r in caplog.records if r.getMessage().startswith("node link from")]
    assert any("MAX_PENDING_LINKS" in r.getMessage() for r in caplog.records)
    assert any("not logged one by one" in r.getMessage() for r in caplog.records)
    assert len(lines) <= LOG_BURST + LOG_RATE * elapsed + 1, (len(lines), elapsed)
