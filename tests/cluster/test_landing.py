"""A node that can hand connections over takes each public connection with a light
``LandingConnection`` first (tunneld/landing.py): one for another worker is handed over without
a ``PublicConnection`` ever being built; one it keeps becomes a ``PublicConnection`` and is
served exactly as before (its first bytes, its count in the limits and its head timer passed
on)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import Counter
from collections.abc import Iterator

import orjson
import pytest

from tunneld.landing import LandingConnection
from tunneld.public import PublicConnection

from .nodes import Cluster, Node, wait_for
from .test_forwarding import raw_exchange
from .test_handover import _responses, _two_nodes_agent_on_b

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "uvloop"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    """Both loops: the swap (``transport.set_protocol`` in a read callback) is each loop's own
    code (tunneld serve runs uvloop)."""
    return "asyncio", {"use_uvloop": request.param == "uvloop"}


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[tuple[str, int]]]:
    """How many LandingConnections and PublicConnections each node built, by (class, edge id)."""
    counts: Counter[tuple[str, int]] = Counter()
    for cls in (LandingConnection, PublicConnection):
        init = cls.__init__

        def counting(self, server, *args, __init=init, __name=cls.__name__) -> None:  # type: ignore[no-untyped-def]
            counts[(__name, id(server))] += 1
            __init(self, server, *args)

        monkeypatch.setattr(cls, "__init__", counting)
    yield counts


def _host(url: str) -> bytes:
    return url.split("//", 1)[1].split("/", 1)[0].encode()


async def _owner_node(cluster: Cluster, **settings: object) -> tuple[Node, str]:
    """One node with a hand-over server (so its public listener lands connections first) and
    the sandbox's agent: every connection to it is kept."""
    a = await cluster.node("node-a", handover=True, **settings)
    assert a.edge.handover is not None
    origin = await cluster.origin()
    await cluster.agent(a, "sb1")
    r = await a.admin.post("/v1/sandboxes/sb1/ports", json={"port": origin.port})
    assert r.status_code == 200, r.text
    return a, r.json()["exposedAt"]


