"""HTTP/2 public connections at their edges (tunneld/h2public.py): how streams and connections
end when one side stops, cuts or misbehaves, and that what ends abnormally looks abnormal to the
client (RST_STREAM, never END_STREAM after a cut response) while nothing is left behind.

Everything is real: an in-process edge serving HTTPS (trustme certificates, ALPN ``h2``), a real
agent, services on 127.0.0.1 scripted per test (raw asyncio sockets, so a test decides exactly
what the service sends and when it closes or resets), and a client on the ``h2`` library over a
real TLS socket (``RawH2`` of test_http2.py), which sees every frame the edge sends."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import struct
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hyperframe.frame
import orjson
import pytest
import trustme

from tunneld import h2public
from tunneld.h2public import H2PublicConnection, PublicTlsConnection

from . import test_public_tls
from .conftest import Stack, wait_until
from .origin import pattern_sha256
from .test_http2 import RawH2, exposed_origin, ws_frame, ws_parse
from .test_public_tls import TOKEN, client_context, host_of, tls_stack

pytestmark = pytest.mark.anyio

ca = test_public_tls.ca  # the module's certificate authority fixture
stack = test_public_tls.stack  # an HTTPS stack with the default configuration

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
INTERNAL_ERROR = h2.errors.ErrorCodes.INTERNAL_ERROR

Script = Callable[["Service", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def ending(reader: asyncio.StreamReader, timeout: float = 15) -> str:
    """How the connection ends as its reader sees it: "eof" (FIN) or "reset" (RST)."""
    try:
        while await asyncio.wait_for(reader.read(65536), timeout):
            pass
    except ConnectionResetError:
        return "reset"
    return "eof"


def reset_now(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a crashing service's kernel does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Service:
    """A service in the sandbox scripted by the test: ``script(service, reader, writer)`` runs
    for each connection; ``ends`` collects what scripts report (how their connection ended);
    ``go`` is set by the test to let a script continue."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.server: asyncio.Server | None = None
        self.port = 0
        self.go = asyncio.Event()
        self.ends: list[str] = []
        self.heads: list[bytes] = []
        self.received: list[bytes] = []

    async def __aenter__(self) -> Service:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.go.set()
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.heads.append(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15))
            await self.script(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            writer.transport.abort()

    async def wait_go(self) -> None:
        await asyncio.wait_for(self.go.wait(), 20)


async def expose(stack: Stack, port: int) -> str:
    await stack.agent("sb1")
    return host_of((await stack.expose("sb1", port, token=TOKEN))["exposedAt"])


def the_h2_connection(stack: Stack) -> H2PublicConnection:
    assert stack.edge is not None
    (conn,) = [c for c in stack.edge.public_connections if isinstance(c, PublicTlsConnection)]
    assert isinstance(conn.h2, H2PublicConnection)
    return conn.h2


async def h2_connection_at_the_edge(stack: Stack) -> H2PublicConnection:
    """``the_h2_connection`` once the edge has it: the client's side of the TLS handshake can
    end (and its first request be sent) before the edge's side has made the connection."""

    def there() -> bool:
        assert stack.edge is not None
        return any(
            isinstance(c, PublicTlsConnection) and isinstance(c.h2, H2PublicConnection)
            for c in stack.edge.public_connections
        )

    await wait_until(there, what="the client's HTTP/2 connection at the edge")
    return the_h2_connection(stack)


def nothing_left(stack: Stack, conn: H2PublicConnection | None = None) -> bool:
    """No stream held anywhere at the edge: the h2 connection's table, the agent sessions'
    tunnel streams, the public connections and their per-IP counts."""
    assert stack.edge is not None
    return (
        (conn is None or (not conn.streams and not conn._waiting))
        and all(not s.streams for s in stack.edge.agent_connections)
        and not stack.edge.public_connections
        and not stack.edge.public_limits.per_ip
    )


class Seen:
    """What the client saw, per stream."""

    def __init__(self) -> None:
        self.heads: dict[int, dict[bytes, bytes]] = {}
        self.informational: dict[int, list[dict[bytes, bytes]]] = defaultdict(list)
        self.bodies: dict[int, bytearray] = defaultdict(bytearray)
        self.ended: set[int] = set()
        self.resets: dict[int, h2.errors.ErrorCodes | int] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False  # the edge closed the TCP connection
        self.pings: list[bytes] = []  # PING acknowledgements

    def over(self, sid: int) -> bool:
        return sid in self.ended or sid in self.resets


async def pump(
    client: RawH2, seen: Seen, until: Callable[[], bool], ack: bool = True, timeout: float = 20
) -> None:
    """Read events into ``seen`` until ``until()`` or the edge closes (bounded by ``timeout``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not until():
        left = deadline - loop.time()
        assert left > 0, "timed out waiting for the edge"
        try:
            event = await client.next_event(timeout=left)
        except ConnectionError:
            seen.closed = True
            return
        sid = getattr(event, "stream_id", 0)
        if isinstance(event, h2.events.InformationalResponseReceived):
            seen.informational[sid].append(dict(event.headers))
        elif isinstance(event, h2.events.ResponseReceived):
            seen.heads[sid] = dict(event.headers)
        elif isinstance(event, h2.events.DataReceived):
            seen.bodies[sid] += event.data
            if ack:
                client.conn.acknowledge_received_data(event.flow_controlled_length, sid)
                await client.send()
        elif isinstance(event, h2.events.StreamEnded):
            assert sid not in seen.resets, f"stream {sid}: END_STREAM after RST_STREAM"
            seen.ended.add(sid)
        elif isinstance(event, h2.events.StreamReset):
            seen.resets.setdefault(sid, event.error_code)
        elif isinstance(event, h2.events.ConnectionTerminated):
            seen.goaway = event
        elif isinstance(event, h2.events.PingAckReceived):
            seen.pings.append(event.ping_data)


async def hold_after_part(service: Service, reader: asyncio.StreamReader, writer) -> None:
    """A response announced as 1 MB of which 10 KB come, then nothing: a live stream."""
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n" + b"a" * 10_000)
    await writer.drain()
    service.ends.append(await ending(reader, 30))


# -- the client goes ---------------------------------------------------------------------------


async def test_client_goaway_lets_open_streams_finish_then_the_connection_closes(
    stack: Stack, ca: trustme.CA
) -> None:
    """The client's GOAWAY (no new streams): the streams it has open are served to their end,
    every byte, and then the edge closes the connection (GOAWAY, then close) instead of keeping
    it for keepalive_timeout (75 s here)."""
    n = 300_000
    body = os.urandom(n)

    async def script(service: Service, reader, writer) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % n + body[:1000])
        await writer.drain()
        await service.wait_go()
        writer.write(body[1000:])
        await writer.drain()
        service.ends.append(await ending(reader))

    async with Service(script) as service:
        host = await expose(stack, service.port)
        async with RawH2(stack, ca, host) as client:
            sids = [client.request(b"GET", b"/a"), client.request(b"GET", b"/b")]
            await client.send()
            seen = Seen()
            await pump(client, seen, lambda: all(len(seen.bodies[s]) >= 1000 for s in sids))
            conn = the_h2_connection(stack)
            # GOAWAY as frame bytes (the h2 library refuses to receive after its own GOAWAY)
            goaway = hyperframe.frame.GoAwayFrame(0)
            goaway.last_stream_id = 0
            assert client.writer is not None
            client.writer.write(goaway.serialize())
            client.conn.ping(b"after-ga")  # answered once the edge has read the GOAWAY
            await client.send()
            await pump(client, seen, lambda: b"after-ga" in seen.pings)
            assert not seen.closed and len(conn.streams) == 2  # nothing cut
            service.go.set()
            await pump(client, seen, lambda: seen.closed)
            for sid in sids:
                assert sid not in seen.resets, seen.resets
                assert sid in seen.ended, (
                    len(seen.bodies[sid]),
                    seen.goaway,
                    service.ends,
                    seen.closed,
                )
                assert bytes(seen.bodies[sid]) == body
            assert seen.goaway is not None
            assert seen.goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
        await wait_until(lambda: nothing_left(stack, conn), what="the edge to forget it all")


async def test_client_goaway_on_an_idle_connection_closes_it(stack: Stack, ca: trustme.CA) -> None:
    """The client's GOAWAY with no stream open: the edge answers GOAWAY and closes at once
    instead of keeping the connection for keepalive_timeout (75 s here)."""
    url, _ = await exposed_origin(stack)
    async with RawH2(stack, ca, host_of(url)) as client:
        sid = client.request(b"GET", b"/")
        await client.send()
        headers, _, last = await client.response(sid)
        assert headers[b":status"] == b"200" and isinstance(last, h2.events.StreamEnded)
        goaway = hyperframe.frame.GoAwayFrame(0)
        assert client.writer is not None
        client.writer.write(goaway.serialize())
        seen = Seen()
        await pump(client, seen, lambda: seen.closed)
        assert seen.goaway is not None
        assert seen.goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    await wait_until(lambda: nothing_left(stack), what="the edge to forget it all")


async def test_client_connection_lost_with_live_streams_resets_the_services_connections(
    stack: Stack, ca: trustme.CA
) -> None:
    """The client's TCP connection vanishes (no GOAWAY, no close_notify) with three responses
    in flight: each service connection is reset (the service must not take it for a client that
    got everything), and the edge keeps nothing of the connection or its streams."""
    async with Service(hold_after_part) as service:
        host = await expose(stack, service.port)
        async with RawH2(stack, ca, host) as client:
            sids = [client.request(b"GET", b"/") for _ in range(3)]
            await client.send()
            seen = Seen()
            await pump(client, seen, lambda: all(len(seen.bodies[s]) == 10_000 for s in sids))
            conn = the_h2_connection(stack)
            assert len(conn.streams) == 3
            assert client.writer is not None
            client.writer.transport.abort()
            await wait_until(lambda: len(service.ends) == 3, timeout=15, what="services' ends")
        assert service.ends == ["reset"] * 3
        await wait_until(lambda: nothing_left(stack, conn), what="the edge to forget it all")


# -- the edge goes -----------------------------------------------------------------------------


async def test_edge_shutdown_resets_live_streams_then_goaway_and_close(
    ca: trustme.CA, tmp_path: Path
) -> None:
    """Edge shutdown with responses in flight: each live stream gets RST_STREAM (never a clean
    END_STREAM: its response is cut), then GOAWAY and the close; a stream already answered in
    full on the same connection keeps its clean end; the services' connections are reset."""
    s = await tls_stack(ca, tmp_path)
    stopped = False
    try:
        async with Service(hold_after_part) as service:
            host = await expose(s, service.port)
            done = await s.origin()
            done_host = host_of((await s.expose("sb1", done.port, token="donetoken"))["exposedAt"])
            async with RawH2(s, ca, host) as client:
                live = [client.request(b"GET", b"/") for _ in range(2)]
                client.host = done_host
                complete = client.request(b"GET", b"/")
                await client.send()
                seen = Seen()
                await pump(
                    client,
                    seen,
                    lambda: (
                        complete in seen.ended and all(len(seen.bodies[x]) == 10_000 for x in live)
                    ),
                )
                assert s.edge is not None
                await s.edge.stop(grace=0.2)
                stopped = True
                await pump(client, seen, lambda: seen.closed)
            for sid in live:
                assert sid not in seen.ended, "a cut response ended like a complete one"
                assert seen.resets.get(sid) == INTERNAL_ERROR, seen.resets
            assert complete in seen.ended and complete not in seen.resets
            assert bytes(seen.bodies[complete]) == b"hello from origin"
            assert seen.goaway is not None
            await wait_until(lambda: len(service.ends) == 2, timeout=15, what="services' ends")
            assert service.ends == ["reset"] * 2
            assert not s.edge.public_connections
    finally:
        if stopped:
            s.edge = None  # stopped above: not twice
        await s.close()


# -- the service misbehaves ----------------------------------------------------------------------


PIECE = os.urandom(100_000)


async def bad_chunk(service: Service, reader, writer) -> None:
    """A chunked body whose second chunk size line is not hex: malformed mid-body."""
    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    writer.write(b"%x\r\n%s\r\nzz-not-a-size\r\n" % (len(PIECE), PIECE))
    await writer.drain()
    service.ends.append(await ending(reader))


async def chunk_then_reset(service: Service, reader, writer) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    writer.write(b"%x\r\n%s\r\n" % (len(PIECE), PIECE))
    await writer.drain()
    await service.wait_go()
    reset_now(writer)
    service.ends.append("reset by the service")


def tcp_state(writer: asyncio.StreamWriter) -> int:
    """The socket's TCP state (Linux TCP_INFO): 8 CLOSE_WAIT after the peer's FIN, 7 CLOSE
    after its RST."""
    sock = writer.get_extra_info("socket")
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


async def keeps_it_open(service: Service, reader, writer) -> None:
    """A complete response; then the edge's FIN is not answered: does a reset come?"""
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    await writer.drain()
    assert await ending(reader) == "eof"  # the FIN (the request said Connection: close)
    for _ in range(300):  # 15 s
        if tcp_state(writer) == 7:
            service.ends.append("reset")
            return
        await asyncio.sleep(0.05)
    service.ends.append("still open")


async def simple(service: Service, reader, writer) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    await writer.drain()
    service.ends.append(await ending(reader))


@pytest.mark.parametrize("script", [bad_chunk, chunk_then_reset], ids=["malformed", "reset"])
async def test_service_response_broken_mid_body_is_rst_stream(
    stack: Stack, ca: trustme.CA, script: Script
) -> None:
    """The service's response breaks after its head and part of its body (a chunk size line
    that is not one, or a TCP reset): the client gets RST_STREAM INTERNAL_ERROR after the bytes
    that were good, never END_STREAM; the connection keeps serving other streams."""

    async def dispatch(service: Service, reader, writer) -> None:
        if b"/other " in service.heads[-1]:
            await simple(service, reader, writer)
        else:
            await script(service, reader, writer)

    async with Service(dispatch) as service:
        host = await expose(stack, service.port)
        async with RawH2(stack, ca, host) as client:
            sid = client.request(b"GET", b"/")
            await client.send()
            seen = Seen()
            await pump(client, seen, lambda: len(seen.bodies[sid]) >= len(PIECE) or seen.over(sid))
            service.go.set()
            await pump(client, seen, lambda: seen.over(sid))
            assert seen.heads[sid][b":status"] == b"200"
            # what was good came through, or its head: what waited for the window is dropped
            assert seen.bodies[sid] and PIECE.startswith(seen.bodies[sid])
            assert sid not in seen.ended, "a broken response ended like a complete one"
            assert seen.resets[sid] == INTERNAL_ERROR
            other = client.request(b"GET", b"/other")
            await client.send()
            headers, body, last = await client.response(other)
            assert headers[b":status"] == b"200" and body == b"ok"
            assert isinstance(last, h2.events.StreamEnded)
            await wait_until(lambda: not the_h2_connection(stack).streams, what="streams gone")


async def test_complete_response_then_service_reset_is_delivered_whole(
    stack: Stack, ca: trustme.CA
) -> None:
    """The whole response reached the edge (Content-Length), but the client's window holds
    part of it back when the service resets its connection (as servers do when they close with
    an unread request body): the response is complete, so it is sent to its end with
    END_STREAM, not cut with RST_STREAM."""
    n = 100_000  # more than the client's 64 KiB window, less than the edge's queue bound
    body = os.urandom(n)

    async def script(service: Service, reader, writer) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (n, body))
        await writer.drain()
        await service.wait_go()
        reset_now(writer)

    async with Service(script) as service:
        host = await expose(stack, service.port)
        async with RawH2(stack, ca, host) as client:  # a 65,535-byte window
            sid = client.request(b"GET", b"/")
            await client.send()
            conn = await h2_connection_at_the_edge(stack)
            await wait_until(lambda: sid in conn.streams, what="the stream at the edge")
            stream = conn.streams[sid]
            await wait_until(
                lambda: stream.response_done and stream.outbound_size > 0,
                timeout=10,
                what="the whole response at the edge, part of it waiting for the window",
            )
            service.go.set()
            await wait_until(lambda: stream.closing, timeout=10, what="the tunnel stream's reset")
            headers, received, last = await client.response(sid)
            assert headers[b":status"] == b"200"
            assert received == body
            assert isinstance(last, h2.events.StreamEnded), last
        await wait_until(lambda: nothing_left(stack, conn), what="the edge to forget it all")


