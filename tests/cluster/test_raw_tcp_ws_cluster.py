"""Raw TCP as a WebSocket binary stream (tunneld/tcpws.py) through a node that does not hold the
sandbox's agent: the same ``direct`` stream over a node link as ``Upgrade: tcp``, so the landing
node answers as a single node does: 101 once the agent connected, then bytes both ways with the
half-close (an empty message), Close 1000 after the service's end; 502 when nothing listens."""

from __future__ import annotations

import hashlib

import anyio
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedOK, InvalidStatus

from tests.e2e.origin import pattern, pattern_sha256
from tests.e2e.tcpserver import HashServer
from tunneld import tcpws

from .nodes import Cluster, Node
from .test_admin_cluster import _three_nodes_agent_on_b

pytestmark = pytest.mark.anyio

IO_TIMEOUT = 30.0
MIB = 1 << 20


def _ws(node: Node, cluster: Cluster, port: int) -> connect:
    return connect(
        f"ws://127.0.0.1:{node.edge.admin_port}/v1/sandboxes/sb1/ports/{port}/tcp",
        additional_headers={"Authorization": f"Bearer {cluster.admin_token}"},
        subprotocols=[tcpws.SUBPROTOCOL],  # type: ignore[list-item]
        compression=None,
        open_timeout=IO_TIMEOUT,
        close_timeout=IO_TIMEOUT,
        ping_interval=None,
    )


async def test_websocket_raw_tcp_through_a_node_without_the_agent(
    cluster: Cluster, hash_server: HashServer
) -> None:
    nodes = await _three_nodes_agent_on_b(cluster)
    size = 4 * MIB
    received = bytearray()
    async with _ws(nodes[0], cluster, hash_server.port) as ws:
        with anyio.fail_after(IO_TIMEOUT):
            await ws.send(b"hash %d\n" % size)
            for piece in pattern(size):
                await ws.send(piece)
            await ws.send(b"")  # the half-close crosses the link and reaches the service
            while True:
                try:
                    message = await ws.recv()
                except ConnectionClosedOK:
                    break
                assert isinstance(message, bytes)
                received += message
        assert ws.close_code == 1000
    line, _, rest = bytes(received).partition(b"\n")
    assert line.decode() == pattern_sha256(size)
    assert hashlib.sha256(rest).hexdigest() == pattern_sha256(size, seed=2)
    assert hash_server.ends == ["eof"]
    state = nodes[0].edge.registry.get("sb1")
    assert state is None or state.session is None  # node A never held the session


async def test_nothing_listening_is_a_502_through_another_node(
    cluster: Cluster, hash_server: HashServer
) -> None:
    nodes = await _three_nodes_agent_on_b(cluster)
    port = hash_server.port
    hash_server.close()
    with pytest.raises(InvalidStatus) as refused:
        async with _ws(nodes[0], cluster, port):
            pass
    assert refused.value.response.status_code == 502
    assert orjson.loads(refused.value.response.body or b"")["code"] == "UPSTREAM_CONNECT_FAILED"
