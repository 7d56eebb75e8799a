"""Raw TCP (``GET /v1/sandboxes/{id}/ports/{port}/tcp``, ``Sandbox.open_tcp``) through a node that
does not hold the sandbox's agent: the request is forwarded to the owner over a node link as one
``direct`` stream, and the owner accepts that link stream only once the agent connected to the
port, so the landing node answers exactly as a single node does: 101 then bytes both ways with
half-close, 502 when nothing listens, and a reset as a reset."""

from __future__ import annotations

import hashlib

import anyio
import pytest

from tests.e2e.origin import pattern, pattern_sha256
from tests.e2e.tcpserver import HashServer
from tunneld.client import TunnelError

from .nodes import Cluster
from .test_admin_cluster import _sdk, _three_nodes_agent_on_b

pytestmark = pytest.mark.anyio

IO_TIMEOUT = 30.0
MIB = 1 << 20


async def test_raw_tcp_through_a_node_without_the_agent(
    cluster: Cluster, hash_server: HashServer
) -> None:
    nodes = await _three_nodes_agent_on_b(cluster)
    size = 4 * MIB
    async with await _sdk(nodes[0], cluster).sandbox("sb1").open_tcp(hash_server.port) as tcp:
        with anyio.fail_after(IO_TIMEOUT):
            await tcp.send(b"hash %d\n" % size)
            for piece in pattern(size):
                await tcp.send(piece)
            await tcp.send_eof()  # the half-close crosses the link and reaches the service
            received = bytearray()
            while True:
                try:
                    received += await tcp.receive()
                except anyio.EndOfStream:
                    break
    line, _, rest = bytes(received).partition(b"\n")
    assert line.decode() == pattern_sha256(size)
    assert hashlib.sha256(rest).hexdigest() == pattern_sha256(size, seed=2)
    assert hash_server.ends == ["eof"]
    assert (
        nodes[0].edge.registry.get("sb1") is None
        or nodes[0].edge.registry.get("sb1").session is None
    )  # node A never held the session: the bytes went over the link


async def test_nothing_listening_is_a_502_through_another_node(
    cluster: Cluster, hash_server: HashServer
) -> None:
    nodes = await _three_nodes_agent_on_b(cluster)
    port = hash_server.port
    hash_server.close()  # nothing listens there any more
    for node in (nodes[0], nodes[1]):
        with pytest.raises(TunnelError) as refused:
            await _sdk(node, cluster).sandbox("sb1").open_tcp(port)
        assert (refused.value.status, refused.value.code) == (502, "UPSTREAM_CONNECT_FAILED")


async def test_the_agent_cut_off_mid_stream_is_a_reset_across_the_hop(
    cluster: Cluster, hash_server: HashServer
) -> None:
    nodes = await _three_nodes_agent_on_b(cluster)
    async with await _sdk(nodes[0], cluster).sandbox("sb1").open_tcp(hash_server.port) as tcp:
        with anyio.fail_after(IO_TIMEOUT):
            await tcp.send(b"hold %d\n" % (16 * MIB))
            got = 0
            while got < MIB:
                got += len(await tcp.receive())
            state = nodes[1].edge.registry.get("sb1")
            assert state is not None and state.session is not None
            transport = state.session.transport
            assert transport is not None
            transport.abort()  # the agent's connection to node B is gone at once
            with pytest.raises(anyio.BrokenResourceError):
                while True:
                    await tcp.receive()  # EndOfStream (a clean end) would fail the test