async def _exchange(node: Node, pieces: list[bytes], timeout: float = 10) -> bytes:
    """Write ``pieces`` one write each, each waited for (separate reads, not a guarantee), and
    read to the end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", node.edge.public_port)
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def _all_released(node: Node) -> bool:
    return not node.edge.public_connections and not node.edge.public_limits.per_ip


async def test_a_connection_for_another_worker_is_handed_over_without_a_public_connection(
    cluster: Cluster, built: Counter[tuple[str, int]]
) -> None:
    a, b, url = await _two_nodes_agent_on_b(cluster)
    head = b"GET /headers HTTP/1.1\r\nHost: " + _host(url) + b"\r\nConnection: close\r\n\r\n"
    # The first one finds B's node record unknown on A: a PublicConnection reads the records
    # and hands it over then (PublicConnection._hand_on_task). From then on, none.
    assert _responses(await raw_exchange(a.edge.public_port, head))[0][0] == 200
    await wait_for(lambda: a.edge.handover.sent == 1, what="B's answer")
    built.clear()
    for i in range(3):
        ((status, _headers, body),) = _responses(await raw_exchange(a.edge.public_port, head))
        assert status == 200 and ["x-forwarded-for", "127.0.0.1"] in orjson.loads(body)
        await wait_for(lambda i=i: a.edge.handover.sent == i + 2, what="B's answer")
    assert b.edge.handover.received == 4
    assert built[("LandingConnection", id(a.edge))] == 3
    assert built[("PublicConnection", id(a.edge))] == 0  # A never built one
    assert built[("PublicConnection", id(b.edge))] == 3  # B adopted each
    # A let go of each: out of its connections and its per-IP counts
    await wait_for(lambda: _all_released(a), what="A's counts released")


@pytest.mark.parametrize("split", [0, 1, 5000])
async def test_a_kept_connection_gets_a_body_split_across_reads(
    cluster: Cluster, built: Counter[tuple[str, int]], split: int
) -> None:
    """The first read is the head alone (0), the head and a byte of the body (1), or the head
    and 5000 bytes; the rest of the body follows in later reads."""
    a, url = await _owner_node(cluster)
    built.clear()
    body = os.urandom(100_000)
    head = (
        b"POST /upload HTTP/1.1\r\nHost: " + _host(url) + b"\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n" % len(body)
    )
    pieces = [head + body[:split], body[split:40_000], body[40_000:]]
    ((status, _headers, answer),) = _responses(await _exchange(a, pieces))
    assert status == 200
    assert orjson.loads(answer) == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert built[("LandingConnection", id(a.edge))] == 1
    assert built[("PublicConnection", id(a.edge))] == 1
    await wait_for(lambda: _all_released(a), what="the counts released")


async def test_a_kept_connection_serves_pipelined_requests(
    cluster: Cluster, built: Counter[tuple[str, int]]
) -> None:
    a, url = await _owner_node(cluster)
    host = _host(url)
    requests = (
        b"GET /headers HTTP/1.1\r\nHost: " + host + b"\r\nX-N: 1\r\n\r\n"
        b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
        b"GET /headers HTTP/1.1\r\nHost: " + host + b"\r\nX-N: 3\r\nConnection: close\r\n\r\n"
    )
    for pieces in ([requests], [requests[:30], requests[30:]]):
        (first, second, third) = _responses(await _exchange(a, pieces))
        assert first[0] == 200 and ["x-n", "1"] in orjson.loads(first[2])
        assert (second[0], second[2]) == (200, b"hello from origin")
        assert third[0] == 200 and ["x-n", "3"] in orjson.loads(third[2])
    assert built[("PublicConnection", id(a.edge))] == 2
    await wait_for(lambda: _all_released(a), what="the counts released")


async def test_a_kept_connection_upgrades_to_a_websocket(
    cluster: Cluster, built: Counter[tuple[str, int]]
) -> None:
    import websockets

    a, _url = await _owner_node(cluster)

    async def echo(ws) -> None:  # type: ignore[no-untyped-def]
        async for message in ws:
            await ws.send(message)

    server = await websockets.serve(echo, "127.0.0.1", 0)
    try:
        ws_port = server.sockets[0].getsockname()[1]
        r = await a.admin.post("/v1/sandboxes/sb1/ports", json={"port": ws_port})
        built.clear()
        async with websockets.connect(
            f"ws://{_host(r.json()['exposedAt']).decode()}/",
            host="127.0.0.1",
            port=a.edge.public_port,
            open_timeout=10,
        ) as ws:
            for i in range(10):
                payload = f"message {i} ".encode() * (i * 300 + 1)
                await ws.send(payload)
                assert await asyncio.wait_for(ws.recv(), 10) == payload
    finally:
        server.close()
        await server.wait_closed()
    assert built[("LandingConnection", id(a.edge))] == 1
    assert built[("PublicConnection", id(a.edge))] == 1
    await wait_for(lambda: _all_released(a), what="the counts released")


@pytest.mark.parametrize("sent", [b"", b"GET / HTTP/1.1\r\nHost: sb1"], ids=["nothing", "partial"])
async def test_a_head_that_does_not_arrive_in_time_gets_its_408(
    cluster: Cluster, built: Counter[tuple[str, int]], sent: bytes
) -> None:
    """Nothing at all (the landing's own timer), or part of a head (the timer armed at the
    accept, passed on to the PublicConnection): 408 at head_timeout."""
    a, _url = await _owner_node(cluster, head_timeout=0.3)
    built.clear()
    ((status, headers, body),) = _responses(await _exchange(a, [sent] if sent else []))
    assert (status, orjson.loads(body)["code"]) == (408, "REQUEST_TIMEOUT")
    assert headers[b"connection"] == b"close"
    assert built[("PublicConnection", id(a.edge))] == 1
    await wait_for(lambda: _all_released(a), what="the counts released")


async def test_per_ip_limits_count_a_landed_connection_once(
    cluster: Cluster, built: Counter[tuple[str, int]]
) -> None:
    """Two connections allowed per IP: one still landing (nothing sent), one a PublicConnection
    (part of a head sent); a third is refused with the 503, and once both are gone a new one is
    served."""
    a, url = await _owner_node(cluster, max_connections_per_ip=2)
    edge = a.edge
    built.clear()
    first = await asyncio.open_connection("127.0.0.1", edge.public_port)
    second = await asyncio.open_connection("127.0.0.1", edge.public_port)
    second[1].write(b"GET / HTTP/1.1\r\nHost: " + _host(url))
    await wait_for(lambda: built[("PublicConnection", id(edge))] == 1, what="the second's head")
    await wait_for(lambda: len(edge.public_connections) == 2, what="both accepted")
    assert edge.public_limits.per_ip == {"127.0.0.1": 2}
    kinds = sorted(type(c).__name__ for c in edge.public_connections)
    assert kinds == ["LandingConnection", "PublicConnection"]
    head = b"GET / HTTP/1.1\r\nHost: " + _host(url) + b"\r\nConnection: close\r\n\r\n"
    ((status, _headers, body),) = _responses(await raw_exchange(edge.public_port, head))
    assert (status, orjson.loads(body)["code"]) == (503, "TOO_MANY_CONNECTIONS")
    # the second's head completes: served, not refused (its count passed on, not taken again)
    second[1].write(b"\r\nConnection: close\r\n\r\n")
    ((status, _headers, body),) = _responses(await asyncio.wait_for(second[0].read(), 10))
    assert (status, body) == (200, b"hello from origin")
    for _reader, writer in (first, second):
        writer.close()
    await wait_for(lambda: _all_released(a), what="the counts released")
    ((status, _headers, body),) = _responses(await raw_exchange(edge.public_port, head))
    assert (status, body) == (200, b"hello from origin")


async def test_a_kept_connection_keeps_the_head_deadline_of_its_accept(cluster: Cluster) -> None:
    """The head timer armed when the connection was accepted is the one the PublicConnection
    keeps (a client trickling a head gets head_timeout from its accept, not from its first
    byte)."""
    a, url = await _owner_node(cluster)
    edge = a.edge
    _reader, writer = await asyncio.open_connection("127.0.0.1", edge.public_port)
    try:
        await wait_for(lambda: len(edge.public_connections) == 1, what="the accept")
        (landing,) = edge.public_connections
        assert isinstance(landing, LandingConnection)
        timer = landing._timer
        assert timer is not None
        writer.write(b"GET / HTTP/1.1\r\nHost: " + _host(url))
        await wait_for(
            lambda: edge.public_connections and landing not in edge.public_connections,
            what="the PublicConnection",
        )
        (conn,) = edge.public_connections
        assert isinstance(conn, PublicConnection)
        assert conn._timer is timer and not timer.cancelled()
    finally:
        writer.close()
    await wait_for(lambda: _all_released(a), what="the counts released")
