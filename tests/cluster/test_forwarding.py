"""Three nodes on one real Redis: every preview URL answers through every node (a request that
lands on a node without the sandbox's agent is forwarded to the owner over a node link), the
owner parses and checks what it is forwarded, abnormal ends stay abnormal across the hop, and an
unreachable owner is a clear 502, never a hang."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from protocol import control
from protocol.session import Role, Session
from relay.mux import MuxProtocol, abort_with_reset
from tests.e2e.origin import pattern_sha256
from tests.faults.origins import ScriptedOrigin
from tunneld.framing import MAX_UPGRADE_HOLD
from tunneld.nodelink import node_link_token, verify_node_link_token

from .nodes import Cluster, Node, wait_for

pytestmark = pytest.mark.anyio


async def _three_nodes_agent_on_b(cluster: Cluster) -> tuple[list[Node], str, int]:
    nodes = [await cluster.node(name) for name in ("node-a", "node-b", "node-c")]
    origin = await cluster.origin()
    await cluster.agent(nodes[1], "sb1")
    r = await nodes[0].admin.post("/v1/sandboxes/sb1/ports", json={"port": origin.port})
    assert r.status_code == 200, r.text
    url = r.json()["exposedAt"]
    for node in nodes:  # every node's view has the exposure and knows who owns sb1
        await wait_for(lambda n=node: n.edge.registry.exposures("sb1"), what="the exposure")
        await wait_for(
            lambda n=node: n.edge.cluster.owners.get("sb1", ("",))[0] == "node-b",
            what="the owner",
        )
    return nodes, url, origin.port


def _host(url: str) -> str:
    return url.split("//", 1)[1].split("/", 1)[0]


async def raw_exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def test_a_preview_url_answers_through_every_node(cluster: Cluster) -> None:
    nodes, url, _port = await _three_nodes_agent_on_b(cluster)
    for node in nodes:
        async with node.public(url) as client:
            r = await client.get("/")
            assert (r.status_code, r.content) == (200, b"hello from origin"), node.edge.config
            # a large download and an upload, hash-checked, through the forwarded hop
            r = await client.get("/bytes", params={"n": 3_000_000, "seed": 7})
            assert hashlib.sha256(r.content).hexdigest() == pattern_sha256(3_000_000, 7)
            body = bytes(range(256)) * 8000
            r = await client.post("/upload", content=body)
            assert r.json() == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
            # the service sees the real client, not the node in between
            r = await client.get("/headers")
            headers = dict(r.json())
            assert headers["x-forwarded-for"] == "127.0.0.1"
            assert headers["x-forwarded-host"] == _host(url)
    a = nodes[0]
    assert a.edge.registry.get("sb1").session is None  # A really forwarded: no agent there
    assert "node-b" in {link for link in a.edge.cluster.links}


async def test_the_owner_checks_every_forwarded_request(cluster: Cluster) -> None:
    """The landing node relays unparsed after the first head; the owner still applies the
    421 check to later requests and strips internal headers."""
    nodes, url, _port = await _three_nodes_agent_on_b(cluster)
    host = _host(url).encode()
    data = (
        b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
        b"GET /headers HTTP/1.1\r\nHost: " + host + b"\r\nX-Sandbox-Name: other\r\n"
        b"X_Forwarded_For: 6.6.6.6\r\n\r\n"
        b"GET / HTTP/1.1\r\nHost: 9999-other-tok.localhost\r\n\r\n"
    )
    answer = await raw_exchange(nodes[2].edge.public_port, data)
    assert answer.count(b"hello from origin") == 1, answer
    assert b"6.6.6.6" not in answer and b'"x-sandbox-name","sb1"' in answer
    assert b"HTTP/1.1 421 " in answer


async def test_too_much_sent_behind_an_upgrade_is_a_400_on_the_landing_node(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """An upgrade request with more than MAX_UPGRADE_HOLD bytes behind it in one read, landing on
    a node that would forward it: the landing node's framer has already refused those bytes when
    the head is routed, so it answers the 400 itself (as the owner would), not a traceback per
    connection from handing a refused connection on."""
    nodes, url, _port = await _three_nodes_agent_on_b(cluster)
    head = (
        b"GET /ws HTTP/1.1\r\nHost: " + _host(url).encode() + b"\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    answer = await raw_exchange(nodes[2].edge.public_port, head + b"x" * (MAX_UPGRADE_HOLD + 1))
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"Too many bytes sent before the upgrade was accepted" in answer
    crashes = [r for r in caplog.records if r.exc_info is not None or r.levelname == "ERROR"]
    assert not crashes, [r.getMessage() for r in crashes]
    async with nodes[2].public(url) as client:  # the node still serves
        assert (await client.get("/")).status_code == 200


async def test_a_websocket_across_the_forwarded_hop(cluster: Cluster) -> None:
    import websockets

    nodes, _url, _port = await _three_nodes_agent_on_b(cluster)

    async def echo(ws) -> None:
        async for message in ws:
            await ws.send(message)

    server = await websockets.serve(echo, "127.0.0.1", 0)
    try:
        ws_port = server.sockets[0].getsockname()[1]
        r = await nodes[0].admin.post("/v1/sandboxes/sb1/ports", json={"port": ws_port})
        ws_url = r.json()["exposedAt"]
        await wait_for(lambda: nodes[2].edge.registry.exposures("sb1")[1:], what="the expose")
        async with websockets.connect(
            f"ws://{_host(ws_url)}/",
            host="127.0.0.1",
            port=nodes[2].edge.public_port,
            open_timeout=10,
        ) as ws:
            for i in range(20):
                payload = f"message {i} ".encode() * (i * 100 + 1)
                await ws.send(payload)
                assert await asyncio.wait_for(ws.recv(), 10) == payload
    finally:
        server.close()
        await server.wait_closed()


class CutShort(ScriptedOrigin):
    """A response without a length that stops half-way: the connection is then reset."""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + b"x" * 100_000)
        await writer.drain()
        await asyncio.sleep(0.2)
        abort_with_reset(writer.transport)  # RST from the service: the body is incomplete


async def test_an_abnormal_end_stays_abnormal_across_the_hop(cluster: Cluster) -> None:
    nodes = [await cluster.node(name) for name in ("node-a", "node-b")]
    await cluster.agent(nodes[1], "sb1")
    async with CutShort() as origin:
        r = await nodes[0].admin.post("/v1/sandboxes/sb1/ports", json={"port": origin.port})
        host = _host(r.json()["exposedAt"]).encode()
        await wait_for(
            lambda: nodes[0].edge.cluster.owners.get("sb1", ("",))[0] == "node-b",
            what="the owner",
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", nodes[0].edge.public_port)
        writer.write(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        received = b""
        with pytest.raises(ConnectionResetError):
            while True:
                chunk = await asyncio.wait_for(reader.read(65536), 10)
                if not chunk:
                    break  # a clean end: the cut-short body would look complete
                received += chunk
        writer.close()
        assert received.startswith(b"HTTP/1.1 200 ")


async def test_an_unreachable_owner_is_a_quick_502(cluster: Cluster) -> None:
    nodes, url, _port = await _three_nodes_agent_on_b(cluster)
    b = nodes[1].edge.cluster
    assert b._listener is not None
    b._listener.close()  # the node-to-node port refuses from now on (a partition)
    for link in list(b.server_links):
        assert link.transport is not None
        link.transport.abort()
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with nodes[2].public(url) as client:
        r = await client.get("/")
    assert r.status_code == 502
    assert r.json()["code"] == "NODE_UNREACHABLE" and "node-b" in r.json()["error"]
    assert loop.time() - started < 10
    # the owner itself still serves its own clients
    async with nodes[1].public(url) as client:
        assert (await client.get("/")).status_code == 200


async def test_a_new_session_on_another_node_takes_the_sandbox_over(cluster: Cluster) -> None:
    nodes, url, _port = await _three_nodes_agent_on_b(cluster)
    first_epoch = nodes[1].edge.cluster.epochs["sb1"]
    await cluster.agent(nodes[2], "sb1")  # the agent reconnects to C (B never saw it go)
    await wait_for(lambda: nodes[1].edge.registry.get("sb1").session is None, what="B to let go")
    assert nodes[2].edge.cluster.epochs["sb1"] > first_epoch
    for node in nodes:
        await wait_for(
            lambda n=node: n.edge.cluster.owners.get("sb1", ("",))[0] == "node-c",
            what="every node to see C as the owner",
        )
        async with node.public(url) as client:
            assert (await client.get("/")).content == b"hello from origin"


async def test_a_stale_owner_refuses_a_stream_of_a_newer_epoch(cluster: Cluster) -> None:
    nodes, _url, _port = await _three_nodes_agent_on_b(cluster)
    b = nodes[1].edge.cluster
    epoch = b.epochs["sb1"]
    assert b.serves("sb1", epoch) and b.serves("sb1", epoch - 1)
    assert not b.serves("sb1", epoch + 1)  # someone claimed after us: we are stale
    assert not b.serves("sb2", None)  # no session here at all


class _Dialer(MuxProtocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, hello: control.Hello) -> None:
        super().__init__(Session(Role.AGENT, now=loop.time()), loop)
        self.hello = hello
        self.replies: list[object] = []

    def on_connected(self) -> None:
        self.session.send_control(self.hello)
        self.flush()

    def on_control(self, message: object) -> None:
        self.replies.append(message)


async def test_node_links_need_the_cluster_secret(cluster: Cluster) -> None:
    a = await cluster.node("node-a")
    loop = asyncio.get_running_loop()
    assert a.edge.cluster is not None
    port = a.edge.cluster.port
    # a forged token: refused with an error, and the connection closes
    _t, forged = await loop.create_connection(
        lambda: _Dialer(loop, control.Hello("evil", node_link_token("wrong secret", "evil"))),
        "127.0.0.1",
        port,
    )
    await asyncio.wait_for(forged.closed, 5)
    assert any(isinstance(m, control.Error) and m.code == "AUTH_FAILED" for m in forged.replies)
    assert not a.edge.cluster.server_links or all(
        link.peer_node is None for link in a.edge.cluster.server_links
    )


def test_node_link_tokens_expire_and_bind_the_node_id() -> None:
    token = node_link_token("s3cret", "node-a", now=1_000_000)
    assert verify_node_link_token("s3cret", "node-a", token, now=1_000_100)
    assert not verify_node_link_token("s3cret", "node-b", token, now=1_000_100)
    assert not verify_node_link_token("other", "node-a", token, now=1_000_100)
    assert not verify_node_link_token("s3cret", "node-a", token, now=1_000_000 + 301)
    assert not verify_node_link_token("s3cret", "node-a", "garbage", now=1_000_000)


async def _owner_a_short_leases(cluster: Cluster) -> tuple[Node, Node, str]:
    """Nodes A and B with 1 s leases, sb1's agent on A, a port exposed through B: A, B, URL."""
    a = await cluster.node("node-a", lease_s=1.0)
    b = await cluster.node("node-b", lease_s=1.0)
    origin = await cluster.origin()
    await cluster.agent(a, "sb1")
    r = await b.admin.post("/v1/sandboxes/sb1/ports", json={"port": origin.port})
    url = r.json()["exposedAt"]
    await wait_for(lambda: b.edge.cluster.owners.get("sb1", ("",))[0] == "node-a", what="owner")
    return a, b, url


