"""The admin API on every node of a cluster, for every sandbox (issue 9): a node that does not
hold a sandbox's agent session still lists it as connected, with its owner node, and a
WebSocket connect through it is routed to the owner over a node link (one ``direct`` stream)
with the same answers as on a single node: the sandbox's 101 and frames end to end, the 502
page when nothing listens, a reset as a reset, a clear 502 when the owner cannot be reached,
and 503 when the sandbox is connected nowhere."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest
import websockets

from relay.mux import abort_with_reset
from tests.e2e.conftest import WS_HANDSHAKE
from tests.faults.origins import ScriptedOrigin
from tunneld.client import SandboxNotConnectedError, TunnelClient, TunnelError

from .nodes import Cluster, Node, wait_for

pytestmark = pytest.mark.anyio


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    """A WebSocket server "in the sandbox": first says what handshake it received, then echoes."""

    async def echo(ws: websockets.ServerConnection) -> None:
        request = ws.request
        assert request is not None
        await ws.send(
            orjson.dumps({"path": request.path, "headers": list(request.headers.raw_items())})
        )
        async for message in ws:
            await ws.send(message)

    server = await websockets.serve(echo, "127.0.0.1", 0, max_size=2**22)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def _three_nodes_agent_on_b(cluster: Cluster, **settings: object) -> list[Node]:
    nodes = [await cluster.node(name, **settings) for name in ("node-a", "node-b", "node-c")]
    await cluster.agent(nodes[1], "sb1")
    for node in nodes:
        await wait_for(
            lambda n=node: n.edge.cluster.owners.get("sb1", ("",))[0] == "node-b",
            what=f"{node.edge.cluster.node_id} to see node-b own sb1",
        )
    return nodes


def _sdk(node: Node, cluster: Cluster) -> TunnelClient:
    return TunnelClient(
        f"http://127.0.0.1:{node.edge.admin_port}", token=cluster.admin_token, timeout=10
    )


async def test_every_node_lists_the_sandbox_as_connected_with_its_owner(
    cluster: Cluster,
) -> None:
    nodes = await _three_nodes_agent_on_b(cluster)
    r = await nodes[0].admin.post("/v1/sandboxes/sb1/ports", json={"port": 8000})
    assert r.status_code == 200, r.text
    await cluster.agent(nodes[2], "sb2")  # connected to C, nothing exposed
    epoch = nodes[1].edge.cluster.epochs["sb1"]
    assert epoch > 0
    for node in nodes:
        await wait_for(lambda n=node: "sb2" in n.edge.cluster.owners, what="sb2's owner")
        await wait_for(lambda n=node: n.edge.registry.exposures("sb1"), what="the exposure")
        listed = (await node.admin.get("/v1/sandboxes")).json()["sandboxes"]
        by_id = {s["id"]: s for s in listed}
        assert [s["id"] for s in listed] == ["sb1", "sb2"]
        for sandbox_id, owner in (("sb1", "node-b"), ("sb2", "node-c")):
            for entry in (
                by_id[sandbox_id],
                (await node.admin.get(f"/v1/sandboxes/{sandbox_id}")).json(),
            ):
                assert entry["connected"] is True, (node.edge.cluster.node_id, entry)
                assert entry["node"] == owner
                # session details are the owner's, and only there
                assert ("session" in entry) == (node.edge.cluster.node_id == owner), entry
        assert by_id["sb1"]["epoch"] == epoch
        assert [p["port"] for p in by_id["sb1"]["ports"]] == [8000]
    b_entry = (await nodes[1].admin.get("/v1/sandboxes/sb1")).json()
    assert b_entry["peer"].startswith("127.0.0.1:") and b_entry["streams"] == 0
    r = await nodes[0].admin.get("/v1/sandboxes/nosuch")
    assert (r.status_code, r.json()["code"]) == (404, "SANDBOX_NOT_FOUND")
    # the SDK through a node without the agent
    async with _sdk(nodes[2], cluster) as client:
        infos = {i.id: i for i in await client.list_sandboxes()}
        assert infos["sb1"].connected and infos["sb2"].connected
        ports = await client.sandbox("sb1").get_exposed_ports()
        assert [p.port for p in ports] == [8000]


async def test_a_sandbox_whose_agent_left_is_listed_offline_everywhere(cluster: Cluster) -> None:
    nodes = await _three_nodes_agent_on_b(cluster)
    r = await nodes[0].admin.post("/v1/sandboxes/sb1/ports", json={"port": 8000})
    assert r.status_code == 200
    agent, _task = cluster.agents[0]
    await agent.stop()
    for node in nodes:
        await wait_for(lambda n=node: "sb1" not in n.edge.cluster.owners, what="the release")
        for entry in (
            (await node.admin.get("/v1/sandboxes")).json()["sandboxes"][0],
            (await node.admin.get("/v1/sandboxes/sb1")).json(),
        ):
            assert entry["id"] == "sb1" and entry["connected"] is False, entry
            assert "node" not in entry and "session" not in entry


async def test_ws_connect_through_a_node_without_the_agent(
    cluster: Cluster, echo_port: int
) -> None:
    nodes = await _three_nodes_agent_on_b(cluster)
    for node in (nodes[0], nodes[2], nodes[1]):  # two forwarded hops, then the owner itself
        async with _sdk(node, cluster) as client:
            ws = await client.sandbox("sb1").ws_connect(echo_port, path="/chat?room=1")
            try:
                seen = orjson.loads(await asyncio.wait_for(ws.receive(), 10))
                headers = {k.lower(): v for k, v in seen["headers"]}
                assert seen["path"] == "/chat?room=1"
                assert headers["host"] == f"localhost:{echo_port}"
                assert headers["x-sandbox-name"] == "sb1"
                assert headers["x-forwarded-for"] == "127.0.0.1"
                assert "authorization" not in headers
                for i in range(12):  # up to ~2.4 MB: flow control across both hops
                    payload = bytes([i]) * (i * i * 16_000 + 1)
                    await ws.send(payload)
                    assert await asyncio.wait_for(ws.receive(), 10) == payload
                await ws.send("text too")
                assert await asyncio.wait_for(ws.receive(), 10) == "text too"
            finally:
                await ws.close()
            assert ws.close_code == 1000
    assert "node-b" in nodes[0].edge.cluster.links  # A really went through a node link
    assert (
        nodes[0].edge.registry.get("sb1") is None
        or nodes[0].edge.registry.get("sb1").session is None
    )


async def test_ws_connect_with_the_websockets_client_and_an_early_message(
    cluster: Cluster, echo_port: int
) -> None:
    """A client that sends right after its handshake (bytes already read with the head are
    carried over the hop ahead of the rest)."""
    nodes = await _three_nodes_agent_on_b(cluster)
    async with websockets.connect(
        f"ws://127.0.0.1:{nodes[0].edge.admin_port}/v1/sandboxes/sb1/ports/{echo_port}/ws?path=/x",
        additional_headers={"authorization": f"Bearer {cluster.admin_token}"},
        open_timeout=10,
    ) as ws:
        await ws.send("early")
        assert orjson.loads(await asyncio.wait_for(ws.recv(), 10))["path"] == "/x"
        assert await asyncio.wait_for(ws.recv(), 10) == "early"


async def test_nothing_listening_is_the_same_502_through_any_node(
    cluster: Cluster, closed_port: int
) -> None:
    nodes = await _three_nodes_agent_on_b(cluster)
    for node in nodes:
        r = await node.admin.get(f"/v1/sandboxes/sb1/ports/{closed_port}/ws", headers=WS_HANDSHAKE)
        assert r.status_code == 502, (node.edge.cluster.node_id, r.text)
        assert r.json() == {
            "error": "Nothing is listening on that port in the sandbox.",
            "code": "UPSTREAM_CONNECT_FAILED",
        }
    async with _sdk(nodes[0], cluster) as client:
        with pytest.raises(TunnelError) as info:
            await client.sandbox("sb1").ws_connect(closed_port)
    assert (info.value.status, info.value.code) == (502, "UPSTREAM_CONNECT_FAILED")


class ResetAfterAnswer(ScriptedOrigin):
    """Answers a handshake with 101 and a few bytes, then resets the connection."""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\npartial")
        await writer.drain()
        await asyncio.sleep(0.2)
        abort_with_reset(writer.transport)


async def test_a_reset_stays_a_reset_across_the_hop(cluster: Cluster) -> None:
    nodes = await _three_nodes_agent_on_b(cluster)
    async with ResetAfterAnswer() as origin:
        reader, writer = await asyncio.open_connection("127.0.0.1", nodes[0].edge.admin_port)
        head = [f"GET /v1/sandboxes/sb1/ports/{origin.port}/ws HTTP/1.1", "host: x"]
        head += [f"authorization: Bearer {cluster.admin_token}"]
        head += [f"{k}: {v}" for k, v in WS_HANDSHAKE.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        received = b""
        try:
            with pytest.raises(ConnectionResetError):
                while True:
                    chunk = await asyncio.wait_for(reader.read(65536), 10)
                    if not chunk:
                        break  # a clean end: the reset would have been hidden
                    received += chunk
        finally:
            writer.close()
    assert received.startswith(b"HTTP/1.1 101 ") and received.endswith(b"partial")


async def test_an_unreachable_owner_is_a_quick_502(cluster: Cluster, echo_port: int) -> None:
    nodes = await _three_nodes_agent_on_b(cluster)
    b = nodes[1].edge.cluster
    assert b._listener is not None
    b._listener.close()  # the node-to-node port refuses from now on (a partition)
    for link in list(b.server_links):
        assert link.transport is not None
        link.transport.abort()
    loop = asyncio.get_running_loop()
    started = loop.time()
    r = await nodes[2].admin.get(f"/v1/sandboxes/sb1/ports/{echo_port}/ws", headers=WS_HANDSHAKE)
    assert r.status_code == 502, r.text
    assert r.json()["code"] == "NODE_UNREACHABLE" and "node-b" in r.json()["error"]
    assert loop.time() - started < 8
    # the owner itself still connects its own admin clients
    async with _sdk(nodes[1], cluster) as client:
        ws = await client.sandbox("sb1").ws_connect(echo_port)
        assert orjson.loads(await asyncio.wait_for(ws.receive(), 10))["path"] == "/"
        await ws.close()


async def test_a_sandbox_connected_nowhere(cluster: Cluster, echo_port: int) -> None:
    a = await cluster.node("node-a")
    b = await cluster.node("node-b")
    r = await a.admin.post("/v1/sandboxes/offline-1/ports", json={"port": echo_port})
    assert r.status_code == 200
    await wait_for(lambda: b.edge.registry.exposures("offline-1"), what="the exposure")
    for node in (a, b):
        r = await node.admin.get(
            f"/v1/sandboxes/offline-1/ports/{echo_port}/ws", headers=WS_HANDSHAKE
        )
        assert (r.status_code, r.json()["code"]) == (503, "SANDBOX_NOT_CONNECTED"), r.text
        r = await node.admin.get(f"/v1/sandboxes/nosuch/ports/{echo_port}/ws", headers=WS_HANDSHAKE)
        assert (r.status_code, r.json()["code"]) == (404, "SANDBOX_NOT_FOUND"), r.text
        entry = (await node.admin.get("/v1/sandboxes/offline-1")).json()
        assert entry["connected"] is False and "node" not in entry
    async with _sdk(b, cluster) as client:
        with pytest.raises(SandboxNotConnectedError):
            await client.sandbox("offline-1").ws_connect(echo_port)


async def test_a_stale_owner_refuses_and_the_client_gets_a_503(
    cluster: Cluster, echo_port: int
) -> None:
    """The landing node names an epoch newer than the owner's (someone claimed the sandbox
    after it): the owner refuses the stream, and the admin client gets a page, not a reset."""
    nodes = await _three_nodes_agent_on_b(cluster)
    epoch = nodes[1].edge.cluster.epochs["sb1"]
    nodes[0].edge.cluster.owners["sb1"] = ("node-b", epoch + 1)
    r = await nodes[0].admin.get(f"/v1/sandboxes/sb1/ports/{echo_port}/ws", headers=WS_HANDSHAKE)
    assert (r.status_code, r.json()["code"]) == (503, "SANDBOX_BUSY"), r.text


async def test_the_owners_stream_limit_refuses_with_a_503(cluster: Cluster, echo_port: int) -> None:
    nodes = await _three_nodes_agent_on_b(cluster, max_streams=1)
    async with _sdk(nodes[1], cluster) as client:
        ws = await client.sandbox("sb1").ws_connect(echo_port)  # the one stream B may open
        try:
            await asyncio.wait_for(ws.receive(), 10)
            r = await nodes[0].admin.get(
                f"/v1/sandboxes/sb1/ports/{echo_port}/ws", headers=WS_HANDSHAKE
            )
            assert (r.status_code, r.json()["code"]) == (503, "SANDBOX_BUSY"), r.text
        finally:
            await ws.close()
