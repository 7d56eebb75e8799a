"""Nodes of one host hand a public connection's socket to the owner (SCM_RIGHTS) instead of
relaying it: the owner serves it from then on, the landing node is out of the data path, and a
refused or failed hand-over falls back to the node link without losing the connection."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from typing import Any

import orjson
import pytest

from tunneld.handover import _ANSWER, host_identity
from tunneld.handover import VERSION as HANDOVER_VERSION

from .nodes import Cluster, Node, exposed_through_b, wait_for
from .test_forwarding import raw_exchange

pytestmark = pytest.mark.anyio


async def _two_nodes_agent_on_b(cluster: Cluster) -> tuple[Node, Node, str]:
    a = await cluster.node("node-a", handover=True)
    b = await cluster.node("node-b", handover=True)
    origin = await cluster.origin()
    await cluster.agent(b, "sb1")
    # through B: these tests check that no request needed a node link
    return a, b, await exposed_through_b(a, b, origin.port)


async def test_a_connection_landing_on_another_worker_is_handed_over(cluster: Cluster) -> None:
    a, b, url = await _two_nodes_agent_on_b(cluster)
    records = await a.store.nodes()
    assert records["node-b"]["host"] == host_identity() and records["node-b"]["handover"]
    assert records["node-b"]["handover_version"] == HANDOVER_VERSION
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


async def test_an_owner_running_another_hand_over_version_gets_the_node_link(
    cluster: Cluster,
) -> None:
    # Workers of one host may run different code for a while (one restarted from an upgraded
    # install): a hand-over message the owner could not read would cost the connection.
    a, b, url = await _two_nodes_agent_on_b(cluster)
    b.edge.cluster.node_info["handover_version"] = HANDOVER_VERSION + 1
    await b.edge.cluster._register()
    a.edge.cluster.nodes = await a.store.nodes()
    assert a.edge.cluster.nodes["node-b"]["handover_version"] == HANDOVER_VERSION + 1
    async with a.public(url) as client:
        r = await client.get("/")
    assert (r.status_code, r.content) == (200, b"hello from origin")
    assert a.edge.handover.sent == 0 and b.edge.handover.received == 0
    assert b"tunneld_connections_forwarded_total 1.0" in a.edge.metrics.render()


async def test_an_owner_that_loses_the_descriptors_refuses_and_the_node_link_serves(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel drops descriptors a receiver has no room for (out of file descriptors:
    MSG_CTRUNC); here B reads with no room for any. B refuses each connection by its id and A,
    which still holds them, forwards them over the node link: served, not dropped after the
    2 s wait for an answer."""
    import tunneld.handover

    a, b, url = await _two_nodes_agent_on_b(cluster)
    monkeypatch.setattr(tunneld.handover, "_FD_SPACE", 0)
    async with a.public(url) as client:
        r = await client.get("/")
    assert (r.status_code, r.content) == (200, b"hello from origin")
    assert a.edge.handover.sent == 0 and b.edge.handover.received == 0
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
            assert _ANSWER.unpack(reply)[1] is False, reply
    r_fd, w_fd = os.pipe()  # a descriptor that is not a TCP socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.connect(address)
            s.settimeout(5)
            entry = {"id": 2, "sandbox": "sb1", "port": 1, "epoch": None, "n": 0}
            for entries, fds in (
                ([entry], [r_fd]),  # not a socket
                ([entry, {**entry, "id": 3}], [r_fd]),  # a descriptor short
                ([{**entry, "n": 10}], [r_fd]),  # bytes announced that are not there
            ):
                head = orjson.dumps(entries)
                socket.send_fds(s, [len(head).to_bytes(2, "big") + head], fds)
                reply = await loop.run_in_executor(None, s.recv, 100)
                # each connection refused by its id (the landing node forwards them)
                assert reply == b"".join(_ANSWER.pack(e["id"], False) for e in entries), reply
    finally:
        os.close(r_fd)
        os.close(w_fd)
    async with a.public(url) as client:  # and the real thing still works
        assert (await client.get("/")).status_code == 200
    assert b.edge.handover.received == 1