async def test_service_that_keeps_its_connection_after_a_complete_response_is_reset(
    stack: Stack, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service was told ``Connection: close`` and got FIN after its complete response, but
    keeps its connection open: after FINISH_GRACE the tunnel stream is reset (the service's
    connection with it) and the edge forgets the stream; the client had its clean end."""
    monkeypatch.setattr(h2public, "FINISH_GRACE", 0.3)
    async with Service(keeps_it_open) as service:
        host = await expose(stack, service.port)
        async with RawH2(stack, ca, host) as client:
            sid = client.request(b"GET", b"/")
            await client.send()
            headers, body, last = await client.response(sid)
            assert headers[b":status"] == b"200" and body == b"ok"
            assert isinstance(last, h2.events.StreamEnded)
            conn = the_h2_connection(stack)
            await wait_until(lambda: len(service.ends) == 1, timeout=20, what="service's end")
            assert service.ends == ["reset"]
            await wait_until(lambda: not conn.streams, what="the stream forgotten")
            assert all(not s.streams for s in stack.edge.agent_connections)


async def test_informational_responses_are_relayed_as_h2_informational_headers(
    stack: Stack, ca: trustme.CA
) -> None:
    """1xx responses of the service (103 Early Hints; 100 Continue to ``Expect: 100-continue``)
    reach the client as informational HEADERS before the final response."""
    upload = os.urandom(50_000)

    async def script(service: Service, reader, writer) -> None:
        head = service.heads[-1]
        if head.startswith(b"GET "):
            writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n")
            await writer.drain()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhints")
        else:
            assert b"\r\nexpect: 100-continue\r\n" in head.lower()
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            data = await asyncio.wait_for(reader.readexactly(len(upload)), 15)
            answer = hashlib.sha256(data).hexdigest().encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(answer), answer))
        await writer.drain()
        service.ends.append(await ending(reader))

    async with Service(script) as service:
        host = await expose(stack, service.port)
        async with RawH2(stack, ca, host) as client:
            seen = Seen()
            sid = client.request(b"GET", b"/page")
            await client.send()
            await pump(client, seen, lambda: seen.over(sid))
            assert seen.informational[sid] == [
                {b":status": b"103", b"link": b"</style.css>; rel=preload"}
            ]
            assert seen.heads[sid][b":status"] == b"200" and bytes(seen.bodies[sid]) == b"hints"
            assert sid in seen.ended
            post = client.request(
                b"POST",
                b"/upload",
                [(b"content-length", b"%d" % len(upload)), (b"expect", b"100-continue")],
                end=False,
            )
            await client.send()
            await pump(client, seen, lambda: bool(seen.informational[post]) or seen.over(post))
            assert seen.informational[post] == [{b":status": b"100"}]
            assert post not in seen.heads  # the final answer waits for the body
            await client.send_body(post, upload, end=True)
            await pump(client, seen, lambda: seen.over(post))
            assert seen.heads[post][b":status"] == b"200"
            assert bytes(seen.bodies[post]) == hashlib.sha256(upload).hexdigest().encode()
            assert post in seen.ended and post not in seen.resets


# -- WebSockets over extended CONNECT (RFC 8441) -------------------------------------------------


def accept_upgrade(writer: asyncio.StreamWriter, head: bytes) -> None:
    key = next(
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    )
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n"
        b"sec-websocket-accept: %s\r\n\r\n" % accept
    )


def server_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes([0x80 | opcode, n]) + payload
    if n < 65536:
        return bytes([0x80 | opcode, 126]) + struct.pack("!H", n) + payload
    return bytes([0x80 | opcode, 127]) + struct.pack("!Q", n) + payload


async def open_websocket(client: RawH2) -> int:
    while client.conn.remote_settings.enable_connect_protocol != 1:
        await client.next_event()
    sid = client.request(
        b"CONNECT",
        b"/ws",
        [(b":protocol", b"websocket"), (b"sec-websocket-version", b"13")],
        end=False,
    )
    await client.send()
    return sid


async def test_websocket_service_closes_its_side_end_stream_after_queued_data(
    stack: Stack, ca: trustme.CA
) -> None:
    """The service sends 100 KB of WebSocket frames and then FIN while most of it still waits
    at the edge for the client's window: the client gets every byte, then END_STREAM (no
    reset); its own frames and END_STREAM still reach the service (half-close both ways)."""
    message = os.urandom(100_000)
    to_service = os.urandom(70_000)

    async def script(service: Service, reader, writer) -> None:
        accept_upgrade(writer, service.heads[-1])
        writer.write(server_frame(message))
        await writer.drain()
        writer.write_eof()
        received = bytearray()
        while chunk := await asyncio.wait_for(reader.read(65536), 15):
            received += chunk
        service.received.append(bytes(received))
        service.ends.append("eof")

    async with Service(script) as service:
        host = await expose(stack, service.port)
        async with RawH2(stack, ca, host) as client:  # a 65,535-byte window
            sid = await open_websocket(client)
            seen = Seen()
            await pump(client, seen, lambda: sid in seen.heads or seen.over(sid), ack=False)
            assert seen.heads[sid][b":status"] == b"200"
            conn = the_h2_connection(stack)
            stream = conn.streams[sid]
            await wait_until(
                lambda: stream.end_after and stream.outbound_size > 0,
                timeout=10,
                what="the service's FIN at the edge with data still queued",
            )
            await pump(client, seen, lambda: seen.over(sid))
            assert sid in seen.ended and sid not in seen.resets
            buf = bytearray(seen.bodies[sid])
            assert ws_parse(buf) == (0x2, message) and not buf
            frame = ws_frame(to_service, 0x2)
            await client.send_body(sid, frame, end=True)
            await wait_until(lambda: service.ends, timeout=10, what="the service's EOF")
            assert service.received == [frame]
        await wait_until(lambda: nothing_left(stack, conn), what="the edge to forget it all")


async def test_websocket_service_reset_is_rst_stream(stack: Stack, ca: trustme.CA) -> None:
    """A WebSocket whose service resets its connection mid-conversation: RST_STREAM, not the
    END_STREAM of a WebSocket that ended normally; the connection serves on."""

    async def script(service: Service, reader, writer) -> None:
        if b"upgrade: websocket" not in service.heads[-1].lower():
            await simple(service, reader, writer)
            return
        accept_upgrade(writer, service.heads[-1])
        writer.write(server_frame(b"hello"))
        await writer.drain()
        await service.wait_go()
        reset_now(writer)

    async with Service(script) as service:
        host = await expose(stack, service.port)
        async with RawH2(stack, ca, host) as client:
            sid = await open_websocket(client)
            seen = Seen()
            await pump(client, seen, lambda: len(seen.bodies[sid]) >= 7 or seen.over(sid))
            assert seen.heads[sid][b":status"] == b"200"
            assert ws_parse(bytearray(seen.bodies[sid])) == (0x2, b"hello")
            service.go.set()
            await pump(client, seen, lambda: seen.over(sid))
            assert sid not in seen.ended, "a reset WebSocket ended like a closed one"
            assert seen.resets[sid] == INTERNAL_ERROR
            other = client.request(b"GET", b"/")
            await client.send()
            headers, body, _ = await client.response(other)
            assert headers[b":status"] == b"200" and body == b"ok"
            conn = the_h2_connection(stack)
            await wait_until(lambda: not conn.streams, what="streams gone")


# -- malformed requests ----------------------------------------------------------------------------


def unchecked_client(stack: Stack, ca: trustme.CA, host: str) -> RawH2:
    """A RawH2 whose h2 library sends header blocks as given (no outbound validation)."""
    client = RawH2(stack, ca, host)
    client.conn = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
    )
    return client


async def test_requests_that_fit_no_http1_request_line_are_400_and_the_connection_serves_on(
    stack: Stack, ca: trustme.CA
) -> None:
    """Header blocks the h2 library lets through but that make no HTTP/1.1 request (plain
    CONNECT, extended CONNECT for another protocol, a :path, :method or :authority that is no
    request-line part): each stream is answered 400 BAD_REQUEST and ended, nothing reaches the
    service, and the connection serves the next stream. ``host`` instead of ``:authority``
    (RFC 9113 8.3.1 allows it) is routed like :authority."""
    origin = await stack.origin()
    await stack.agent("sb1")
    host = host_of((await stack.expose("sb1", origin.port, token=TOKEN))["exposedAt"])
    bad = {
        "plain CONNECT": [(b":method", b"CONNECT"), (b":authority", host.encode())],
        "CONNECT for another protocol": [
            (b":method", b"CONNECT"),
            (b":protocol", b"h2c"),
            (b":scheme", b"https"),
            (b":authority", host.encode()),
            (b":path", b"/"),
        ],
        ":path not origin-form": [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", host.encode()),
            (b":path", b"*"),
        ],
        ":path in absolute-form": [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", host.encode()),
            (b":path", b"https://other.test/"),
        ],
        ":method not a token": [
            (b":method", b"GE T"),
            (b":scheme", b"https"),
            (b":authority", host.encode()),
            (b":path", b"/"),
        ],
        ":authority with a space": [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", b"a b"),
            (b":path", b"/"),
        ],
    }
    async with unchecked_client(stack, ca, host) as client:
        while client.conn.remote_settings.enable_connect_protocol != 1:
            await client.next_event()
        for what, headers in bad.items():
            sid = client.conn.get_next_available_stream_id()
            client.conn.send_headers(sid, headers, end_stream=not what.endswith("CONNECT"))
            await client.send()
            answer, body, last = await client.response(sid)
            assert answer[b":status"] == b"400", what
            assert orjson.loads(body)["code"] == "BAD_REQUEST", what
            assert isinstance(last, h2.events.StreamEnded), what
            good = client.request(b"GET", b"/")  # the connection serves on
            await client.send()
            answer, body, _ = await client.response(good)
            assert answer[b":status"] == b"200" and body == b"hello from origin", what
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(
            sid,
            [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":path", b"/"),
                (b"host", host.encode()),
            ],
            end_stream=True,
        )
        await client.send()
        answer, body, _ = await client.response(sid)
        assert answer[b":status"] == b"200" and body == b"hello from origin"
    assert origin.requests == len(bad) + 1


# Header blocks h2's checks reject (RFC 9113 8.2, 8.3) are stream errors: 400 on their stream,
# the connection serves on (tests/faults/test_h2_malformed_stream.py).


# -- a client that stops reading -------------------------------------------------------------------


class SmallBufferH2(RawH2):
    """A RawH2 on a socket with a small receive buffer and big h2 windows: what the edge sends
    is held by TCP (the client's TCP window), not by HTTP/2 flow control."""

    async def __aenter__(self) -> SmallBufferH2:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        sock.setblocking(False)
        await asyncio.wait_for(
            asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port)), 10
        )
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(
                sock=sock,
                ssl=client_context(self.ca, ["h2"]),
                server_hostname=self.host.rpartition(":")[0],
            ),
            10,
        )
        self.conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.window},
        )
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(2**31 - 1 - 65535)  # the connection's window
        await self.send()
        return self


