"""HTTP/2 on the HTTPS public listener (tunneld/h2public.py): each h2 stream is one tunnel
stream speaking HTTP/1.1 to the service, flow control tied to the tunnel's credit.

Clients: httpx with ``http2=True`` (the h2 library on the client side), raw h2 connections
where the test must control windows or see frames (a stream reset, a client that stops
reading), ``websockets``' origin for RFC 8441, and ``curl --http2`` (Debian's curl is built
with nghttp2) against real ``tunneld`` / ``tunnel-agent`` processes."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import httpx
import orjson
import pytest
import trustme
import websockets
from websockets.asyncio.server import serve

from protocol.frames import DEFAULT_MAX_STREAM_WINDOW, MAX_FRAME_PAYLOAD
from tunneld import h2public
from tunneld.h2public import H2PublicConnection, PublicTlsConnection

from . import test_public_tls
from .conftest import Stack, wait_until
from .origin import OriginThread, pattern, pattern_sha256
from .procs import Processes, admin_client, is_connected, wait_for
from .test_backpressure import AGENT_STREAM_BOUND
from .test_public_tls import DOMAIN, TOKEN, _Loopback, client_context, host_of, tls_stack

pytestmark = pytest.mark.anyio


# the certificate authority and the HTTPS stack of tests/e2e/test_public_tls.py
ca = test_public_tls.ca
stack = test_public_tls.stack


def h2_client(stack: Stack, ca: trustme.CA, url: str, **kwargs: object) -> httpx.AsyncClient:
    assert stack.edge is not None
    return httpx.AsyncClient(
        base_url=f"https://{host_of(url)}",
        timeout=30,
        transport=_Loopback(stack.edge.public_port, verify=client_context(ca), http2=True),
        **kwargs,  # type: ignore[arg-type]
    )


async def exposed_origin(stack: Stack, token: str = TOKEN) -> tuple[str, object]:
    origin = await stack.origin()
    await stack.agent("sb1")
    url = (await stack.expose("sb1", origin.port, token=token))["exposedAt"]
    return url, origin


async def test_get_and_post_over_h2(stack: Stack, ca: trustme.CA) -> None:
    url, _ = await exposed_origin(stack)
    async with h2_client(stack, ca, url) as client:
        r = await client.get("/")
        assert r.http_version == "HTTP/2" and r.status_code == 200
        assert r.content == b"hello from origin"
        r = await client.get("/bytes", params={"n": 3_000_000})
        assert r.status_code == 200 and r.headers["content-length"] == "3000000"
        assert hashlib.sha256(r.content).hexdigest() == pattern_sha256(3_000_000)
        r = await client.get("/chunked", params={"n": 1_000_000, "seed": 7})
        assert "transfer-encoding" not in r.headers  # chunked framing decoded, not relayed
        assert hashlib.sha256(r.content).hexdigest() == pattern_sha256(1_000_000, 7)
        body = os.urandom(2_000_000)
        r = await client.post("/upload", content=body)  # content-length
        assert r.json() == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}

        async def pieces() -> AsyncIterator[bytes]:
            for i in range(20):
                yield body[i * 100_000 : (i + 1) * 100_000]

        r = await client.post("/upload", content=pieces())  # no length: chunked to the service
        assert r.json() == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        r = await client.post("/echo", content=b"echo me")
        assert r.content == b"echo me"


class RawH2:
    """An HTTP/2 client on the h2 library where the test decides windows and sees frames."""

    def __init__(self, stack: Stack, ca: trustme.CA, host: str, window: int = 65535) -> None:
        assert stack.edge is not None
        self.port = stack.edge.public_port
        self.ca = ca
        self.host = host  # authority, with the port
        self.window = window
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.events: list[h2.events.Event] = []
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> RawH2:
        context = client_context(self.ca, ["h2"])
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1", self.port, ssl=context, server_hostname=self.host.rpartition(":")[0]
            ),
            10,
        )
        assert self.writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        self.conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.window},
        )
        self.conn.initiate_connection()
        await self.send()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.writer is not None
        self.writer.close()

    async def send(self) -> None:
        assert self.writer is not None
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    def request(
        self, method: bytes, path: bytes, extra: list[tuple[bytes, bytes]] = (), end: bool = True
    ) -> int:
        sid = self.conn.get_next_available_stream_id()
        headers = [
            (b":method", method),
            (b":scheme", b"https"),
            (b":authority", self.host.encode()),
            (b":path", path),
            *extra,
        ]
        self.conn.send_headers(sid, headers, end_stream=end)
        return sid

    async def send_body(self, sid: int, data: bytes, end: bool = False) -> None:
        """Send ``data`` within the edge's windows (events read meanwhile are kept)."""
        assert self.reader is not None
        view = memoryview(data)
        while view:
            n = min(len(view), self.conn.local_flow_control_window(sid))
            n = min(n, self.conn.max_outbound_frame_size)
            if n > 0:
                self.conn.send_data(sid, bytes(view[:n]))
                view = view[n:]
                await self.send()
                continue
            more = await asyncio.wait_for(self.reader.read(65536), 10)
            if not more:
                raise ConnectionError("the edge closed the connection")
            self.events += self.conn.receive_data(more)
            await self.send()
        if end:
            self.conn.end_stream(sid)
            await self.send()

    async def next_event(self, timeout: float = 10) -> h2.events.Event:
        assert self.reader is not None
        while not self.events:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                raise ConnectionError("the edge closed the connection")
            self.events += self.conn.receive_data(data)
            await self.send()
        return self.events.pop(0)

    async def response(self, sid: int) -> tuple[dict[bytes, bytes], bytes, h2.events.Event]:
        """Headers, body and the stream's last event (StreamEnded or StreamReset)."""
        headers: dict[bytes, bytes] = {}
        body = bytearray()
        while True:
            event = await self.next_event()
            if getattr(event, "stream_id", None) != sid:
                continue
            if isinstance(event, h2.events.ResponseReceived):
                headers = dict(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                body += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
                await self.send()
            elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                return headers, bytes(body), event


async def test_many_concurrent_streams_on_one_connection(stack: Stack, ca: trustme.CA) -> None:
    url, origin = await exposed_origin(stack)
    async with h2_client(stack, ca, url) as client:
        assert (await client.get("/")).http_version == "HTTP/2"
        results = await asyncio.gather(
            *(client.get("/bytes", params={"n": 100_000, "seed": i}) for i in range(60))
        )
        for i, r in enumerate(results):
            assert r.status_code == 200
            assert hashlib.sha256(r.content).hexdigest() == pattern_sha256(100_000, i)
    # one h2 connection carried them all, each request on a tunnel stream of its own
    assert origin.requests == 61 and origin.connections == 61
    assert stack.edge is not None and stack.edge.metrics is not None


async def test_one_connection_many_streams_counts_once(stack: Stack, ca: trustme.CA) -> None:
    """The h2 connection is one public connection (limits, metrics); its streams are not."""
    url, _ = await exposed_origin(stack)
    assert stack.edge is not None
    async with RawH2(stack, ca, host_of(url)) as client:
        sids = [client.request(b"GET", b"/") for _ in range(20)]
        await client.send()
        for sid in sids:
            headers, body, last = await client.response(sid)
            assert headers[b":status"] == b"200" and body == b"hello from origin"
            assert isinstance(last, h2.events.StreamEnded)
        conns = list(stack.edge.public_connections)
        assert len(conns) == 1 and isinstance(conns[0], PublicTlsConnection)
        assert isinstance(conns[0].h2, H2PublicConnection)
        await wait_until(lambda: not conns[0].h2.streams, what="streams of the connection gone")


async def test_headers_rebuilt_and_spoofed_internal_headers_dropped(
    stack: Stack, ca: trustme.CA
) -> None:
    url, _ = await exposed_origin(stack)
    host = host_of(url)
    spoofed = {
        "x-forwarded-for": "6.6.6.6",
        "x-forwarded-host": "evil.test",
        "x-forwarded-proto": "http",
        "x-sandbox-name": "other",
        "x-tunnel-secret": "1",
        "forwarded": "for=6.6.6.6",
        "x-real-ip": "6.6.6.6",
        "x_forwarded_for": "6.6.6.6",
        "x-kept": "yes",
    }
    async with h2_client(stack, ca, url) as client:
        r = await client.get("/headers", headers=spoofed)
    assert r.http_version == "HTTP/2"
    pairs = r.json()
    names = [n for n, _ in pairs]
    seen = dict(pairs)
    assert seen["host"] == f"localhost:{stack.origins[0].port}"
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-host"] == host.rpartition(":")[0]  # the :authority httpx sent
    assert seen["x-sandbox-name"] == "sb1"
    assert seen["x-kept"] == "yes"
    assert seen["connection"] == "close"  # one request per tunnel stream
    for name in ("x-tunnel-secret", "forwarded", "x-real-ip", "x_forwarded_for"):
        assert name not in names
    for name in ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-sandbox-name"):
        assert names.count(name) == 1
    assert not any(n.startswith(":") for n in names)


async def test_wrong_token_and_unknown_host_are_404_pages(stack: Stack, ca: trustme.CA) -> None:
    url, _ = await exposed_origin(stack)
    host = host_of(url)
    wrong = host.replace(TOKEN, "wrongtoken0")
    async with h2_client(stack, ca, url.replace(host, wrong)) as client:
        r = await client.get("/")
        assert r.http_version == "HTTP/2" and r.status_code == 404
        assert r.json()["code"] == "INVALID_TOKEN"
    async with h2_client(stack, ca, f"https://nothing.{DOMAIN}:{stack.edge.public_port}") as c:
        r = await c.get("/")
        assert r.status_code == 404 and r.json()["code"] == "UNKNOWN_HOST"


class CuttingOrigin:
    """A service whose responses end abnormally (or legitimately at close): by path."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> CuttingOrigin:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1]
            piece = os.urandom(100_000)
            if path in (b"/truncate", b"/reset"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n" + piece)
            elif path == b"/chunk-cut":
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            else:  # /until-close: a body delimited by the end of the connection is complete
                writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
            await writer.drain()
            if path == b"/reset":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        writer.close()


@pytest.mark.parametrize("path", ["/truncate", "/reset", "/chunk-cut"])
async def test_cut_response_is_a_stream_reset_never_end_stream(
    stack: Stack, ca: trustme.CA, path: str
) -> None:
    async with CuttingOrigin() as origin:
        await stack.agent("sb1")
        url = (await stack.expose("sb1", origin.port, token=TOKEN))["exposedAt"]
        async with RawH2(stack, ca, host_of(url)) as client:
            sid = client.request(b"GET", path.encode())
            await client.send()
            headers, body, last = await client.response(sid)
            assert headers[b":status"] == b"200"
            assert len(body) < 1_000_000
            assert isinstance(last, h2.events.StreamReset), last
            assert last.error_code == h2.errors.ErrorCodes.INTERNAL_ERROR
            # the connection itself lives on: another stream on it is served
            sid = client.request(b"GET", b"/until-close")
            await client.send()
            headers, body, last = await client.response(sid)
            assert body == b"all of it" and isinstance(last, h2.events.StreamEnded)
        async with h2_client(stack, ca, url) as httpx_client:
            with pytest.raises(httpx.RemoteProtocolError):
                await httpx_client.get(path)


class CountingOrigin:
    """Serves ``n`` bytes of the test pattern per request, counting what its socket accepted."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.sent = 0
        self.closed = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> CountingOrigin:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % self.n)
            for piece in pattern(self.n):
                for i in range(0, len(piece), 65536):
                    writer.write(piece[i : i + 65536])
                    await writer.drain()
                    self.sent += len(piece[i : i + 65536])
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed.set()
            writer.close()