async def _claimed_again_and_forwarded(a: Node, b: Node, url: str, first: int) -> None:
    """A claims sb1 again with a newer epoch than ``first``, B learns it and forwards to A."""
    await wait_for(lambda: a.edge.cluster.epochs.get("sb1", 0) > first, 15, "node-a to claim again")
    await wait_for(
        lambda: b.edge.cluster.owners.get("sb1") == ("node-a", a.edge.cluster.epochs["sb1"]),
        15,
        "node-b to learn the new epoch",
    )
    async with b.public(url) as client:
        r = await client.get("/")
    assert (r.status_code, r.content) == (200, b"hello from origin")


async def test_an_outage_longer_than_the_lease_ends_with_the_owner_claiming_again(
    cluster: Cluster,
) -> None:
    """Redis away for longer than the lease: the owner keeps serving its own clients, the
    lease expires in Redis meanwhile, and once Redis is back the owner claims the sandbox again
    (nobody else did) and the other nodes forward to it again."""
    a, b, url = await _owner_a_short_leases(cluster)
    first = a.edge.cluster.epochs["sb1"]

    cluster.redis.stop()
    async with a.public(url) as client:  # the owner serves its own clients throughout
        for _ in range(5):
            assert (await client.get("/")).status_code == 200
            await asyncio.sleep(0.5)
    cluster.redis.start()  # same data (appendonly): the lease has expired meanwhile
    await _claimed_again_and_forwarded(a, b, url, first)