async def test_client_that_stops_reading_then_resumes_gets_every_byte(
    stack: Stack, ca: trustme.CA
) -> None:
    """Two streams of 24 MiB, windows wide open: the client stops reading until the edge's TLS
    transport is full (pause_writing) and then reads again; resume_writing restarts both
    streams and every byte arrives (sha256), each stream with END_STREAM."""
    n = 24 << 20
    origin = await stack.origin()
    await stack.agent("sb1")
    host = host_of((await stack.expose("sb1", origin.port, token=TOKEN))["exposedAt"])
    async with SmallBufferH2(stack, ca, host, window=2**31 - 1) as client:
        sids = [client.request(b"GET", b"/bytes?n=%d&seed=%d" % (n, i)) for i in (1, 2)]
        await client.send()
        seen = Seen()
        await pump(client, seen, lambda: all(s in seen.heads for s in sids))
        conn = the_h2_connection(stack)
        await wait_until(
            lambda: conn._write_paused, timeout=20, what="the edge's TLS transport to fill up"
        )
        await pump(client, seen, lambda: all(seen.over(s) for s in sids), timeout=120)
        for i, sid in zip((1, 2), sids, strict=True):
            assert sid in seen.ended and sid not in seen.resets
            assert hashlib.sha256(seen.bodies[sid]).hexdigest() == pattern_sha256(n, i)
        assert not conn._write_paused


