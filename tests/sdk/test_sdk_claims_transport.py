"""docs/sdk.md's claims about the SDK's connections, timeouts and retries, against a scriptable
HTTP server on 127.0.0.1 (h11 over real sockets; asyncio, uvloop and trio):

- "async with TunnelClient(...) keeps idle HTTP connections alive (up to 4) and reuses them."
- "A request that fails on a reused keep-alive connection before any response byte arrives is
  retried once on a new connection": once, only then (not on a new connection, not after a
  response byte).
- "timeout bounds each wait on its own: connecting (including the TLS handshake) ...".
- "A path in the base URL (https://host/tunneld) is used as a prefix for every request."
- "ws_connect WebSockets do not count" towards the 32 requests in flight.
- wait_for_port: the body it sends (interval seconds clamped to 0.1-10, as milliseconds; one
  status or a pair), "timeout (seconds, at most 300)", and "The request itself waits up to
  timeout plus the client's timeout for tunneld's answer".
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc
import h11
import orjson
import pytest

from tunneld.client import (
    NotFoundError,
    TunnelClient,
    TunnelConnectionError,
    TunnelError,
    TunnelTimeoutError,
    ValidationError,
)
from tunneld.client._http import MAX_CONNECTIONS

from .conftest import ADMIN_TOKEN, FakeAdmin, wait_until

pytestmark = pytest.mark.anyio

BOUND = 20  # seconds: no wait of these tests may take this long unless the SDK hangs


class Scripted:
    """Keep-alive HTTP/1.1 server. ``mode``: "answer" (200 JSON), "drop" (read the request,
    close without a byte), "truncate" (half a response, then close). ``gate``: when set to an
    unset Event, requests wait for it before being answered. ``delay``: seconds before each
    answer. Records every request's target and body, counts connections."""

    def __init__(self) -> None:
        self.port = 0
        self.mode = "answer"
        self.gate: anyio.Event | None = None
        self.delay = 0.0
        self.pending = 0
        self.connections = 0
        self.closed = 0
        self.requests: list[tuple[str, str, bytes]] = []
        self.answer: dict[str, Any] = {"status": "ok"}

    async def handle(self, stream: anyio.abc.ByteStream) -> None:
        self.connections += 1
        try:
            async with stream:
                conn = h11.Connection(h11.SERVER)
                while True:
                    body = bytearray()
                    head: h11.Request | None = None
                    while True:
                        event = conn.next_event()
                        if event is h11.NEED_DATA:
                            conn.receive_data(await stream.receive())
                        elif isinstance(event, h11.Request):
                            head = event
                        elif isinstance(event, h11.Data):
                            body += event.data
                        elif isinstance(event, h11.EndOfMessage):
                            break
                        else:
                            return  # ConnectionClosed: the client went away
                    assert head is not None
                    self.requests.append((head.method.decode(), head.target.decode(), bytes(body)))
                    if self.mode == "drop":
                        return
                    if self.mode == "truncate":
                        await stream.send(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{")
                        return
                    if self.gate is not None:
                        self.pending += 1
                        await self.gate.wait()
                        self.pending -= 1
                    if self.delay:
                        await anyio.sleep(self.delay)
                    payload = orjson.dumps(self.answer)
                    headers = [("content-type", "application/json")]
                    headers.append(("content-length", str(len(payload))))
                    await stream.send(
                        conn.send(h11.Response(status_code=200, headers=headers))
                        + conn.send(h11.Data(data=payload))
                        + conn.send(h11.EndOfMessage())
                    )
                    conn.start_next_cycle()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        finally:
            self.closed += 1


@pytest.fixture
async def server() -> AsyncIterator[Scripted]:
    scripted = Scripted()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    scripted.port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, scripted.handle)
        with anyio.fail_after(BOUND * 3):
            yield scripted
        tg.cancel_scope.cancel()


def url(server: Scripted, path: str = "") -> str:
    return f"http://127.0.0.1:{server.port}{path}"


async def test_at_most_four_idle_connections_are_kept(server: Scripted) -> None:
    async def burst(client: TunnelClient, n: int) -> None:
        server.gate = anyio.Event()
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(client.health)
            await wait_until(lambda: server.pending == n, BOUND, f"{n} requests held at once")
            server.gate.set()

    async with TunnelClient(url(server), ADMIN_TOKEN, timeout=BOUND) as client:
        await burst(client, 8)
        assert server.connections == 8
        await wait_until(lambda: server.closed == 4, BOUND, "the 4 connections not kept closed")
        await burst(client, 8)  # 4 parked ones reused, 4 new
        assert server.connections == 12
    await wait_until(lambda: server.closed == 12, BOUND, "async with closing the rest")


async def test_a_reused_connection_that_fails_is_retried_once_on_a_new_one(
    server: Scripted,
) -> None:
    async with TunnelClient(url(server), ADMIN_TOKEN, timeout=BOUND) as client:
        assert await client.health() == {"status": "ok"}  # its connection is parked
        server.mode = "drop"
        before = len(server.requests)
        with pytest.raises(TunnelConnectionError, match="closed the connection without answering"):
            await client.health()
        assert len(server.requests) - before == 2  # the reused connection, then one new one
        assert server.connections == 2
        server.mode = "answer"
        assert await client.health() == {"status": "ok"}


async def test_no_retry_on_a_new_connection_nor_after_a_response_byte(server: Scripted) -> None:
    server.mode = "drop"
    client = TunnelClient(url(server), ADMIN_TOKEN, timeout=BOUND)  # no keep-alive
    with pytest.raises(TunnelConnectionError):
        await client.health()
    assert len(server.requests) == 1
    server.mode = "answer"
    async with TunnelClient(url(server), ADMIN_TOKEN, timeout=BOUND) as client:
        await client.health()
        server.mode = "truncate"
        before = len(server.requests)
        with pytest.raises(TunnelConnectionError):
            await client.health()
        assert len(server.requests) - before == 1  # a response had begun: not sent again


async def test_the_tls_handshake_is_bounded_by_the_timeout() -> None:
    """A server that accepts TCP and never answers the TLS ClientHello."""
    accepted: list[anyio.abc.SocketStream] = []

    async def hold(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            accepted.append(stream)
            await anyio.sleep_forever()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, hold)
        client = TunnelClient(f"https://127.0.0.1:{port}", ADMIN_TOKEN, timeout=0.3)
        with anyio.fail_after(BOUND):
            with pytest.raises(TunnelTimeoutError, match="connecting to tunneld"):
                await client.health()
        assert len(accepted) == 1  # the TCP connect succeeded: the handshake was what waited
        tg.cancel_scope.cancel()


async def test_a_base_url_path_prefixes_every_request(server: Scripted) -> None:
    server.answer = {"ports": [], "sandboxes": []}
    async with TunnelClient(url(server, "/tunneld/"), ADMIN_TOKEN, timeout=BOUND) as client:
        sb = client.sandbox("sb1")
        await client.health()
        await client.list_sandboxes()
        await sb.get_exposed_ports()
        await sb.unexpose_port(8000)
        await sb.wait_for_port(8000)
        server.mode = "drop"  # the upgrades: only their targets matter here
        with pytest.raises(TunnelError):
            await sb.ws_connect(8000, path="/x")
        with pytest.raises(TunnelError):
            await sb.open_tcp(8000)
    assert [target for _, target, _ in server.requests] == [
        "/tunneld/healthz",
        "/tunneld/v1/sandboxes",
        "/tunneld/v1/sandboxes/sb1/ports",
        "/tunneld/v1/sandboxes/sb1/ports/8000",
        "/tunneld/v1/sandboxes/sb1/ports/8000/wait",
        "/tunneld/v1/sandboxes/sb1/ports/8000/ws?path=/x",
        "/tunneld/v1/sandboxes/sb1/ports/8000/tcp",
    ]


async def test_what_wait_for_port_sends(server: Scripted) -> None:
    server.answer = {"port": 8000, "ready": True}
    async with TunnelClient(url(server), ADMIN_TOKEN, timeout=BOUND) as client:
        sb = client.sandbox("sb1")
        await sb.wait_for_port(8000)
        await sb.wait_for_port(8000, mode="tcp", interval=0.01, status=204, timeout=300)
        await sb.wait_for_port(8000, path="/health", interval=60, status=(200, 299), timeout=1)
        await sb.wait_for_port(8000, interval=1.5)
        for bad in (0, -1, 300.5, float("inf"), float("nan"), True):
            with pytest.raises(ValidationError, match="timeout"):
                await sb.wait_for_port(8000, timeout=bad)
    bodies = [orjson.loads(body) for _, _, body in server.requests]
    base = {"mode": "http", "path": "/", "statusMin": 200, "statusMax": 399, "interval": 500}
    assert bodies == [
        {**base, "timeout": 30.0},
        {
            **base,
            "mode": "tcp",
            "statusMin": 204,
            "statusMax": 204,
            "interval": 100,
            "timeout": 300,
        },
        {**base, "path": "/health", "statusMax": 299, "interval": 10_000, "timeout": 1},
        {**base, "interval": 1500, "timeout": 30.0},
    ]  # and the refused timeouts sent nothing


async def test_the_wait_request_waits_timeout_plus_the_clients_timeout(server: Scripted) -> None:
    """The answer comes after three times the client's timeout, well within the wait's
    timeout: no TunnelTimeoutError."""
    server.answer = {"port": 8000, "ready": True}
    async with TunnelClient(url(server), ADMIN_TOKEN, timeout=0.3) as client:
        await client.health()  # the connection is up: the wait's read is what is bounded
        server.delay = 1.0
        with anyio.fail_after(BOUND):
            await client.sandbox("sb1").wait_for_port(8000, timeout=10)
        with pytest.raises(TunnelTimeoutError):  # any other call: the client's timeout
            await client.health()


async def test_websockets_do_not_count_towards_the_requests_in_flight(
    fake_admin: FakeAdmin,
) -> None:
    async with TunnelClient(fake_admin.url, ADMIN_TOKEN, timeout=2) as client:
        sb = client.sandbox("abc123")
        sockets = []
        try:
            with anyio.fail_after(BOUND):
                for _ in range(MAX_CONNECTIONS + 1):
                    sockets.append(await sb.ws_connect(8000))
            assert await client.health() == {"status": "ok"}  # a slot was free at once
            with pytest.raises(NotFoundError):
                await client.sandbox("nosuch").get_exposed_ports()
        finally:
            for ws in sockets:
                await ws.close()


async def test_a_requests_long_poll_waits_wait_plus_the_clients_timeout(server: Scripted) -> None:
    """docs/sdk.md, Request inspection: "wait (0-30 s) waits for one when there is none yet,
    and the call's timeout is wait plus the client's timeout"."""
    server.answer = {"sandbox": "sb1", "inspect": True, "last": 0, "skipped": 0, "requests": []}
    async with TunnelClient(url(server), ADMIN_TOKEN, timeout=0.3) as client:
        sb = client.sandbox("sb1")
        assert await sb.requests(since=7) == []
        server.delay = 1.0
        with anyio.fail_after(BOUND):
            rows = await sb.requests(since=7, wait=2.5)
        assert rows == [] and rows.inspect is True
        for bad in (-1, 31, True):
            with pytest.raises(ValidationError):
                await sb.requests(wait=bad)
    assert [target for _, target, _ in server.requests] == [
        "/v1/sandboxes/sb1/requests?since=7",
        "/v1/sandboxes/sb1/requests?since=7&wait=3",
    ]