async def test_a_claim_after_an_outage_never_precedes_the_owners_node_record(
    cluster: Cluster,
) -> None:
    """Redis away for longer than a node record's TTL: the owner's lease and its node record
    both expire. Once Redis is back the owner claims its sandbox again at the lease loop's next
    turn, which may come long before the node record's own renewal (in production the lease
    loop runs every 5 s, the record's every 15 s). The other nodes route by that record, so the
    claim must not become visible before it: they would answer 502 NODE_UNREACHABLE for a
    sandbox whose owner is up. The record's renewal loop is stopped here, the worst case of its
    timing: only the claim itself can bring the record back."""
    a, b, url = await _owner_a_short_leases(cluster)
    first = a.edge.cluster.epochs["sb1"]
    renew_node = next(t for t in a.edge.cluster._loops if t.get_name() == "tunneld-cluster-node")
    renew_node.cancel()

    cluster.redis.stop()
    await asyncio.sleep(3.5)  # past the record's TTL (3 x lease_s) since its last renewal
    cluster.redis.start()

    await wait_for(lambda: a.edge.cluster.epochs.get("sb1", 0) > first, 15, "node-a to claim again")
    assert "node-a" in await b.edge.cluster.store.nodes()  # written before the claim
    await _claimed_again_and_forwarded(a, b, url, first)