async def _request_to_fake_owner(cluster: Cluster, name: str) -> tuple[Any, ...]:
    """Node A, with node B's hand-over socket replaced by a bare listening one of the test's
    (``name``), and a request on A for a sandbox on B: (A, listener, the accepted hand-over
    connection from A, the client's (reader, writer))."""
    a, _b, url = await _two_nodes_agent_on_b(cluster)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    silent.bind(f"\0tunneld-test-{name}-owner")
    silent.listen(1)
    a.edge.cluster.nodes = await a.store.nodes()
    a.edge.cluster.nodes["node-b"]["handover"] = f"@tunneld-test-{name}-owner"
    loop = asyncio.get_running_loop()
    host = url.split("//", 1)[1].split("/", 1)[0].encode()
    client = await asyncio.open_connection("127.0.0.1", a.edge.public_port)
    client[1].write(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    silent.settimeout(5)
    conn, _ = await loop.run_in_executor(None, silent.accept)
    conn.settimeout(5)
    return a, silent, conn, client


async def test_an_owner_that_never_answers_gets_the_socket_and_nobody_serves_it_twice(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No answer within the timeout: the landing node cannot know whether the owner adopted the
    socket, so it lets go rather than risk two readers; the client sees no response at all."""
    import tunneld.handover as handover

    monkeypatch.setattr(handover, "ACK_TIMEOUT", 0.3)
    a, silent, conn, (reader, writer) = await _request_to_fake_owner(cluster, "silent")
    loop = asyncio.get_running_loop()
    _msg, fds, _flags, _addr = await loop.run_in_executor(None, socket.recv_fds, conn, 65536, 1)
    await wait_for(lambda: not a.edge.public_connections, what="node-a to let go")
    assert a.edge.handover.sent == 0 and not a.edge.cluster.links  # no fallback: no 2nd reader
    for fd in fds:
        os.close(fd)  # the "owner" drops it without answering
    conn.close()
    silent.close()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # no response: an error, not a 200
    writer.close()


# -- what the landing node read before the hand-over, and what came after it ----------------------


def _responses(data: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Split a stream of Content-Length framed responses (the test origin's)."""
    out = []
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"an incomplete response head: {head!r}"
        status_line, *lines = head.split(b"\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers[b"content-length"])
        assert len(data) >= length, "a response cut short"
        out.append((int(status_line.split()[1]), headers, data[:length]))
        data = data[length:]
    return out


async def _handed_over_exchange(a: Node, pieces: list[bytes]) -> bytes:
    """Write ``pieces`` to A's public port, one write each, waiting for each to leave; read to
    the end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", a.edge.public_port)
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.02)  # separate reads on the landing node (not a guarantee)
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def test_a_head_arriving_in_small_writes_is_handed_over_whole(cluster: Cluster) -> None:
    a, b, url = await _two_nodes_agent_on_b(cluster)
    host = url.split("//", 1)[1].split("/", 1)[0].encode()
    head = (
        b"GET /headers HTTP/1.1\r\nHost: " + host + b"\r\nX-Piece: 1\r\nConnection: close\r\n\r\n"
    )
    data = await _handed_over_exchange(a, [head[i : i + 7] for i in range(0, len(head), 7)])
    ((status, _headers, body),) = _responses(data)
    assert status == 200 and ["x-piece", "1"] in orjson.loads(body)
    assert (a.edge.handover.sent, b.edge.handover.received) == (1, 1)


async def test_a_large_head_in_several_reads_is_handed_over_whole(cluster: Cluster) -> None:
    a, b, url = await _two_nodes_agent_on_b(cluster)
    host = url.split("//", 1)[1].split("/", 1)[0].encode()
    big = [f"x-big-{i}: {'v' * 240}".encode() for i in range(50)]  # ~13 KiB of head
    head = b"\r\n".join(
        [b"GET /headers HTTP/1.1", b"Host: " + host, *big, b"Connection: close", b"", b""]
    )
    pieces = [head[:40], head[40:6000], head[6000:]]  # Host in the first, the end in the last
    data = await _handed_over_exchange(a, pieces)
    ((status, _headers, body),) = _responses(data)
    seen = dict(orjson.loads(body))
    assert status == 200 and all(seen[f"x-big-{i}"] == "v" * 240 for i in range(50))
    assert (a.edge.handover.sent, b.edge.handover.received) == (1, 1)


async def test_pipelined_requests_and_a_body_are_all_served_by_the_owner(cluster: Cluster) -> None:
    """Three requests and a body in one write: the landing node read them all before handing
    the socket over; the owner serves every one, in order, and the rest of the body that
    arrives only after the hand-over follows the bytes that travelled with the socket."""
    a, b, url = await _two_nodes_agent_on_b(cluster)
    host = url.split("//", 1)[1].split("/", 1)[0].encode()
    body = os.urandom(200_000)
    first = (
        b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
        b"GET /headers HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
        b"POST /upload HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body[:1000]
    reader, writer = await asyncio.open_connection("127.0.0.1", a.edge.public_port)
    try:
        writer.write(first)
        await wait_for(lambda: b.edge.handover.received == 1, what="the hand-over")
        writer.write(body[1000:])  # after the hand-over: only the owner reads these
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    (s1, _, b1), (s2, _, b2), (s3, _, b3) = _responses(data)
    assert (s1, b1) == (200, b"hello from origin")
    assert s2 == 200 and ["x-forwarded-for", "127.0.0.1"] in orjson.loads(b2)
    assert s3 == 200 and orjson.loads(b3) == {
        "length": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
    }
    assert (a.edge.handover.sent, b.edge.handover.received) == (1, 1)
    assert not a.edge.public_connections and not a.edge.cluster.links


async def test_a_client_that_sends_nothing_is_not_handed_over(cluster: Cluster) -> None:
    a = await cluster.node("node-a", handover=True, head_timeout=0.3)
    b = await cluster.node("node-b", handover=True)
    origin = await cluster.origin()
    await cluster.agent(b, "sb1")
    r = await a.admin.post("/v1/sandboxes/sb1/ports", json={"port": origin.port})
    assert r.status_code == 200, r.text
    # nothing at all: the landing node's head timer answers, nothing goes to the owner
    data = await raw_exchange(a.edge.public_port, b"")
    assert data.startswith(b"HTTP/1.1 408 ")
    # half a head, then the client goes away: nothing to hand over either
    _reader, writer = await asyncio.open_connection("127.0.0.1", a.edge.public_port)
    writer.write(b"GET / HTTP/1.1\r\nHo")
    await writer.drain()
    writer.close()
    await wait_for(lambda: not a.edge.public_connections, what="node-a to forget it")
    assert (a.edge.handover.sent, b.edge.handover.received) == (0, 0)


async def test_a_refusing_owner_loses_no_byte_the_node_link_carries_them_all(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner answers no (as one that just lost the sandbox would): the landing node still
    holds the socket and what it read, and forwards both over the node link; the rest of the
    body, sent after the refusal, follows them."""
    a, b, url = await _two_nodes_agent_on_b(cluster)
    refused: list[int] = []

    def refuse(fd: int, *_args: object) -> bool:
        refused.append(fd)
        os.close(fd)  # _adopt's to close, as a real refusal does
        return False

    monkeypatch.setattr(b.edge.handover, "_adopt", refuse)
    host = url.split("//", 1)[1].split("/", 1)[0].encode()
    body = os.urandom(100_000)
    reader, writer = await asyncio.open_connection("127.0.0.1", a.edge.public_port)
    try:
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body[:5000]
        )
        await wait_for(lambda: "node-b" in a.edge.cluster.links, what="the node link")
        writer.write(body[5000:])
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    ((status, _headers, answer),) = _responses(data)
    assert status == 200 and orjson.loads(answer) == {
        "length": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
    }
    assert len(refused) == 1 and a.edge.handover.sent == 0
    assert b"tunneld_connections_forwarded_total 1.0" in a.edge.metrics.render()


async def test_an_owner_whose_socket_closes_unanswered_is_given_the_connection_at_once(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner's hand-over connection ends before it answered (the process died, say): it may
    have adopted the socket, so the landing node lets go, as on a timeout, but at once."""
    import tunneld.handover as handover

    monkeypatch.setattr(handover, "ACK_TIMEOUT", 60.0)
    a, silent, conn, (reader, writer) = await _request_to_fake_owner(cluster, "dying")
    loop = asyncio.get_running_loop()
    _msg, fds, _flags, _addr = await loop.run_in_executor(None, socket.recv_fds, conn, 65536, 4)
    assert len(fds) == 1 and a.edge.public_connections  # A still waits for the answer
    for fd in fds:
        os.close(fd)
    conn.close()  # no answer, ever
    silent.close()
    await wait_for(lambda: not a.edge.public_connections, timeout=5, what="node-a to let go")
    assert a.edge.handover.sent == 0 and not a.edge.cluster.links  # no fallback: no 2nd reader
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_a_connection_closed_before_its_hand_over_left_is_not_sent(cluster: Cluster) -> None:
    """Hand-overs leave at the end of the loop iteration: a socket closed before then is not
    sent (its descriptor number may already name another socket), and its caller hears False;
    one still open goes, and is adopted."""
    a, b, _url = await _two_nodes_agent_on_b(cluster)
    address = (await a.store.nodes())["node-b"]["handover"]
    header = {"sandbox": "sb1", "port": 1, "epoch": b.edge.cluster.epochs["sb1"]}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        clients = [socket.create_connection(listener.getsockname()) for _ in range(2)]
        accepted = [listener.accept()[0] for _ in clients]
    answers: dict[int, list[bool | None]] = {0: [], 1: []}
    try:
        for i, sock in enumerate(accepted):
            assert a.edge.handover.send(address, sock, header, b"", answers[i].append)
        accepted[0].close()  # before this loop iteration ends
        await wait_for(lambda: answers[0] and answers[1], what="both answers")
        assert answers == {0: [False], 1: [True]}
        assert b.edge.handover.received == 1 and a.edge.handover.sent == 1
    finally:
        for s in (*clients, *accepted):
            s.close()


class _Keep(asyncio.Protocol):
    def __init__(self, into: list[asyncio.BaseTransport]) -> None:
        self.into = into

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.into.append(transport)


@pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")]
)
async def test_a_transport_closed_before_its_hand_over_left_is_not_sent(cluster: Cluster) -> None:
    """A connection the landing node closes (a timeout, a stop) after asking for its hand-over
    but before the batch leaves is not handed over: uvloop's transport socket still reports an
    open descriptor until libuv closes it, so without OpenSocket the owner would adopt and
    serve a connection its landing node had just given up."""
    from tunneld.handover import OpenSocket

    a, b, _url = await _two_nodes_agent_on_b(cluster)
    address = (await a.store.nodes())["node-b"]["handover"]
    header = {"sandbox": "sb1", "port": 1, "epoch": b.edge.cluster.epochs["sb1"]}
    loop = asyncio.get_running_loop()
    transports: list[asyncio.BaseTransport] = []
    server = await loop.create_server(lambda: _Keep(transports), "127.0.0.1", 0)
    client = socket.create_connection(server.sockets[0].getsockname()[:2])
    try:
        await wait_for(lambda: transports, what="the accepted connection")
        (transport,) = transports
        sock = transport.get_extra_info("socket")
        number = sock.fileno()
        answers: list[bool | None] = []
        opened = OpenSocket(transport, sock)
        assert a.edge.handover.send(address, opened, header, b"", answers.append)
        transport.abort()  # before this loop iteration ends and the batch leaves
        assert sock.fileno() == number and opened.fileno() == -1
        await wait_for(lambda: answers, what="the answer")
        assert answers == [False] and b.edge.handover.received == 0
    finally:
        client.close()
        server.close()
