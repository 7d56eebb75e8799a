"""The shared h11 JSON API server (relay/httpapi.py), on both servers that use it: the edge's
admin API and the agent's local API, over real sockets on 127.0.0.1 port 0.

Before the merge only the local API had a connection cap, lingering close, ``100 Continue`` and a
limit on a head that arrives complete; the admin API restarted its head timeout at every read and
answered ``HEAD`` with nothing. Every behaviour here is checked on both servers.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import anyio
import orjson
import pytest

from agent.local_api import LocalAPI
from protocol.control import Error
from relay.httpapi import (
    ApiError,
    ApiServer,
    Exchange,
    Limits,
    Request,
    Response,
    error_response,
    json_response,
)
from relay.requests import ControlRequestError, PendingRequests

from .agent.test_local_api import FakeController
from .agent.test_local_api import raw_exchange as exchange
from .e2e.conftest import Stack

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


@dataclass
class Target:
    """One server under test: where it listens and two routes that need no credentials."""

    name: str
    server: ApiServer
    port: int
    get: bytes  # a GET that answers 200
    post: bytes  # a POST target that reads a JSON body and answers

    def limit(self, **changes: Any) -> None:
        self.server.limits = replace(self.server.limits, **changes)

    def head(self, method: bytes, target: bytes, extra: bytes = b"") -> bytes:
        return method + b" " + target + b" HTTP/1.1\r\nHost: localhost\r\n" + extra + b"\r\n"


@pytest.fixture(params=["admin", "local"])
async def target(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    if request.param == "admin":
        stack = await Stack().start()
        try:
            assert stack.edge is not None
            yield Target(
                "admin", stack.edge.admin.http, stack.edge.admin_port, b"/healthz", b"/healthz"
            )
        finally:
            await stack.close()
    else:
        async with LocalAPI(FakeController(), port=0) as api:
            yield Target("local", api.http, api.port, b"/v1/status", b"/v1/ports")


async def receive_response(stream: anyio.abc.ByteStream, timeout: float = 5.0) -> bytes:
    """One response with a Content-Length body (bounded in time)."""
    data = b""
    with anyio.fail_after(timeout):
        while b"\r\n\r\n" not in data:
            data += await stream.receive()
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            body += await stream.receive()
    return data


def json_error(data: bytes, status: int, code: str) -> dict[str, Any]:
    assert data.startswith(b"HTTP/1.1 %d " % status), data[:200]
    body = orjson.loads(data.split(b"\r\n\r\n", 1)[1])
    assert body["code"] == code
    assert isinstance(body["error"], str) and body["error"]
    assert set(body) == {"error", "code"}
    return body


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


# -- limits, on both servers -----------------------------------------------------------------


async def test_connection_cap_answers_503_json(target: Target) -> None:
    target.limit(max_connections=1)
    async with await anyio.connect_tcp("127.0.0.1", target.port) as first:
        await first.send(target.head(b"GET", target.get))
        assert (await receive_response(first)).startswith(b"HTTP/1.1 200 ")
        # The first connection is kept alive: the second one is over the cap.
        data = await exchange(target.port, target.head(b"GET", target.get))
        json_error(data, 503, "TOO_MANY_CONNECTIONS")
    # Once the first one is gone, a new connection is served again.
    await wait_until(lambda: target.server.connections == 0)
    data = await exchange(target.port, target.head(b"GET", target.get, b"Connection: close\r\n"))
    assert data.startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize("size", [20_000, 100_000])
async def test_head_over_limit_is_431_even_when_complete(target: Target, size: int) -> None:
    # 20 kB arrives complete in one read (h11's incomplete-event bound alone misses it).
    data = await exchange(target.port, target.head(b"GET", target.get, b"X-Big: " + b"a" * size))
    json_error(data, 431, "HEADERS_TOO_LARGE")


async def test_body_over_limit_is_413(target: Target) -> None:
    limit = target.server.limits.max_body_bytes
    extra = b"Content-Length: %d\r\n" % (limit + 1)
    data = await exchange(target.port, target.head(b"POST", target.post, extra))
    json_error(data, 413, "BODY_TOO_LARGE")
    chunk = b"x" * 4096
    chunks = b"".join(b"1000\r\n" + chunk + b"\r\n" for _ in range(limit // 4096 + 1))
    data = await exchange(
        target.port,
        target.head(b"POST", target.post, b"Transfer-Encoding: chunked\r\n")
        + chunks
        + b"0\r\n\r\n",
    )
    json_error(data, 413, "BODY_TOO_LARGE")


async def test_expect_100_continue(target: Target) -> None:
    body = b'{"port": 8000}'
    extra = b"Expect: 100-continue\r\nContent-Length: %d\r\n" % len(body)
    async with await anyio.connect_tcp("127.0.0.1", target.port) as stream:
        await stream.send(target.head(b"POST", target.post, extra))
        with anyio.fail_after(5):
            assert (await stream.receive()).startswith(b"HTTP/1.1 100 ")
        await stream.send(body)
        final = await receive_response(stream)
        assert final.startswith(b"HTTP/1.1 ") and not final.startswith(b"HTTP/1.1 100 ")
    # Too large: refused before the client sends the body, without a 100.
    extra = b"Expect: 100-continue\r\nContent-Length: 1000000\r\n"
    data = await exchange(target.port, target.head(b"POST", target.post, extra))
    json_error(data, 413, "BODY_TOO_LARGE")


async def test_error_answer_survives_unread_upload(target: Target) -> None:
    """Lingering close: the client is still uploading when we refuse; it must read the 413, not
    get a reset that destroys the answer."""
    upload = b"x" * (512 * 1024)
    extra = b"Content-Length: %d\r\n" % (2 * len(upload))
    async with await anyio.connect_tcp("127.0.0.1", target.port) as stream:
        await stream.send(target.head(b"POST", target.post, extra) + upload[:1024])
        with anyio.fail_after(5):
            first = await stream.receive()
        # The answer is there; keep sending what a client that does not read early would send.
        with anyio.fail_after(5):
            await stream.send(upload)
        data = first
        with anyio.fail_after(5):
            while True:
                try:
                    data += await stream.receive()
                except anyio.EndOfStream:
                    break
    json_error(data, 413, "BODY_TOO_LARGE")


async def test_dripped_head_is_408_within_request_timeout(target: Target) -> None:
    """The head timeout runs from the first byte: a byte every 50 ms does not extend it."""
    target.limit(request_timeout=0.5)
    head = target.head(b"GET", target.get, b"X-Slow: " + b"a" * 200)
    async with await anyio.connect_tcp("127.0.0.1", target.port) as stream:
        answer = b""
        with anyio.fail_after(5):
            for i in range(len(head) - 4):  # never the final CRLF CRLF
                try:
                    await stream.send(head[i : i + 1])
                except (anyio.BrokenResourceError, OSError):
                    break
                with anyio.move_on_after(0.05):
                    answer += await stream.receive()
                if answer:
                    break
    json_error(answer + await _rest(stream), 408, "REQUEST_TIMEOUT")


async def _rest(stream: anyio.abc.ByteStream) -> bytes:
    data = b""
    with anyio.move_on_after(2):
        while True:
            try:
                data += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                break
    return data


async def test_unfinished_body_is_408(target: Target) -> None:
    target.limit(request_timeout=0.3)
    data = await exchange(
        target.port, target.head(b"POST", target.post, b"Content-Length: 10\r\n") + b"{"
    )
    json_error(data, 408, "REQUEST_TIMEOUT")


async def test_idle_connection_closes_quietly(target: Target) -> None:
    target.limit(idle_timeout=0.3)
    assert await exchange(target.port, b"") == b""
    # After a complete request, the idle keep-alive connection is closed quietly too.
    data = await exchange(target.port, target.head(b"GET", target.get))
    assert data.startswith(b"HTTP/1.1 200 ") and data.count(b"HTTP/1.1") == 1


async def test_keep_alive_and_pipelining(target: Target) -> None:
    async with await anyio.connect_tcp("127.0.0.1", target.port) as stream:
        await stream.send(target.head(b"GET", target.get) * 2)
        first = await receive_response(stream)
        rest = first.split(b"HTTP/1.1 200 ", 2)
        if len(rest) < 3:  # the second answer came in its own read
            first += await receive_response(stream)
        assert first.count(b"HTTP/1.1 200 ") == 2
        await stream.send(target.head(b"GET", target.get))
        assert (await receive_response(stream)).startswith(b"HTTP/1.1 200 ")


async def test_head_request_has_headers_only(target: Target) -> None:
    async with await anyio.connect_tcp("127.0.0.1", target.port) as stream:
        await stream.send(target.head(b"HEAD", target.get))
        with anyio.fail_after(5):
            data = await stream.receive()
        assert data.startswith(b"HTTP/1.1 ") and data.endswith(b"\r\n\r\n")
        assert b"content-length: " in data.lower()
        # Still usable afterwards: no body was sent that the client would misread.
        await stream.send(target.head(b"GET", target.get))
        assert (await receive_response(stream)).startswith(b"HTTP/1.1 200 ")


BAD_REQUESTS = [
    b"NOT HTTP AT ALL\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # no Host
    b"GET / HTTP/1.1\r\nHost: localhost\r\nContent-Length: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET / HTTP/1.1\r\nHost: localhost\r\nBad Header: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)) + b"\r\n\r\n",  # TLS hello
]


@pytest.mark.parametrize("raw", BAD_REQUESTS, ids=range(len(BAD_REQUESTS)))
async def test_bad_requests_get_a_json_error(
    target: Target, raw: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    json_error(await exchange(target.port, raw), 400, "BAD_REQUEST")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- the server on its own -------------------------------------------------------------------


async def _handler(request: Request, exchange: Exchange) -> Response | None:
    if request.path == "/boom":
        raise RuntimeError("a bug")
    if request.path == "/none":
        return None
    if request.path == "/refused":
        raise ApiError(409, "TAKEN", "Already taken.", [("x-why", "because")])
    if request.path == "/takeover":
        leftover = exchange.detach()
        exchange.writer.write(b"RAW:" + leftover)
        await exchange.writer.drain()
        exchange.writer.close()
        return None
    if request.path == "/empty":
        return Response(204)
    return json_response(
        200, {"path": request.path, "query": request.query, "body": len(request.body)}
    )


@pytest.fixture
async def bare() -> AsyncIterator[ApiServer]:
    server = ApiServer(_handler, name="test API", internal_error="Internal error in the test.")
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.close()


def _port(server: ApiServer) -> int:
    assert server.server is not None
    return int(server.server.sockets[0].getsockname()[1])


async def test_handler_bug_is_500_json_logged_not_sent(
    bare: ApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    for path in (b"/boom", b"/none"):
        data = await exchange(
            _port(bare), b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path
        )
        assert json_error(data, 500, "INTERNAL_ERROR")["error"] == "Internal error in the test."
        assert b"Traceback" not in data and b"a bug" not in data
    logged = [r for r in caplog.records if r.name == "relay.httpapi" and r.levelno >= logging.ERROR]
    assert len(logged) == 2


async def test_api_error_is_rendered_with_its_headers(bare: ApiServer) -> None:
    data = await exchange(
        _port(bare), b"GET /refused HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert json_error(data, 409, "TAKEN") == {"error": "Already taken.", "code": "TAKEN"}
    assert b"x-why: because\r\n" in data
    assert b"cache-control: no-store\r\n" in data
    assert b"content-type: application/json\r\n" in data


async def test_204_has_no_body_headers(bare: ApiServer) -> None:
    data = await exchange(
        _port(bare), b"DELETE /empty HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert data.startswith(b"HTTP/1.1 204 ") and data.endswith(b"\r\n\r\n")
    assert b"content-length" not in data and b"content-type" not in data


async def test_detach_hands_over_the_connection_and_its_leftover(bare: ApiServer) -> None:
    async with await anyio.connect_tcp("127.0.0.1", _port(bare)) as stream:
        await stream.send(b"GET /takeover HTTP/1.1\r\nHost: x\r\n\r\nafter the head")
        data = b""
        with anyio.fail_after(5):
            while True:
                try:
                    data += await stream.receive()
                except anyio.EndOfStream:
                    break
    assert data == b"RAW:after the head"
    await wait_until(lambda: bare.connections == 0)


async def test_close_drops_idle_keepalives(bare: ApiServer) -> None:
    async with await anyio.connect_tcp("127.0.0.1", _port(bare)) as stream:
        await stream.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await receive_response(stream)).startswith(b"HTTP/1.1 200 ")
        with anyio.fail_after(2):
            await bare.close()
        with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)), anyio.fail_after(2):
            await stream.receive()
    assert bare.server is None


async def test_query_and_body_reach_the_handler(bare: ApiServer) -> None:
    data = await exchange(
        _port(bare),
        b"POST /x?a=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    )
    assert orjson.loads(data.split(b"\r\n\r\n", 1)[1]) == {"path": "/x", "query": "a=1", "body": 3}


async def test_upgrade_answered_normally_closes(caplog: pytest.LogCaptureFixture) -> None:
    """With accept_upgrades the handler gets a WebSocket upgrade after its head; a normal answer
    then closes the connection (the body, if any, was never read)."""
    server = ApiServer(_handler, name="test API", accept_upgrades=True)
    await server.start("127.0.0.1", 0)
    try:
        data = await exchange(
            _port(server),
            b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        assert data.startswith(b"HTTP/1.1 200 ") and b"connection: close\r\n" in data
        assert data.count(b"HTTP/1.1") == 1
    finally:
        await server.close()


# -- the control channel's Error is the same error type ---------------------------------------


async def test_control_error_reply_is_an_api_error() -> None:
    """``control.Error(code, message)`` answering a request raises an ``ApiError`` (502: the peer
    refused, as any proxy relaying an upstream failure), with ``code``/``message`` kept."""
    pending = PendingRequests(asyncio.get_running_loop())
    request_id, future = pending.new()
    assert pending.resolve(Error("TOKEN_IN_USE", "Token 'a' is in use.", request_id))
    with pytest.raises(ControlRequestError) as raised:
        await future
    exc = raised.value
    assert isinstance(exc, ApiError)
    assert (exc.status, exc.code, exc.message) == (502, "TOKEN_IN_USE", "Token 'a' is in use.")
    assert orjson.loads(error_response(exc).body) == {
        "error": "Token 'a' is in use.",
        "code": "TOKEN_IN_USE",
    }
    _, gone = pending.new()
    pending.fail_all("SANDBOX_NOT_CONNECTED", "The session ended.")
    with pytest.raises(ApiError, match=r"The session ended\."):
        await gone


async def test_a_client_that_never_reads_its_answers_is_dropped_in_bounded_time() -> None:
    """Pipelined requests whose answers are never read: the write stalls (request_timeout), and
    the close after it must not wait for the client either, or the connection's task, socket
    and buffer would stay for ever (they no longer count against max_connections by then)."""
    big = b"x" * (1 << 20)

    async def handler(request: Request, exchange: Exchange) -> Response:
        return Response(200, body=big)

    server = ApiServer(handler, name="test API", limits=Limits(request_timeout=0.3))
    await server.start("127.0.0.1", 0)
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", _port(server)))
        await asyncio.get_running_loop().sock_sendall(
            sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 8
        )

        def serving() -> list[asyncio.Task[Any]]:
            return [
                t
                for t in asyncio.all_tasks()
                if getattr(t.get_coro(), "__qualname__", "") == "ApiServer._on_connection"
            ]

        for _ in range(100):  # the answer is being written: the connection task exists
            if serving():
                break
            await asyncio.sleep(0.02)
        assert serving()
        for _ in range(200):  # bounded: the stalled write (0.3 s), then the close (0.3 s)
            if not serving():
                break
            await asyncio.sleep(0.05)
        assert not serving(), "the connection's task still waits for a client that reads nothing"
    finally:
        sock.close()
        await server.close()
