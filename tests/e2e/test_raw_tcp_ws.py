"""Raw TCP to a sandbox port as a WebSocket binary stream (tunneld/tcpws.py, issue 11):
``GET /v1/sandboxes/{id}/ports/{port}/tcp`` with ``Upgrade: websocket``.

A real ``websockets`` client talks to a real EdgeServer and agent in process; behind the agent
are tests/e2e/tcpserver.py (hashing, holding and resetting service) and a real redis-server.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import socket
from collections.abc import Callable
from typing import Any

import anyio
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK, InvalidStatus

from protocol.frames import DEFAULT_MAX_STREAM_WINDOW as WINDOW
from protocol.frames import MAX_FRAME_PAYLOAD
from relay.buffers import READ_SIZE
from relay.mux import StreamEndpoint
from tests.redis_server import RedisServer
from tunneld import tcpws

from .conftest import Stack, wait_until
from .origin import pattern, pattern_sha256
from .tcpserver import HashServer
from .test_backpressure import EDGE_STREAM_BOUND

pytestmark = pytest.mark.anyio

IO_TIMEOUT = 30.0
MIB = 1 << 20
# What the edge may queue towards one slow client (tests/e2e/test_backpressure.py: the socket's
# high-water mark, the frame that crossed it, the stream window whose credit it then holds),
# plus the WebSocket framing of those bytes (at most 10 bytes per message; messages are tunnel
# chunks, which the agent makes of whole socket reads).
BUFFER_BOUND = EDGE_STREAM_BOUND + EDGE_STREAM_BOUND // 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def url(stack: Stack, port: int, sandbox: str = "sb1", kind: str = "tcp") -> str:
    assert stack.edge is not None
    return f"ws://127.0.0.1:{stack.edge.admin_port}/v1/sandboxes/{sandbox}/ports/{port}/{kind}"


def open_ws(stack: Stack, port: int, token: str | None = None, **kwargs: Any) -> Any:
    """A websockets client on the endpoint, with ``Authorization: Bearer`` unless ``token`` is
    "" (then no header at all)."""
    token = stack.admin_token if token is None else token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return connect(
        url(stack, port),
        additional_headers=headers,
        subprotocols=kwargs.pop("subprotocols", [tcpws.SUBPROTOCOL]),  # type: ignore[arg-type]
        compression=None,
        open_timeout=IO_TIMEOUT,
        close_timeout=IO_TIMEOUT,
        ping_interval=None,
        **kwargs,
    )


def bearer_subprotocol(token: str) -> str:
    return tcpws.BEARER_PREFIX + base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


async def receive_all(ws: ClientConnection) -> bytes:
    """Every binary message until the close; raises what websockets raises for an abnormal
    one (ConnectionClosedError), returns on a clean 1000."""
    received = bytearray()
    with anyio.fail_after(IO_TIMEOUT):
        while True:
            try:
                message = await ws.recv()
            except ConnectionClosedOK:
                return bytes(received)
            assert isinstance(message, bytes), "the edge sends binary messages only"
            assert len(message) <= MAX_FRAME_PAYLOAD  # one tunnel chunk per message
            received += message


async def receive_until(ws: ClientConnection, done: Callable[[bytes], bool]) -> bytes:
    received = bytearray()
    with anyio.fail_after(IO_TIMEOUT):
        while not done(bytes(received)):
            message = await ws.recv()
            assert isinstance(message, bytes)
            received += message
    return bytes(received)


async def test_bytes_both_ways_by_hash_half_close_and_a_clean_close(
    stack: Stack, hash_server: HashServer
) -> None:
    """8 MiB up in 1 MiB messages (larger than a tunnel frame), an empty message as the
    half-close, 8 MiB down after it, then Close 1000: both directions checked by sha256."""
    await stack.agent("sb1")
    size = 8 * MIB
    async with open_ws(stack, hash_server.port) as ws:
        assert ws.subprotocol == tcpws.SUBPROTOCOL
        with anyio.fail_after(IO_TIMEOUT):
            await ws.send(b"hash %d\n" % size)
            chunk = bytearray()
            for piece in pattern(size):
                chunk += piece
                if len(chunk) >= MIB:
                    await ws.send(bytes(chunk))
                    chunk.clear()
            if chunk:
                await ws.send(bytes(chunk))
            await ws.send(b"")  # the half-close: the service reads EOF, then answers
        received = await receive_all(ws)
        assert ws.close_code == 1000
    line, _, rest = received.partition(b"\n")
    assert line.decode() == pattern_sha256(size)
    assert len(rest) == size
    assert hashlib.sha256(rest).hexdigest() == pattern_sha256(size, seed=2)
    await wait_until(lambda: hash_server.ends == ["eof"], 5, "the service's clean end")


def resp(*args: bytes) -> bytes:
    out = b"*%d\r\n" % len(args)
    for arg in args:
        out += b"$%d\r\n%s\r\n" % (len(arg), arg)
    return out


async def test_redis_behind_the_websocket(stack: Stack, redis_tcp_server: RedisServer) -> None:
    await stack.agent("sb1")
    value = b"".join(pattern(MIB + 17, seed=5))
    async with open_ws(stack, redis_tcp_server.port) as ws:
        await ws.send(resp(b"PING"))
        assert await receive_until(ws, lambda b: b.endswith(b"\r\n")) == b"+PONG\r\n"
        await ws.send(resp(b"SET", b"wskey", value))
        assert await receive_until(ws, lambda b: b.endswith(b"\r\n")) == b"+OK\r\n"
        await ws.send(resp(b"GET", b"wskey"))
        head = b"$%d\r\n" % len(value)
        got = await receive_until(ws, lambda b: len(b) >= len(head) + len(value) + 2)
        assert got[: len(head)] == head
        assert hashlib.sha256(got[len(head) : -2]).digest() == hashlib.sha256(value).digest()
        await ws.send(resp(b"QUIT"))  # redis answers, then closes: Close 1000 after the data
        assert await receive_all(ws) == b"+OK\r\n"
        assert ws.close_code == 1000
    # what the client stored is what a direct client reads
    with socket.create_connection(("127.0.0.1", redis_tcp_server.port), IO_TIMEOUT) as direct:
        direct.sendall(resp(b"STRLEN", b"wskey"))
        assert direct.recv(100) == b":%d\r\n" % len(value)


async def test_nothing_listening_is_a_502_page_not_a_101(stack: Stack) -> None:
    await stack.agent("sb1")
    with pytest.raises(InvalidStatus) as refused:
        async with open_ws(stack, free_port()):
            pass
    response = refused.value.response
    assert response.status_code == 502
    assert orjson.loads(response.body or b"")["code"] == "UPSTREAM_CONNECT_FAILED"


async def test_tokens_header_or_browser_subprotocol(stack: Stack, hash_server: HashServer) -> None:
    await stack.agent("sb1")
    for token in ("wrong-token", ""):
        with pytest.raises(InvalidStatus) as denied:
            async with open_ws(stack, hash_server.port, token=token):
                pass
        assert denied.value.response.status_code == 401
        assert orjson.loads(denied.value.response.body or b"")["code"] == "UNAUTHORIZED"
    # A browser cannot set Authorization: the token as a subprotocol next to tunneld.tcp.
    protocols = [tcpws.SUBPROTOCOL, bearer_subprotocol(stack.admin_token)]
    async with open_ws(stack, hash_server.port, token="", subprotocols=protocols) as ws:
        assert ws.subprotocol == tcpws.SUBPROTOCOL  # the token is never echoed
        await ws.send(b"hash 3\nabc")
        await ws.send(b"")
        line, _, rest = (await receive_all(ws)).partition(b"\n")
    assert line.decode() == hashlib.sha256(b"abc").hexdigest() and len(rest) == 3
    wrong = [tcpws.SUBPROTOCOL, bearer_subprotocol(stack.admin_token + "x")]
    with pytest.raises(InvalidStatus) as denied:
        async with open_ws(stack, hash_server.port, token="", subprotocols=wrong):
            pass
    assert denied.value.response.status_code == 401
    # only this endpoint takes it: the WebSocket connect relays the handshake to the sandbox
    with pytest.raises(InvalidStatus) as denied:
        async with connect(
            url(stack, hash_server.port, kind="ws"),
            subprotocols=protocols,  # type: ignore[arg-type]
            open_timeout=IO_TIMEOUT,
        ):
            pass
    assert denied.value.response.status_code == 401


async def test_a_text_message_is_close_1003_and_a_reset_for_the_service(
    stack: Stack, hash_server: HashServer
) -> None:
    await stack.agent("sb1")
    async with open_ws(stack, hash_server.port) as ws:
        await ws.send(b"hold 10\n")
        assert await receive_until(ws, lambda b: len(b) >= 10) == b"".join(pattern(10, seed=3))
        await ws.send("text is not a byte stream")
        with pytest.raises(ConnectionClosedError) as closed:
            await receive_all(ws)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1003
    await wait_until(lambda: hash_server.ends == ["reset"], 5, "the service to see a reset")


async def test_a_service_reset_is_close_1011_never_1000(
    stack: Stack, hash_server: HashServer
) -> None:
    await stack.agent("sb1")
    async with open_ws(stack, hash_server.port) as ws:
        await ws.send(b"rst 300000\n")
        with pytest.raises(ConnectionClosedError) as closed:
            await receive_all(ws)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    assert ws.close_code == 1011


async def test_the_clients_close_is_the_services_eof(stack: Stack, hash_server: HashServer) -> None:
    """A Close from the client ends its side (FIN, not a reset); the edge answers it once the
    service ended too, so the handshake completes cleanly."""
    await stack.agent("sb1")
    async with open_ws(stack, hash_server.port) as ws:
        await ws.send(b"hold 5\n")
        assert await receive_until(ws, lambda b: len(b) >= 5) == b"".join(pattern(5, seed=3))
        pong = await ws.ping(b"are you there")  # answered by the edge
        with anyio.fail_after(IO_TIMEOUT):
            await pong
        await ws.close()
        assert ws.close_code == 1000
    await wait_until(lambda: hash_server.ends == ["eof"], 5, "the service's EOF")


async def test_a_slow_reader_holds_the_service_not_the_edges_memory(
    stack: Stack, hash_server: HashServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client stops reading a 64 MiB answer: what the edge queues for it stays within its
    socket's high-water mark, one frame and the stream window, the unacknowledged credit within
    the window, and the service is held back (the edge got far less than the answer); then all
    of it arrives intact, within the same bounds."""
    agent = await stack.agent("sb1")
    peak = {"buffered": 0, "unacked": 0, "written": 0}
    original = tcpws.WebSocketTcpEndpoint.receive_from_peer

    def measured(self: tcpws.WebSocketTcpEndpoint, data: bytes) -> None:
        original(self, data)
        peak["written"] += len(data)
        if self.transport is not None:
            size = self.transport.get_write_buffer_size()
            peak["buffered"] = max(peak["buffered"], size)
        if self.stream_id in self.mux.streams and not self.mux.session.closed:
            unacked = self.mux.session.stream_receive_unacked(self.stream_id)
            peak["unacked"] = max(peak["unacked"], unacked)

    monkeypatch.setattr(tcpws.WebSocketTcpEndpoint, "receive_from_peer", measured)
    for mux in (stack.edge.registry.get("sb1").session, agent.session):  # type: ignore[union-attr]
        mux.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024
        )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    assert stack.edge is not None
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", stack.edge.admin_port))
    size = 64 * MIB
    async with open_ws(stack, hash_server.port, sock=sock, max_queue=1, max_size=None) as ws:
        await ws.send(b"hash %d\n" % size)
        await ws.send(b"")
        # not reading: wait until the edge stops getting more (its writes stall)
        await wait_until(lambda: peak["written"] > 0, 10, "the answer to start")
        last = -1
        for _ in range(120):  # at most a minute
            if peak["written"] == last:
                break
            last = peak["written"]
            await asyncio.sleep(0.5)
        assert 0 < peak["written"] < size // 4
        assert peak["buffered"] <= BUFFER_BOUND and peak["unacked"] <= WINDOW, peak
        received = await receive_all(ws)
    line, _, rest = received.partition(b"\n")
    assert line.decode() == hashlib.sha256(b"").hexdigest()
    assert len(rest) == size and hashlib.sha256(rest).hexdigest() == pattern_sha256(size, 2)
    assert peak["buffered"] <= BUFFER_BOUND and peak["unacked"] <= WINDOW, peak