async def test_stream_window_updates_restart_a_waiting_stream(stack: Stack, ca: trustme.CA) -> None:
    """Only the stream's own window holds the response back (the connection's is 2 GiB): each
    WINDOW_UPDATE the client sends for the stream restarts its queued output, to the end."""
    n = 3_000_000
    url, _ = await exposed_origin(stack)
    async with SmallBufferH2(stack, ca, host_of(url), window=65535) as client:
        sid = client.request(b"GET", b"/bytes?n=%d&seed=5" % n)
        await client.send()
        headers, body, last = await client.response(sid)
        assert headers[b":status"] == b"200" and isinstance(last, h2.events.StreamEnded)
        assert hashlib.sha256(body).hexdigest() == pattern_sha256(n, 5)


# -- early answers, second upgrades, late writes ---------------------------------------------------


def window_whole(conn: H2PublicConnection) -> bool:
    """Every byte the client sent on the connection is accounted for at the edge: what is open
    in its receive window plus what was acknowledged but not yet announced is the whole window
    (nothing received is waiting for a stream that will never take it)."""
    manager = conn.h2._inbound_flow_control_window_manager
    return manager.current_window_size + manager._bytes_processed == manager.max_window_size


async def test_early_answer_drops_the_unread_upload_without_losing_connection_window(
    stack: Stack, ca: trustme.CA
) -> None:
    """A service answers 413 before reading the upload while request DATA is still queued at the
    edge (the tunnel took all it could): the queued DATA is dropped, and its flow-control credit
    goes back to the client's connection window. Done until more than a whole connection window
    was dropped so, had one byte of it been kept, the client could not upload any more; then a
    stream on the same connection uploads more than a connection window, every byte."""
    final = os.urandom(h2public.CONNECTION_WINDOW + 500_000)

    async def script(service: Service, reader, writer) -> None:
        head = service.heads[-1]
        if head.startswith(b"POST /final "):
            n = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            digest = hashlib.sha256(await asyncio.wait_for(reader.readexactly(n), 15))
            answer = digest.hexdigest().encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(answer), answer))
        else:
            await service.wait_go()  # the upload is not read
            service.go.clear()
            writer.write(b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 9\r\n\r\ntoo large")
        await writer.drain()
        service.ends.append(await ending(reader))

    async with Service(script) as service:
        assert service.server is not None
        # a small receive buffer: the service's socket holds little of what it does not read
        service.server.sockets[0].setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        host = await expose(stack, service.port)
        async with RawH2(stack, ca, host) as client:
            seen = Seen()
            loop = asyncio.get_running_loop()
            chunk = os.urandom(16384)
            dropped = 0
            for _ in range(
                12
            ):  # bounded (a round drops a stream window's worth, less what was taken)
                if dropped > h2public.CONNECTION_WINDOW:
                    break
                sid = client.request(
                    b"POST", b"/early", [(b"content-length", b"%d" % (100 << 20))], end=False
                )
                await client.send()
                conn = await h2_connection_at_the_edge(stack)
                deadline = loop.time() + 30
                answered = False
                while not seen.over(sid):
                    assert loop.time() < deadline, "the upload never got its early answer"
                    if answered:
                        await pump(client, seen, lambda s=sid: seen.over(s))
                        continue
                    window = min(
                        client.conn.local_flow_control_window(sid),
                        client.conn.max_outbound_frame_size,
                    )
                    if window > 0:
                        client.conn.send_data(sid, chunk[:window])
                        await client.send()
                        continue
                    stream = conn.streams.get(sid)
                    if stream is not None and stream.inbound and not stream.reading:
                        # request DATA queued at the edge: now the service answers early
                        answered = True
                        dropped += sum(flow for _, flow in stream.inbound)
                        service.go.set()
                        continue
                    try:  # the windows are closed: what did the edge send meanwhile?
                        event = await client.next_event(timeout=0.05)
                    except TimeoutError:
                        continue
                    client.events.insert(0, event)
                    await pump(client, seen, lambda: not client.events)
                assert seen.heads[sid][b":status"] == b"413", seen.heads.get(sid)
                assert bytes(seen.bodies[sid]) == b"too large" and sid in seen.ended
                client.conn.ping(b"round%03d" % sid)  # the edge has read all the client sent
                await client.send()
                await pump(client, seen, lambda s=sid: b"round%03d" % s in seen.pings)
                assert window_whole(conn), "request DATA dropped without giving its window back"
                await wait_until(lambda c=conn: not c.streams, what="the round's stream forgotten")
            assert dropped > h2public.CONNECTION_WINDOW
            sid = client.request(
                b"POST", b"/final", [(b"content-length", b"%d" % len(final))], end=False
            )
            await client.send()
            await client.send_body(sid, final, end=True)
            headers, body, last = await client.response(sid)
            assert headers[b":status"] == b"200" and isinstance(last, h2.events.StreamEnded)
            assert body == hashlib.sha256(final).hexdigest().encode()
            await wait_until(lambda: not conn.streams, what="streams gone")
        await wait_until(lambda: nothing_left(stack, conn), what="the edge to forget it all")


async def test_websocket_second_101_after_the_switch_is_relayed_as_data(
    stack: Stack, ca: trustme.CA
) -> None:
    """A WebSocket whose service sends a second ``101`` head after the first (in the same write,
    and again later): the stream switched to raw at the first one, so the client gets one
    ``:status 200`` and every later byte, second heads included, as DATA, unparsed; the
    WebSocket then ends cleanly both ways."""
    again = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"

    async def script(service: Service, reader, writer) -> None:
        accept_upgrade(writer, service.heads[-1])
        writer.write(again + server_frame(b"one"))  # one write with the first 101
        await writer.drain()
        await service.wait_go()
        writer.write(again + server_frame(b"two"))
        await writer.drain()
        received = bytearray()
        while chunk := await asyncio.wait_for(reader.read(65536), 15):
            received += chunk
        service.received.append(bytes(received))
        writer.write_eof()
        await service.wait_go()

    async with Service(script) as service:
        host = await expose(stack, service.port)
        async with RawH2(stack, ca, host) as client:
            sid = await open_websocket(client)
            seen = Seen()
            first = again + server_frame(b"one")
            await pump(client, seen, lambda: len(seen.bodies[sid]) >= len(first) or seen.over(sid))
            assert seen.heads[sid][b":status"] == b"200"
            assert not seen.informational[sid]
            assert bytes(seen.bodies[sid]) == first
            service.go.set()
            both = first + again + server_frame(b"two")
            await pump(client, seen, lambda: len(seen.bodies[sid]) >= len(both) or seen.over(sid))
            assert bytes(seen.bodies[sid]) == both
            service.go.clear()
            frame = ws_frame(b"bye", 0x2)
            await client.send_body(sid, frame, end=True)
            await wait_until(lambda: service.received, timeout=10, what="the service's EOF")
            assert service.received == [frame]
            await pump(client, seen, lambda: seen.over(sid))
            assert sid in seen.ended and sid not in seen.resets
            assert bytes(seen.bodies[sid]) == both
            conn = the_h2_connection(stack)
            await wait_until(lambda: not conn.streams, what="the stream forgotten")
            service.go.set()
        await wait_until(lambda: nothing_left(stack, conn), what="the edge to forget it all")


async def test_websocket_client_ends_first_then_the_services_last_bytes_then_end_stream(
    stack: Stack, ca: trustme.CA
) -> None:
    """RFC 8441 WebSocket, the client ends its side first (a frame with END_STREAM): the service
    reads that frame, then EOF; only then it sends its last frame and ends its side. The last
    frame reaches the client, then END_STREAM (no reset), and the edge forgets the stream and
    its tunnel stream."""
    last = os.urandom(100_000)  # more than the client's window: part waits at the edge

    async def script(service: Service, reader, writer) -> None:
        accept_upgrade(writer, service.heads[-1])
        await writer.drain()
        received = bytearray()
        while chunk := await asyncio.wait_for(reader.read(65536), 15):
            received += chunk
        service.received.append(bytes(received))  # EOF: the client's END_STREAM
        writer.write(server_frame(last))
        await writer.drain()
        writer.write_eof()
        service.ends.append("eof")
        await service.wait_go()

    async with Service(script) as service:
        host = await expose(stack, service.port)
        async with RawH2(stack, ca, host) as client:
            sid = await open_websocket(client)
            seen = Seen()
            await pump(client, seen, lambda: sid in seen.heads or seen.over(sid))
            assert seen.heads[sid][b":status"] == b"200"
            frame = ws_frame(b"goodbye", 0x1)
            await client.send_body(sid, frame, end=True)
            await wait_until(lambda: service.ends, timeout=10, what="the service's EOF")
            assert service.received == [frame]
            assert not seen.bodies[sid] and not seen.over(sid)  # nothing from the service yet
            await pump(client, seen, lambda: seen.over(sid))
            assert sid in seen.ended and sid not in seen.resets
            buf = bytearray(seen.bodies[sid])
            assert ws_parse(buf) == (0x2, last) and not buf
            conn = the_h2_connection(stack)
            assert stack.edge is not None
            await wait_until(
                lambda: (
                    not conn.streams and all(not s.streams for s in stack.edge.agent_connections)
                ),
                what="the stream and its tunnel stream forgotten",
            )
            service.go.set()
        await wait_until(lambda: nothing_left(stack, conn), what="the edge to forget it all")


def peek(sock: object) -> bytes:
    """What waits unread in a socket's receive queue (read through a duplicate descriptor)."""
    fileno = sock.fileno()  # type: ignore[attr-defined]
    with socket.fromfd(fileno, socket.AF_INET, socket.SOCK_STREAM) as dup:
        try:
            return dup.recv(1 << 20, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return b""


async def test_late_response_bytes_after_the_clients_reset_are_dropped(
    stack: Stack, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client resets a stream whose response is live, and in the same loop iteration the
    tunnel brings the service's last chunk (the rest of the response, to its end): the edge
    drops it (the stream is over for the client), so the cut response does not turn into a
    complete one on the service's side either: the service sees its connection reset, not the
    clean FIN of a delivered response. No error, nothing kept, and the connection serves on.

    The same iteration is arranged: the edge stops reading the tunnel until the chunk waits in
    its socket and the client's RST_STREAM in the TLS socket, then reads both."""
    writes: list[bool] = []  # for each write of a stream: was the stream closing?
    write = h2public._StreamTransport.write

    def spy(self: h2public._StreamTransport, data: bytes) -> None:
        writes.append(self.closing)
        write(self, data)

    monkeypatch.setattr(h2public._StreamTransport, "write", spy)
    tail = os.urandom(3000).hex().encode()

    async def script(service: Service, reader, writer) -> None:
        if b"/other " in service.heads[-1]:
            await simple(service, reader, writer)
            return
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await service.wait_go()
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail))
        await writer.drain()
        service.ends.append(await ending(reader))

    async with Service(script) as service:
        host = await expose(stack, service.port)
        async with RawH2(stack, ca, host) as client:
            sid = client.request(b"GET", b"/")
            await client.send()
            seen = Seen()
            await pump(client, seen, lambda: bytes(seen.bodies[sid]) == b"hello")
            conn = the_h2_connection(stack)
            assert stack.edge is not None and conn.transport is not None
            (session,) = stack.edge.agent_connections
            assert session.transport is not None
            session.transport.pause_reading()
            writes.clear()
            service.go.set()
            tunnel = session.transport.get_extra_info("socket")
            await wait_until(lambda: tail in peek(tunnel), timeout=10, what="the chunk at the edge")
            client.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            assert client.writer is not None
            client.writer.write(client.conn.data_to_send())
            tls = conn.transport.get_extra_info("socket")
            for _ in range(1000):  # no await: the edge must not read it before the tunnel
                if peek(tls):
                    break
                time.sleep(0.001)
            assert peek(tls), "the RST_STREAM did not reach the edge's socket"
            session.transport.resume_reading()
            await wait_until(lambda: service.ends, timeout=15, what="the service's end")
            assert True in writes, "the late chunk did not meet the closed stream"
            assert service.ends == ["reset"]
            assert bytes(seen.bodies[sid]) == b"hello" and sid not in seen.ended
            other = client.request(b"GET", b"/other")
            await client.send()
            headers, body, last = await client.response(other)
            assert headers[b":status"] == b"200" and body == b"ok"
            assert isinstance(last, h2.events.StreamEnded)
            await wait_until(lambda: not conn.streams, what="streams gone")
        await wait_until(lambda: nothing_left(stack, conn), what="the edge to forget it all")