def _kernel_buffers() -> int:
    """The most two loopback sockets' kernel buffers can hold (send max + receive max)."""
    wmem = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    rmem = int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
    return wmem + rmem


async def test_slow_h2_reader_is_bounded_by_tunnel_credit(
    stack: Stack, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that stops granting window: the edge queues at most its per-stream bound, the
    tunnel credit stops, and the service's writes block; a reset then reaches the service."""
    peak = {"queued": 0, "unacked": 0}
    write = h2public._StreamTransport.write

    def measured(self: h2public._StreamTransport, data: bytes) -> None:
        write(self, data)
        peak["queued"] = max(peak["queued"], self.outbound_size)
        endpoint = self.protocol
        if endpoint is not None and endpoint.mux is not None and not endpoint.mux.session.closed:
            unacked = endpoint.mux.session.stream_receive_unacked(endpoint.stream_id)
            peak["unacked"] = max(peak["unacked"], unacked)

    monkeypatch.setattr(h2public._StreamTransport, "write", measured)
    total = 1 << 30
    async with CountingOrigin(total) as origin:
        await stack.agent("sb1")
        url = (await stack.expose("sb1", origin.port, token=TOKEN))["exposedAt"]
        async with RawH2(stack, ca, host_of(url)) as client:
            sid = client.request(b"GET", b"/")
            await client.send()
            received = 0
            while received < 65535:  # the client's windows: 64 KiB, never acknowledged
                event = await client.next_event()
                if isinstance(event, h2.events.DataReceived):
                    received += len(event.data)
            assert stack.edge is not None
            (conn,) = stack.edge.public_connections
            assert isinstance(conn, PublicTlsConnection) and conn.h2 is not None
            (stream,) = conn.h2.streams.values()
            endpoint = stream.protocol
            assert endpoint is not None
            await wait_until(lambda: endpoint._write_paused, what="tunnel credit held")
            # Wait until the service's progress stops (it must: nothing reads any more).
            last = -1
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while origin.sent != last:
                assert loop.time() < deadline, "the service never stopped sending"
                last = origin.sent
                await asyncio.sleep(0.3)
            bound = (
                received
                + h2public.STREAM_HIGH_WATER
                + DEFAULT_MAX_STREAM_WINDOW
                + MAX_FRAME_PAYLOAD
                + AGENT_STREAM_BOUND
                + _kernel_buffers()
            )
            assert origin.sent < bound < total
            assert not origin.closed.is_set()
            # The client gives up: the reset travels to the service, whose connection closes.
            client.conn.reset_stream(sid)
            await client.send()
            await asyncio.wait_for(origin.closed.wait(), 10)
    assert peak["queued"] <= h2public.STREAM_HIGH_WATER + DEFAULT_MAX_STREAM_WINDOW
    assert peak["unacked"] <= DEFAULT_MAX_STREAM_WINDOW


def ws_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One masked client WebSocket frame (RFC 6455 5.2)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack("!H", n)
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack("!Q", n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def ws_parse(buf: bytearray) -> tuple[int, bytes] | None:
    """(opcode, payload) of one complete unmasked server frame taken from ``buf``, or None."""
    if len(buf) < 2:
        return None
    n = buf[1] & 0x7F
    pos = 2
    if n == 126:
        if len(buf) < 4:
            return None
        n, pos = struct.unpack("!H", buf[2:4])[0], 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n, pos = struct.unpack("!Q", buf[2:10])[0], 10
    if len(buf) < pos + n:
        return None
    opcode, payload = buf[0] & 0x0F, bytes(buf[pos : pos + n])
    del buf[: pos + n]
    return opcode, payload


async def _echo(ws) -> None:
    try:
        async for message in ws:
            await ws.send(message)
    except websockets.ConnectionClosed:
        pass


async def test_websocket_over_h2_extended_connect(stack: Stack, ca: trustme.CA) -> None:
    """RFC 8441: the edge offers SETTINGS_ENABLE_CONNECT_PROTOCOL; an extended CONNECT becomes
    an HTTP/1.1 upgrade to the service, and DATA frames carry the WebSocket both ways."""
    async with serve(_echo, "127.0.0.1", 0, subprotocols=["chat"], compression=None) as echo:
        echo_port = next(iter(echo.sockets)).getsockname()[1]
        await stack.agent("sb1")
        url = (await stack.expose("sb1", echo_port, token=TOKEN))["exposedAt"]
        async with RawH2(stack, ca, host_of(url), window=1 << 20) as client:
            while client.conn.remote_settings.enable_connect_protocol != 1:
                await client.next_event()
            sid = client.request(
                b"CONNECT",
                b"/chat",
                [
                    (b":protocol", b"websocket"),
                    (b"sec-websocket-version", b"13"),
                    (b"sec-websocket-protocol", b"chat"),
                ],
                end=False,
            )
            await client.send()
            event = await client.next_event()
            while not isinstance(event, (h2.events.ResponseReceived, h2.events.StreamReset)):
                event = await client.next_event()
            assert isinstance(event, h2.events.ResponseReceived), event
            headers = dict(event.headers)
            assert headers[b":status"] == b"200"
            assert headers[b"sec-websocket-protocol"] == b"chat"  # the service's 101's fields
            assert b"sec-websocket-accept" not in headers and b"upgrade" not in headers
            big = os.urandom(300_000)
            buf = bytearray()
            for message in (b"hello", big):
                await client.send_body(sid, ws_frame(message, 0x2))
                frame = None
                while frame is None:
                    event = await client.next_event()
                    if isinstance(event, h2.events.DataReceived) and event.stream_id == sid:
                        buf += event.data
                        client.conn.acknowledge_received_data(event.flow_controlled_length, sid)
                        await client.send()
                    frame = ws_parse(buf)
                assert frame == (0x2, message)
            # a close handshake, then END_STREAM both ways
            client.conn.send_data(sid, ws_frame(struct.pack("!H", 1000), 0x8), end_stream=True)
            await client.send()
            ended = False
            while not ended:
                event = await client.next_event()
                if isinstance(event, h2.events.DataReceived):
                    buf += event.data
                assert not isinstance(event, h2.events.StreamReset), event
                ended = isinstance(event, h2.events.StreamEnded)
            assert ws_parse(buf) == (0x8, struct.pack("!H", 1000))


class StallingOrigin:
    """Reads a request head, then nothing until ``release`` is set; then the body, answering
    with its length and sha256."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> StallingOrigin:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(
                next(
                    line.split(b":", 1)[1]
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
            )
            await asyncio.wait_for(self.release.wait(), 30)
            digest = hashlib.sha256(await reader.readexactly(length)).hexdigest()
            body = orjson.dumps({"length": length, "sha256": digest})
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        writer.close()


async def test_upload_to_a_stalled_service_is_bounded_by_h2_window(
    stack: Stack, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The edge acknowledges h2 DATA only once the tunnel took it: with the service not
    reading, the client's window closes and the edge holds at most one stream window."""
    peak = {"inbound": 0}
    client_data = h2public._StreamTransport.client_data

    def measured(self: h2public._StreamTransport, data: bytes, flow: int) -> None:
        client_data(self, data, flow)
        peak["inbound"] = max(peak["inbound"], sum(len(d) for d, _ in self.inbound))

    monkeypatch.setattr(h2public._StreamTransport, "client_data", measured)
    body = os.urandom(64 << 20)
    async with StallingOrigin() as origin:
        await stack.agent("sb1")
        url = (await stack.expose("sb1", origin.port, token=TOKEN))["exposedAt"]
        async with RawH2(stack, ca, host_of(url)) as client:
            sid = client.request(
                b"POST", b"/upload", [(b"content-length", b"%d" % len(body))], end=False
            )
            await client.send()
            upload = asyncio.ensure_future(client.send_body(sid, body, end=True))
            # The client's window closes and stays closed while the service does not read.
            closed_before = False
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while True:
                assert loop.time() < deadline and not upload.done(), "the upload never stalled"
                await asyncio.sleep(0.3)
                closed = client.conn.local_flow_control_window(sid) == 0
                if closed and closed_before:
                    break
                closed_before = closed
            assert not upload.done()
            assert peak["inbound"] <= h2public.STREAM_WINDOW
            origin.release.set()
            await asyncio.wait_for(upload, 60)
            headers, answer, last = await client.response(sid)
            assert headers[b":status"] == b"200" and isinstance(last, h2.events.StreamEnded)
            assert orjson.loads(answer) == {
                "length": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
            }


# -- real processes: curl --http2 ------------------------------------------------------------------


@pytest.fixture
def procs(tmp_path: Path):
    p = Processes(tmp_path)
    try:
        yield p
    finally:
        p.close()


def _curl_has_http2() -> bool:
    curl = shutil.which("curl")
    if curl is None:
        return False
    out = subprocess.run([curl, "-V"], capture_output=True, timeout=10).stdout
    return b"HTTP2" in out or b"nghttp2" in out


def test_curl_http2_downloads_and_uploads_through_the_full_tunnel(
    procs: Processes, ca: trustme.CA, tmp_path: Path
) -> None:
    """curl (nghttp2) over HTTP/2 against real tunneld and tunnel-agent processes: a 64 MiB
    download checked by sha256, and an upload."""
    assert _curl_has_http2(), "Debian's curl is built with nghttp2 (apt-get install curl)"
    from .test_public_tls import write_pair

    cert, key = write_pair(ca, tmp_path, "wild", f"*.{DOMAIN}")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ports = procs.start_edge("--domain", DOMAIN, "--public-tls-cert", cert, "--public-tls-key", key)
    procs.start_agent("sb1")
    origin = OriginThread()
    try:
        wait_for(lambda: is_connected(procs, "sb1"), what="the agent connected")
        with admin_client(procs) as admin:
            r = admin.post("/v1/sandboxes/sb1/ports", json={"port": origin.port, "token": TOKEN})
            assert r.status_code == 200, r.text
            url = r.json()["exposedAt"]
        host = host_of(url).rpartition(":")[0]
        base = f"https://{host}:{ports['public']}"
        resolve = f"{host}:{ports['public']}:127.0.0.1"
        n = 64 << 20
        out_file = tmp_path / "download.bin"
        done = subprocess.run(
            [
                "curl", "--http2", "-sS", "--fail", "--cacert", str(ca_file), "--resolve", resolve,
                "-o", str(out_file), "-w", "%{http_version} %{http_code}",
                f"{base}/bytes?n={n}&seed=3",
            ],
            capture_output=True,
            timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout == b"2 200"
        digest = hashlib.sha256()
        with out_file.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        assert digest.hexdigest() == pattern_sha256(n, 3)
        upload = tmp_path / "upload.bin"
        upload.write_bytes(os.urandom(8 << 20))
        done = subprocess.run(
            [
                "curl", "--http2", "-sS", "--fail", "--cacert", str(ca_file), "--resolve", resolve,
                "--data-binary", f"@{upload}", f"{base}/upload",
            ],
            capture_output=True,
            timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert orjson.loads(done.stdout) == {
            "length": 8 << 20,
            "sha256": hashlib.sha256(upload.read_bytes()).hexdigest(),
        }
    finally:
        origin.close()
    assert "Traceback" not in procs.output(procs.edge)


# -- ALPN and limits -------------------------------------------------------------------------------


async def test_alpn_offers_h2_on_every_sni_certificate_and_can_be_turned_off(
    ca: trustme.CA, tmp_path: Path
) -> None:
    from .test_public_tls import handshake, write_pair

    other_cert, other_key = write_pair(ca, tmp_path, "other", "*.other.test")
    stack = await tls_stack(ca, tmp_path, public_tls_extra=((other_cert, other_key),))
    try:
        assert stack.edge is not None
        port = stack.edge.public_port
        both = ["h2", "http/1.1"]
        assert (await handshake(port, ca, f"x.{DOMAIN}", both))[1] == "h2"
        assert (await handshake(port, ca, "x.other.test", both))[1] == "h2"  # after SNI switch
        assert (await handshake(port, ca, f"x.{DOMAIN}", ["http/1.1"]))[1] == "http/1.1"
    finally:
        await stack.close()
    stack = await tls_stack(ca, tmp_path, public_h2=False)
    try:
        url, _ = await exposed_origin(stack)
        assert stack.edge is not None
        assert (await handshake(stack.edge.public_port, ca, f"x.{DOMAIN}", both))[1] == "http/1.1"
        async with h2_client(stack, ca, url) as client:
            r = await client.get("/")  # an h2-capable client falls back to HTTP/1.1
            assert r.http_version == "HTTP/1.1" and r.content == b"hello from origin"
    finally:
        await stack.close()


async def test_streams_open_at_once_count_against_the_per_ip_limit(
    ca: trustme.CA, tmp_path: Path
) -> None:
    """An h2 connection counts once against the limits, and each further stream open at once
    counts against max_connections_per_ip like the HTTP/1.1 connection it stands for: past it a
    stream is refused with RST_STREAM(REFUSED_STREAM) (safe to retry), and the places come back
    when streams end or the connection goes. Without this, one IP could make the edge hold
    h2_max_streams x (stream window + queue) per connection instead of that per connection."""
    stack = await tls_stack(ca, tmp_path, max_connections_per_ip=3)
    try:
        url, _ = await exposed_origin(stack)
        async with RawH2(stack, ca, host_of(url)) as first:
            sids = [first.request(b"GET", b"/") for _ in range(5)]
            await first.send()
            status: dict[int, bytes] = {}
            ends: dict[int, h2.events.Event] = {}
            while len(ends) < len(sids):  # every stream's events, in whatever order they come
                event = await first.next_event()
                sid = getattr(event, "stream_id", None)
                if isinstance(event, h2.events.ResponseReceived):
                    status[event.stream_id] = dict(event.headers)[b":status"]
                elif isinstance(event, h2.events.DataReceived):
                    first.conn.acknowledge_received_data(event.flow_controlled_length, sid)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    ends[event.stream_id] = event
            served = [sid for sid in sids if status.get(sid) == b"200"]
            refused = [
                sid
                for sid in sids
                if isinstance(ends[sid], h2.events.StreamReset)
                and ends[sid].error_code == h2.errors.ErrorCodes.REFUSED_STREAM
            ]
            assert (len(served), len(refused)) == (3, 2)
            assert stack.edge is not None
            await wait_until(lambda: not stack.edge.public_limits.per_ip.get("127.0.0.1", 0) > 1,
                             what="the streams' places given back")  # fmt: skip
            # the places are back: three streams at once are served again
            sids = [first.request(b"GET", b"/") for _ in range(3)]
            await first.send()
            for sid in sids:
                headers, body, _ = await first.response(sid)
                assert headers[b":status"] == b"200" and body == b"hello from origin"
            async with RawH2(stack, ca, host_of(url)) as second:  # 1 + 1 < 3: admitted
                sid = second.request(b"GET", b"/")
                await second.send()
                headers, _, _ = await second.response(sid)
                assert headers[b":status"] == b"200"
        await wait_until(lambda: not stack.edge.public_limits.per_ip, what="every place back")
        metrics = stack.edge.metrics.render().decode()
        assert 'tunneld_public_refusals_total{code="TOO_MANY_CONNECTIONS"} 2.0' in metrics
    finally:
        await stack.close()


async def test_a_connection_past_the_limit_is_refused_on_its_first_stream(
    ca: trustme.CA, tmp_path: Path
) -> None:
    stack = await tls_stack(ca, tmp_path, max_connections_per_ip=1)
    try:
        url, _ = await exposed_origin(stack)
        async with RawH2(stack, ca, host_of(url)) as first:
            sid = first.request(b"GET", b"/")
            await first.send()
            headers, body, _ = await first.response(sid)
            assert headers[b":status"] == b"200" and body == b"hello from origin"
            async with RawH2(stack, ca, host_of(url)) as second:
                sid = second.request(b"GET", b"/")
                await second.send()
                headers, body, _ = await second.response(sid)
                assert headers[b":status"] == b"503"
                assert orjson.loads(body)["code"] == "TOO_MANY_CONNECTIONS"
                assert headers[b"retry-after"] == b"1"
        async with h2_client(stack, ca, url) as client:  # the places were given back
            await wait_until(lambda: not stack.edge.public_connections, what="connections gone")
            assert (await client.get("/")).status_code == 200
    finally:
        await stack.close()


async def test_unexpose_resets_live_h2_streams(stack: Stack, ca: trustme.CA) -> None:
    url, origin = await exposed_origin(stack)
    async with RawH2(stack, ca, host_of(url)) as client:
        sid = client.request(b"GET", b"/sse")
        await client.send()
        event = await client.next_event()
        while not isinstance(event, h2.events.DataReceived):
            event = await client.next_event()
        assert b"first" in event.data
        assert stack.admin is not None
        r = await stack.admin.delete(f"/v1/sandboxes/sb1/ports/{origin.port}")
        assert r.status_code in (200, 204), r.text
        while not isinstance(event, (h2.events.StreamReset, h2.events.StreamEnded)):
            event = await client.next_event()
        assert isinstance(event, h2.events.StreamReset) and event.stream_id == sid


async def test_access_log_and_request_id_over_h2(
    ca: trustme.CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """h2 requests are logged by the same writer as HTTP/1.1 ones and counted in /metrics."""
    stack = await tls_stack(ca, tmp_path, access_log=True)
    try:
        stream = stack.edge.access_writer.stream = io.StringIO()
        url, _ = await exposed_origin(stack)
        with caplog.at_level(logging.INFO, logger="tunneld.access"):
            async with h2_client(stack, ca, url) as client:
                r = await client.get("/headers", headers={"x-request-id": "h2-req-1"})
                assert r.http_version == "HTTP/2"
                assert r.headers["x-request-id"] == "h2-req-1"  # echoed in the response
                assert dict(r.json())["x-request-id"] == "h2-req-1"  # passed to the service
                assert (await client.get("/headers")).status_code == 200
            await wait_until(
                lambda: stream.getvalue().count("tunneld.access") == 2,
                what="the access log lines",
            )
        (line,) = [ln for ln in stream.getvalue().splitlines() if "h2-req-1" in ln]
        assert " 200 " in line and '"GET /headers"' in line
        metrics = (await stack.admin.get("/metrics")).text
        assert 'tunneld_http_requests_total{status="2xx"} 2.0' in metrics
    finally:
        await stack.close()


async def test_streams_of_one_connection_route_to_different_preview_hosts(
    stack: Stack, ca: trustme.CA
) -> None:
    """Browsers reuse a connection for every host its wildcard certificate covers: each stream
    is routed by its own :authority (no 421 as on an HTTP/1.1 keep-alive connection)."""
    url, origin = await exposed_origin(stack)
    other = await stack.origin()
    other_url = (await stack.expose("sb1", other.port, token="othertoken"))["exposedAt"]
    async with RawH2(stack, ca, host_of(url)) as client:
        first = client.request(b"GET", b"/")
        await client.send()
        client.host = host_of(other_url)  # same connection, another preview host
        second = client.request(b"GET", b"/")
        await client.send()
        for sid in (first, second):
            headers, body, _ = await client.response(sid)
            assert headers[b":status"] == b"200" and body == b"hello from origin"
    assert origin.requests == 1 and other.requests == 1


async def test_404_budget_and_head_limit_apply_per_request(ca: trustme.CA, tmp_path: Path) -> None:
    stack = await tls_stack(ca, tmp_path, miss_rate=0.001, miss_burst=2)
    try:
        url, origin = await exposed_origin(stack)
        wrong = host_of(url).replace(TOKEN, "wrongtoken0")
        async with RawH2(stack, ca, wrong) as client:
            codes = []
            for _ in range(3):
                sid = client.request(b"GET", b"/")
                await client.send()
                headers, body, _ = await client.response(sid)
                codes.append((headers[b":status"], orjson.loads(body)["code"]))
        assert codes == [
            (b"404", "INVALID_TOKEN"),
            (b"404", "INVALID_TOKEN"),
            (b"429", "TOO_MANY_MISSES"),
        ]
        async with RawH2(stack, ca, host_of(url)) as client:
            sid = client.request(b"GET", b"/headers", [(b"x-big", b"a" * 40_000)])
            await client.send()
            try:
                headers, _, _ = await client.response(sid)
                assert headers[b":status"] == b"431"
            except ConnectionError:
                pass  # refused by the h2 layer itself (SETTINGS_MAX_HEADER_LIST_SIZE)
        assert origin.requests == 0  # neither reached the service
    finally:
        await stack.close()


async def test_idle_h2_connection_is_closed_after_keepalive_timeout(
    ca: trustme.CA, tmp_path: Path
) -> None:
    stack = await tls_stack(ca, tmp_path, keepalive_timeout=0.5)
    try:
        url, _ = await exposed_origin(stack)
        async with RawH2(stack, ca, host_of(url)) as client:
            sid = client.request(b"GET", b"/")
            await client.send()
            headers, _, _ = await client.response(sid)
            assert headers[b":status"] == b"200"
            event = None
            with pytest.raises(ConnectionError):
                while True:  # GOAWAY, then the close (bounded by next_event's timeout)
                    event = await client.next_event()
                    if isinstance(event, h2.events.ConnectionTerminated):
                        assert event.error_code == h2.errors.ErrorCodes.NO_ERROR
            assert isinstance(event, h2.events.ConnectionTerminated)
    finally:
        await stack.close()


def test_h2_settings_from_the_environment_and_their_bounds(tmp_path: Path) -> None:
    from tunneld.config import ConfigError, load_config

    env = {"TUNNELD_ADMIN_TOKEN": "a", "TUNNELD_SECRET": "s"}
    config = load_config(environ={**env, "TUNNELD_PUBLIC_H2": "0", "TUNNELD_H2_MAX_STREAMS": "7"})
    assert config.public_h2 is False and config.h2_max_streams == 7
    assert load_config(environ=env).public_h2 is True
    for bad in ("0", "1001"):
        with pytest.raises(ConfigError, match="h2_max_streams must be 1-1000"):
            load_config(environ={**env, "TUNNELD_H2_MAX_STREAMS": bad})


async def test_rapid_reset_closes_the_connection(ca: trustme.CA, tmp_path: Path) -> None:
    """Requests reset at once by the client (CVE-2023-44487) each cost a tunnel stream: past
    h2_max_streams per second (bursts of twice that) the connection is closed."""
    stack = await tls_stack(ca, tmp_path, h2_max_streams=10)
    try:
        url, _ = await exposed_origin(stack)
        async with RawH2(stack, ca, host_of(url)) as client:
            terminated = None
            with pytest.raises(ConnectionError):
                for _ in range(200):
                    sid = client.request(b"GET", b"/sse")  # a response that never ends
                    client.conn.reset_stream(sid)
                    await client.send()
                while True:
                    event = await client.next_event()
                    if isinstance(event, h2.events.ConnectionTerminated):
                        terminated = event
            assert terminated is not None
            assert terminated.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    finally:
        await stack.close()


# -- cluster: the stream lands on a node without the sandbox's agent ---------------------------


@pytest.fixture
async def cluster(redis_server: Any) -> AsyncIterator[Any]:
    from tests.cluster.nodes import Cluster

    c = Cluster(redis_server)
    try:
        yield c
    finally:
        await c.close()


async def test_h2_stream_for_a_sandbox_on_another_node_goes_over_the_node_link(
    cluster: Any, ca: trustme.CA, tmp_path: Path
) -> None:
    from tests.cluster.nodes import wait_for as cluster_wait

    from .test_public_tls import write_pair

    cert, key = write_pair(ca, tmp_path, "wild", f"*.{DOMAIN}")
    settings = {"domain": DOMAIN, "scheme": "https", "public_tls_cert": cert, "public_tls_key": key}
    a = await cluster.node("node-a", **settings)
    b = await cluster.node("node-b", **settings)
    origin = await cluster.origin()
    await cluster.agent(b, "sb1")
    r = await a.admin.post("/v1/sandboxes/sb1/ports", json={"port": origin.port, "token": TOKEN})
    assert r.status_code == 200, r.text
    url = r.json()["exposedAt"]
    await cluster_wait(lambda: a.edge.cluster.owners.get("sb1", ("",))[0] == "node-b", what="owner")
    host = host_of(url).rpartition(":")[0]
    async with httpx.AsyncClient(
        base_url=f"https://{host}",
        timeout=30,
        transport=_Loopback(a.edge.public_port, verify=client_context(ca), http2=True),
    ) as client:
        r = await client.get("/bytes", params={"n": 2_000_000})
        assert r.http_version == "HTTP/2" and r.status_code == 200
        assert hashlib.sha256(r.content).hexdigest() == pattern_sha256(2_000_000)
        body = os.urandom(500_000)
        r = await client.post("/upload", content=body)
        assert r.json() == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        r = await client.get("/headers")
        seen = dict(r.json())
        assert seen["x-forwarded-proto"] == "https" and seen["x-forwarded-for"] == "127.0.0.1"
    # each of the three streams took the node link (one link stream per request)
    assert b"tunneld_connections_forwarded_total 3.0" in a.edge.metrics.render()
    assert origin.requests == 3


@pytest.mark.parametrize("anyio_backend", [("asyncio", {"use_uvloop": False})], ids=["asyncio"])
async def test_responses_of_many_streams_share_flushes(
    stack: Stack, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each stream's response is queued in the h2 connection and written by one flush per loop
    iteration (H2PublicConnection.schedule_flush), not by a flush (a TLS write) per stream.
    asyncio only: there the in-process agent's 20 responses reach the edge in a few tunnel
    reads; on uvloop they arrive one loop iteration each, so there is nothing to share."""
    streams = 20
    url, _ = await exposed_origin(stack)
    flushes: list[int] = []
    real = H2PublicConnection.flush

    def counted(self: H2PublicConnection) -> None:
        flushes.append(1)
        real(self)

    async with RawH2(stack, ca, host_of(url)) as client:
        sids = [client.request(b"GET", b"/") for _ in range(streams)]
        monkeypatch.setattr(H2PublicConnection, "flush", counted)
        await client.send()  # the 20 requests in one write
        ended: dict[int, bytes] = {}
        bodies: dict[int, bytearray] = {sid: bytearray() for sid in sids}
        while len(ended) < streams:
            event = await client.next_event()
            if isinstance(event, h2.events.DataReceived):
                bodies[event.stream_id] += event.data
                client.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                ended[event.stream_id] = bytes(bodies[event.stream_id])
            elif isinstance(event, h2.events.StreamReset):
                raise AssertionError(f"stream {event.stream_id} reset")
        monkeypatch.undo()
    assert all(body == b"hello from origin" for body in ended.values())
    assert len(flushes) <= streams // 4, len(flushes)