async def test_a_node_restarted_under_the_same_id_is_found_at_its_new_address(
    cluster: Cluster,
) -> None:
    """Workers keep their node id across restarts (host-w0) but not their link port: a cached
    record that no longer answers is read again from Redis, not trusted forever."""
    nodes, url, _port = await _three_nodes_agent_on_b(cluster)
    a = nodes[0]
    async with a.public(url) as client:
        assert (await client.get("/")).status_code == 200  # A has node-b's record and a link
    old = nodes[1]
    cluster.nodes.remove(old)
    await old.admin.aclose()
    for agent, _task in cluster.agents:
        await agent.stop()
    await old.edge.stop(grace=0.1)
    new_b = await cluster.node("node-b")  # same id, another port
    assert new_b.edge.cluster.port != old.edge.cluster.port
    await cluster.agent(new_b, "sb1")
    await wait_for(lambda: "sb1" in new_b.edge.cluster.epochs, what="the new claim")
    await wait_for(
        lambda: a.edge.cluster.owners.get("sb1") == ("node-b", new_b.edge.cluster.epochs["sb1"]),
        what="A to see the new epoch",
    )
    async with a.public(url) as client:
        r = await client.get("/")
    assert (r.status_code, r.content) == (200, b"hello from origin")


async def test_node_links_over_tls(cluster: Cluster, tmp_path) -> None:
    """Nodes with a certificate take node links over TLS only; a node that can check that
    certificate (node_tls_ca) forwards over it, one that cannot answers a clear 502."""
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file, ca_file = (tmp_path / n for n in ("node.pem", "node.key", "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(cert_file)
    cert.private_key_pem.write_to_path(key_file)
    ca.cert_pem.write_to_path(ca_file)
    tls = {"tls_cert": str(cert_file), "tls_key": str(key_file)}
    a = await cluster.node("node-a", node_tls_ca=str(ca_file), **tls)
    b = await cluster.node("node-b", node_tls_ca=str(ca_file), **tls)
    c = await cluster.node("node-c", **tls)  # no node_tls_ca: cannot check the others
    origin = await cluster.origin()
    agent_tls = ssl.create_default_context(cafile=str(ca_file))
    await cluster.agent(b, "sb1", tls=agent_tls)
    r = await a.admin.post("/v1/sandboxes/sb1/ports", json={"port": origin.port})
    url = r.json()["exposedAt"]
    for node in (a, c):
        await wait_for(
            lambda n=node: n.edge.cluster.owners.get("sb1", ("",))[0] == "node-b", what="owner"
        )
    async with a.public(url) as client:
        r = await client.get("/")
    assert (r.status_code, r.content) == (200, b"hello from origin")
    link = a.edge.cluster.links["node-b"].result()
    assert link.transport is not None and link.transport.get_extra_info("ssl_object") is not None
    async with c.public(url) as client:
        r = await client.get("/")
    assert r.status_code == 502 and "node_tls_ca is not set" in r.json()["error"]


async def test_a_stopped_node_releases_its_leases_and_record(cluster: Cluster) -> None:
    a = await cluster.node("node-a")
    b = await cluster.node("node-b")
    await cluster.agent(b, "sb1")
    await wait_for(lambda: "sb1" in b.edge.cluster.epochs, what="the claim")
    assert await a.store.owner("sb1") == ("node-b", b.edge.cluster.epochs["sb1"])
    assert "node-b" in await a.store.nodes()
    cluster.nodes.remove(b)
    await b.admin.aclose()
    await b.edge.stop(grace=0.1)
    assert await a.store.owner("sb1") is None
    assert "node-b" not in await a.store.nodes()
