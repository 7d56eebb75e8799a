"""Nodes of one host hand a public connection's socket to the owner (SCM_RIGHTS) instead of
relaying it: the owner serves it from then on, the landing node is out of the data path, and a
refused or failed hand-over falls back to the node link without losing the connection."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket

import pytest

from tunneld.handover import host_identity

from .nodes import Cluster, Node, wait_for

pytestmark = pytest.mark.anyio


async def _two_nodes_agent_on_b(cluster: Cluster) -> tuple[Node, Node, str]:
    a = await cluster.node("node-a", handover=True)
    b = await cluster.node("node-b", handover=True)
    origin = await cluster.origin()
    await cluster.agent(b, "sb1")
    r = await a.admin.post("/v1/sandboxes/sb1/ports", json={"port": origin.port})
    assert r.status_code == 200, r.text
    await wait_for(lambda: a.edge.cluster.owners.get("sb1", ("",))[0] == "node-b", what="owner")
    return a, b, r.json()["exposedAt"]


async def test_a_connection_landing_on_another_worker_is_handed_over(cluster: Cluster) -> None:
    a, b, url = await _two_nodes_agent_on_b(cluster)
    records = await a.store.nodes()
    assert records["node-b"]["host"] == host_identity() and records["node-b"]["handover"]
    async with a.public(url) as client:  # one keep-alive connection, several requests
        for _ in range(3):
            r = await client.get("/")
            assert (r.status_code, r.content) == (200, b"hello from origin")
        body = os.urandom(300_000)
        r = await client.post("/upload", content=body)
        assert r.json() == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        r = await client.get("/headers")
        assert dict(r.json())["x-forwarded-for"] == "127.0.0.1"
    assert (a.edge.handover.sent, b.edge.handover.received) == (1, 1)
    assert b"tunneld_connections_handed_over_total 1.0" in a.edge.metrics.render()
    assert b"tunneld_connections_adopted_total 1.0" in b.edge.metrics.render()
    assert not a.edge.cluster.links  # no node link was needed
    assert not a.edge.public_connections  # A let go of it


async def test_a_refused_hand_over_falls_back_to_the_node_link(cluster: Cluster) -> None:
    a, b, url = await _two_nodes_agent_on_b(cluster)
    b.edge.handover.close()  # B's hand-over socket is gone; its node links still work
    async with a.public(url) as client:
        r = await client.get("/")
    assert (r.status_code, r.content) == (200, b"hello from origin")
    assert a.edge.handover.sent == 0 and "node-b" in a.edge.cluster.links
    assert b"tunneld_connections_forwarded_total 1.0" in a.edge.metrics.render()


async def test_a_stale_owner_refuses_the_socket_and_nothing_is_lost(cluster: Cluster) -> None:
    a, b, url = await _two_nodes_agent_on_b(cluster)
    a.edge.cluster.owners["sb1"] = ("node-b", b.edge.cluster.epochs["sb1"] + 5)  # a newer epoch
    async with a.public(url) as client:
        r = await client.get("/")
    # B refused both the socket and the link stream (it would be the stale one): a clear 503
    assert r.status_code == 503 and r.json()["code"] == "SANDBOX_NOT_CONNECTED"
    assert a.edge.handover.sent == 0 and b.edge.handover.received == 0


async def test_the_hand_over_socket_refuses_garbage_and_keeps_serving(cluster: Cluster) -> None:
    a, b, url = await _two_nodes_agent_on_b(cluster)
    address = b.edge.handover.address
    loop = asyncio.get_running_loop()
    for message, fds in (
        (b"\x00", []),  # a truncated header
        (b"\x00\x05{bad}", []),  # not JSON
        (b'\x00\x1a{"id":1,"sandbox":"sb1"}', []),  # no descriptor
    ):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.connect(address)
            socket.send_fds(s, [message], fds)
            s.settimeout(5)
            reply = await loop.run_in_executor(None, s.recv, 100)
            assert b'"ok":false' in reply, reply
    r_fd, w_fd = os.pipe()  # a descriptor that is not a TCP socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.connect(address)
            head = b'{"id":2,"sandbox":"sb1","port":1,"epoch":null}'
            socket.send_fds(s, [len(head).to_bytes(2, "big") + head], [r_fd])
            s.settimeout(5)
            reply = await loop.run_in_executor(None, s.recv, 100)
            assert b'"ok":false' in reply, reply
    finally:
        os.close(r_fd)
        os.close(w_fd)
    async with a.public(url) as client:  # and the real thing still works
        assert (await client.get("/")).status_code == 200
    assert b.edge.handover.received == 1


async def test_an_owner_that_never_answers_gets_the_socket_and_nobody_serves_it_twice(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No answer within the timeout: the landing node cannot know whether the owner adopted the
    socket, so it lets go rather than risk two readers; the client sees no response at all."""
    import tunneld.handover as handover

    monkeypatch.setattr(handover, "ACK_TIMEOUT", 0.3)
    a, _b, url = await _two_nodes_agent_on_b(cluster)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    silent.bind("\0tunneld-test-silent-owner")
    silent.listen(1)
    a.edge.cluster.nodes = await a.store.nodes()
    a.edge.cluster.nodes["node-b"]["handover"] = "@tunneld-test-silent-owner"
    loop = asyncio.get_running_loop()
    host = url.split("//", 1)[1].split("/", 1)[0].encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", a.edge.public_port)
    writer.write(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    silent.settimeout(5)
    conn, _ = await loop.run_in_executor(None, silent.accept)
    conn.settimeout(5)
    _msg, fds, _flags, _addr = await loop.run_in_executor(None, socket.recv_fds, conn, 65536, 1)
    await wait_for(lambda: not a.edge.public_connections, what="node-a to let go")
    assert a.edge.handover.sent == 0 and not a.edge.cluster.links  # no fallback: no 2nd reader
    for fd in fds:
        os.close(fd)  # the "owner" drops it without answering
    conn.close()
    silent.close()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # no response: an error, not a 200
    writer.close()