async def test_a_bad_handshake_is_refused_before_any_stream(
    stack: Stack, hash_server: HashServer
) -> None:
    await stack.agent("sb1")
    assert stack.edge is not None
    head = (
        b"GET /v1/sandboxes/sb1/ports/%d/tcp HTTP/1.1\r\nhost: admin\r\n"
        b"authorization: Bearer %s\r\nconnection: upgrade\r\nupgrade: websocket\r\n"
        b"sec-websocket-version: 8\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    ) % (hash_server.port, stack.admin_token.encode())
    with anyio.fail_after(IO_TIMEOUT):
        async with await anyio.connect_tcp("127.0.0.1", stack.edge.admin_port) as conn:
            await conn.send(head)
            data = b""
            while b"}" not in data:
                data += await conn.receive()
    assert data.startswith(b"HTTP/1.1 426 ")
    assert b"sec-websocket-version: 13" in data.lower()
    bad_key = head.replace(b"version: 8", b"version: 13").replace(b"ZQ==", b"ZQ")
    with anyio.fail_after(IO_TIMEOUT):
        async with await anyio.connect_tcp("127.0.0.1", stack.edge.admin_port) as conn:
            await conn.send(bad_key)
            data = b""
            while b"}" not in data:
                data += await conn.receive()
    assert data.startswith(b"HTTP/1.1 400 ") and b'"INVALID_HANDSHAKE"' in data
    assert hash_server.ends == []  # no connection to the service was made


async def test_a_service_still_sending_after_the_clients_close_is_reset(
    stack: Stack, hash_server: HashServer
) -> None:
    """Bytes the service sends after the client's Close can no longer be delivered: its
    connection is reset (it must not take them for delivered); the client's close completes."""
    await stack.agent("sb1")
    async with open_ws(stack, hash_server.port) as ws:
        await ws.send(b"hash %d\n" % (64 * MIB))
        await ws.send(b"")
        await receive_until(ws, lambda b: len(b) > 100_000)  # the answer is flowing
        await ws.close()
        assert ws.close_code == 1000
    await wait_until(lambda: len(hash_server.ends) == 1, 10, "the service's end")
    (end,) = hash_server.ends
    assert end == "reset" or end.startswith("error: [Errno 32]"), end  # RST, or EPIPE after it


async def test_a_tcp_end_without_a_close_resets_the_service(
    stack: Stack, hash_server: HashServer
) -> None:
    await stack.agent("sb1")
    async with open_ws(stack, hash_server.port) as ws:
        await ws.send(b"hold 5\n")
        assert await receive_until(ws, lambda b: len(b) >= 5) == b"".join(pattern(5, seed=3))
        ws.transport.write_eof()  # a TCP FIN, no Close frame: not a clean end of a WebSocket
        await wait_until(lambda: hash_server.ends == ["reset"], 10, "the service to see a reset")


async def test_a_large_message_is_relayed_piece_by_piece(
    stack: Stack, hash_server: HashServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One 16 MiB message: the edge relays it as it arrives, never more than one socket read at
    a time (it never assembles a message), and the service gets every byte."""
    await stack.agent("sb1")
    pieces: list[int] = []
    original = StreamEndpoint.forward

    def measured(self: StreamEndpoint, data: memoryview | bytes) -> None:
        if isinstance(self, tcpws.WebSocketTcpEndpoint):
            pieces.append(len(data))
        original(self, data)

    monkeypatch.setattr(StreamEndpoint, "forward", measured)
    size = 16 * MIB
    async with open_ws(stack, hash_server.port) as ws:
        await ws.send(b"hash 0\n" + b"".join(pattern(size)))  # one message, one frame
        await ws.send(b"")
        line = (await receive_all(ws)).rstrip(b"\n")
    assert line.decode() == hashlib.sha256(b"".join(pattern(size))).hexdigest()
    assert sum(pieces) == size + len(b"hash 0\n")
    assert max(pieces) <= READ_SIZE and len(pieces) >= size // READ_SIZE
