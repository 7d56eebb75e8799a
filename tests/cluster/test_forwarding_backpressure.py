"""Backpressure across the forwarded hop (relay/linked.py): two nodes on one real Redis, the
agent on node B (the owner), every client on node A, so each request crosses a node link and
is served at B over a ``LinkedTransport``.

A slow reader on either side must make the hop stop, not buffer: B keeps what the link
delivers while its connection has paused reading (``_pending``) and withholds exactly that
credit, so the link stream's window bounds it; B's writes to the link report
``pause_writing`` past the stream's send high-water mark, so a slow client at A holds the
agent's stream at B. Nothing is lost or reordered on the way, a half-close arrives after
the bytes before it, and a reset stays a reset.

The buffers are measured right after every call that fills them (the wrapped methods below),
which is where they peak; the bounds are the mechanism's own constants
(docs/architecture.md, "Flow control and backpressure, end to end").
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import socket
from collections.abc import Callable
from typing import Any

import pytest

from protocol.frames import DEFAULT_MAX_STREAM_WINDOW, MAX_FRAME_PAYLOAD
from protocol.session import SessionConfig
from relay.buffers import READ_SIZE
from relay.linked import LinkedTransport
from relay.mux import LOCAL_HIGH_WATER, StreamEndpoint, abort_with_reset
from tests.e2e.origin import pattern_sha256
from tests.faults.origins import ScriptedOrigin
from tunneld.edge import EdgeSession
from tunneld.nodelink import NodeLinkClient
from tunneld.public import PublicConnection

from .nodes import Cluster, Node, wait_for

pytestmark = pytest.mark.anyio

HIGH_WATER = SessionConfig().stream_send_high_water  # a stream's queue says "pause" here
# B, receiving on the link: what it keeps unread, and the credit it withholds, are bounded by
# the link stream's window (256 KiB, growing up to 4 MiB only while the reader keeps up).
LINK_WINDOW_BOUND = DEFAULT_MAX_STREAM_WINDOW
# A's queue on the link (upload): the high-water mark plus the client read that crossed it.
A_LINK_QUEUE_BOUND = HIGH_WATER + READ_SIZE
# B's queue towards the agent (upload): the mark plus the link frame that crossed it.
B_AGENT_QUEUE_BOUND = HIGH_WATER + MAX_FRAME_PAYLOAD
# B's queue on the link (download): the mark plus the agent frame that crossed it, then at
# most the agent stream's window, whose credit B's connection holds while it is paused.
B_LINK_QUEUE_BOUND = HIGH_WATER + MAX_FRAME_PAYLOAD + DEFAULT_MAX_STREAM_WINDOW
# A's socket to a slow client (download): what it queued before crossing its high-water mark
# (plus the frame that crossed it), then at most the link stream's window.
A_CLIENT_BOUND = LOCAL_HIGH_WATER + MAX_FRAME_PAYLOAD + DEFAULT_MAX_STREAM_WINDOW


class Probe:
    """Peaks of every buffer of the hop, and which branches of LinkedTransport ran."""

    def __init__(self) -> None:
        self.transports: list[LinkedTransport] = []
        self.b_held = 0  # bytes B kept unread / credit it withheld, one link stream
        self.b_pending = 0  # bytes B received while paused, not yet delivered
        # (held, link unacked) that differ between callbacks (see ``check_credit``)
        self.credit_mismatch: list[tuple[int, int]] = []
        self.credit_checks = 0
        self.received_paused = 0  # receive_from_peer while paused (kept in _pending)
        self.resumed_with_pending = 0  # resume_reading that had pending bytes to deliver
        self.ended_paused = asyncio.Event()  # peer_ended while paused (EOF kept)
        self.write_paused = 0  # LinkedTransport.write that left the protocol paused
        self.writable_after_pause = 0  # peer_writable that resumed a paused protocol
        self.aborts = 0
        self.a_link_queue = 0  # A: client bytes queued on the link stream
        self.b_agent_queue = 0  # B: link bytes queued on the agent's stream
        self.b_link_queue = 0  # B: response bytes queued on the link stream
        self.a_client_buffer = 0  # A: response bytes in the socket to the client
        self.a_link_unacked = 0  # A: link credit withheld for a slow client

    def linked(self, t: LinkedTransport) -> None:
        if t not in self.transports:
            self.transports.append(t)
        pending = sum(len(chunk) for chunk in t._pending)
        self.b_held = max(self.b_held, t._held)
        self.b_pending = max(self.b_pending, pending)
        session = t.mux.session
        if not session.closed and t.stream_id in t.mux.streams:
            queued = session.stream_send_buffered(t.stream_id)
            self.b_link_queue = max(self.b_link_queue, queued)

    def check_credit(self) -> None:
        """Between callbacks (not inside one read's batch of frames, whose later frames the
        session already counts): the credit B withholds is exactly the bytes it holds."""
        for t in self.transports:
            session = t.mux.session
            if t._lost or session.closed or t.stream_id not in t.mux.streams:
                continue
            self.credit_checks += 1
            unacked = session.stream_receive_unacked(t.stream_id)
            if unacked != t._held:
                self.credit_mismatch.append((t._held, unacked))

    async def sample_credit(self) -> None:
        for _ in range(100_000):  # bounded; cancelled when the transfer is over
            self.check_credit()
            await asyncio.sleep(0.002)

    def endpoint(self, endpoint: StreamEndpoint) -> None:
        if not isinstance(endpoint, PublicConnection):
            return
        mux = endpoint.mux
        if mux is None or mux.session.closed or endpoint.stream_id not in mux.streams:
            return
        queued = mux.session.stream_send_buffered(endpoint.stream_id)
        if isinstance(mux, NodeLinkClient):  # on A
            self.a_link_queue = max(self.a_link_queue, queued)
            unacked = mux.session.stream_receive_unacked(endpoint.stream_id)
            self.a_link_unacked = max(self.a_link_unacked, unacked)
            if endpoint.transport is not None:
                size = endpoint.transport.get_write_buffer_size()
                self.a_client_buffer = max(self.a_client_buffer, size)
        elif isinstance(mux, EdgeSession):  # on B (the owner), towards the agent
            self.b_agent_queue = max(self.b_agent_queue, queued)


def _paused(t: LinkedTransport) -> bool:
    return not t._reading or bool(t._pending)


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> Probe:
    p = Probe()

    def wrap(cls: type, name: str, before: Callable[..., Any] | None, after: Callable[..., Any]):
        method = getattr(cls, name)

        def wrapper(self: Any, *args: Any) -> Any:
            state = before(self) if before is not None else None
            result = method(self, *args)
            after(self, state)
            return result

        monkeypatch.setattr(cls, name, wrapper)

    def on_receive(t: LinkedTransport, paused: bool) -> None:
        p.received_paused += paused
        p.linked(t)

    def on_resume(t: LinkedTransport, pending: bool) -> None:
        p.resumed_with_pending += pending
        p.linked(t)

    def on_ended(t: LinkedTransport, paused: bool) -> None:
        if paused:
            p.ended_paused.set()
        p.linked(t)

    def on_write(t: LinkedTransport, _: object) -> None:
        p.write_paused += t._write_paused
        p.linked(t)

    def on_writable(t: LinkedTransport, was_paused: bool) -> None:
        p.writable_after_pause += was_paused and not t._write_paused
        p.linked(t)

    def on_abort(t: LinkedTransport, _: object) -> None:
        p.aborts += 1

    wrap(LinkedTransport, "receive_from_peer", _paused, on_receive)
    wrap(LinkedTransport, "resume_reading", lambda t: bool(t._pending), on_resume)
    wrap(LinkedTransport, "peer_ended", _paused, on_ended)
    wrap(LinkedTransport, "write", None, on_write)
    wrap(LinkedTransport, "peer_writable", lambda t: t._write_paused, on_writable)
    wrap(LinkedTransport, "abort", None, on_abort)
    wrap(StreamEndpoint, "forward", None, lambda e, _: p.endpoint(e))
    wrap(PublicConnection, "receive_from_peer", None, lambda e, _: p.endpoint(e))
    return p


async def _two_nodes(cluster: Cluster, port: int) -> tuple[Node, Node, bytes]:
    """Node A (clients) and node B (the agent); ``port`` exposed; returns (A, B, host)."""
    a = await cluster.node("node-a")
    b = await cluster.node("node-b")
    await cluster.agent(b, "sb1")
    r = await a.admin.post("/v1/sandboxes/sb1/ports", json={"port": port})
    assert r.status_code == 200, r.text
    url = r.json()["exposedAt"]
    await wait_for(lambda: a.edge.registry.exposures("sb1"), what="the exposure on A")
    await wait_for(
        lambda: a.edge.cluster.owners.get("sb1", ("",))[0] == "node-b", what="A to know the owner"
    )
    return a, b, url.split("//", 1)[1].split("/", 1)[0].encode()


async def _connect(node: Node, rcvbuf: int | None = None) -> tuple[Any, Any]:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", node.edge.public_port)), 10)
    return await asyncio.open_connection(sock=sock, limit=64 * 1024)


def _small_receive_buffer(origin: ScriptedOrigin) -> None:
    """Accepted sockets inherit it: a stalled service backs the agent up within a window or two
    instead of megabytes of loopback buffers."""
    assert origin.server is not None
    for sock in origin.server.sockets:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)


def _no_stream_left(a: Node, b: Node) -> bool:
    link_streams = sum(len(link.streams) for link in b.edge.cluster.server_links)
    return not link_streams and not a.edge.public_connections and not b.edge.public_connections


# -- (a) a large upload to a service that reads slowly ---------------------------------------------
class SlowSink(ScriptedOrigin):
    """Reads nothing of a request's body until ``gate`` is set, then 32 KiB at a time with a
    pause between reads; answers the body's length and SHA-256."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.received = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        assert match is not None, head
        length = int(match.group(1))
        await self.gate.wait()
        digest = hashlib.sha256()
        while self.received < length:
            chunk = await reader.read(min(32 * 1024, length - self.received))
            if not chunk:
                break
            digest.update(chunk)
            self.received += len(chunk)
            await asyncio.sleep(0.001)  # the service's pace
        body = json.dumps({"length": self.received, "sha256": digest.hexdigest()}).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()


async def test_a_large_upload_to_a_slow_service_is_bounded_and_lossless(
    cluster: Cluster, probe: Probe
) -> None:
    async with SlowSink() as service:
        _small_receive_buffer(service)
        a, b, host = await _two_nodes(cluster, service.port)
        n = 16 << 20
        body = random.Random(16).randbytes(n)
        reader, writer = await _connect(a)
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: " + host + b"\r\ncontent-length: %d\r\n\r\n" % n
        )
        writer.write(body)
        drained = asyncio.create_task(writer.drain())
        sampler = asyncio.create_task(probe.sample_credit())
        try:
            # The service reads nothing: B's connection pauses reading the linked transport,
            # which keeps what the link still delivers and withholds its credit.
            await wait_for(lambda: _stalled(probe), 20, "B to keep a window of link bytes")
            (t,) = probe.transports
            assert t._held <= LINK_WINDOW_BOUND
            probe.check_credit()
            service.gate.set()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
            assert head.startswith(b"HTTP/1.1 200 "), head
            answer = json.loads(await asyncio.wait_for(reader.readexactly(_length(head)), 10))
            await asyncio.wait_for(drained, 10)
        finally:
            drained.cancel()
            sampler.cancel()
            writer.close()
        assert answer == {"length": n, "sha256": hashlib.sha256(body).hexdigest()}
        # Every byte, in order (the hash), through the paused branches, with bounded buffers.
        assert probe.resumed_with_pending > 0
        assert probe.credit_checks > 0 and not probe.credit_mismatch, probe.credit_mismatch[:5]
        assert probe.b_held <= LINK_WINDOW_BOUND, probe.b_held
        assert probe.b_pending <= probe.b_held
        assert probe.b_agent_queue <= B_AGENT_QUEUE_BOUND, probe.b_agent_queue
        assert probe.a_link_queue <= A_LINK_QUEUE_BOUND, probe.a_link_queue
        await wait_for(lambda: _no_stream_left(a, b), what="the hop to be torn down")


def _stalled(probe: Probe) -> bool:
    """B has stopped reading the link stream and keeps at least half its first window."""
    return any(
        not t._reading and t._pending and t._held >= (HIGH_WATER >> 1) for t in probe.transports
    )


def _length(head: bytes) -> int:
    match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    assert match is not None, head
    return int(match.group(1))


# -- (b) a large download to a client that reads slowly ------------------------------------------
async def test_a_large_download_to_a_slow_client_is_bounded_and_lossless(
    cluster: Cluster, probe: Probe
) -> None:
    origin = await cluster.origin()
    a, b, host = await _two_nodes(cluster, origin.port)
    n = 16 << 20
    reader, writer = await _connect(a, rcvbuf=64 * 1024)
    try:
        writer.write(b"GET /bytes?n=%d&seed=9 HTTP/1.1\r\nHost: " % n + host + b"\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 "), head
        # The client reads nothing more: A holds the link's credit, so B's writes to the link
        # stream pause its connection, which then holds the agent's credit.
        await wait_for(lambda: probe.write_paused, 20, "B's connection to be paused")
        digest = hashlib.sha256()
        got = 0
        while got < n:
            chunk = await asyncio.wait_for(reader.read(64 * 1024), 30)
            assert chunk, f"the download ended after {got} of {n} bytes"
            digest.update(chunk)
            got += len(chunk)
            await asyncio.sleep(0.001)  # the client's pace
    finally:
        writer.close()
    assert digest.hexdigest() == pattern_sha256(n, 9)
    assert probe.writable_after_pause > 0
    assert probe.b_link_queue <= B_LINK_QUEUE_BOUND, probe.b_link_queue
    assert probe.a_client_buffer <= A_CLIENT_BOUND, probe.a_client_buffer
    assert probe.a_link_unacked <= LINK_WINDOW_BOUND, probe.a_link_unacked
    await wait_for(lambda: _no_stream_left(a, b), what="the hop to be torn down")


# -- (c) the client half-closes while the owner is paused ----------------------------------------
class CountToEof(ScriptedOrigin):
    """Upgrades the connection to a raw tunnel once ``gate`` is set (B holds the client's
    bytes meanwhile, reading paused), then reads slowly to EOF, answers what it read (length
    and SHA-256) and closes."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.head = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        self.head.set()
        await self.gate.wait()
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: count\r\nConnection: Upgrade\r\n\r\n"
        )
        digest = hashlib.sha256()
        n = 0
        while chunk := await reader.read(16 * 1024):
            digest.update(chunk)
            n += len(chunk)
            await asyncio.sleep(0.001)  # the service's pace
        writer.write(b"%d %s" % (n, digest.hexdigest().encode()))
        await writer.drain()


async def test_a_half_close_while_the_owner_is_paused_arrives_after_the_bytes(
    cluster: Cluster, probe: Probe
) -> None:
    """B's connection stops reading the linked transport while the service has not answered an
    upgrade (as it does when the agent's stream is backed up). The client's bytes sent
    meanwhile and then its FIN arrive at B: the bytes are kept, the FIN is kept behind them,
    and the service gets every byte and then the EOF."""
    async with CountToEof() as service:
        a, b, host = await _two_nodes(cluster, service.port)
        # Several frames, but less than the link stream's first window: all of it, and the
        # FIN, reach B while it is paused.
        payload = random.Random(3).randbytes(200 * 1024)
        reader, writer = await _connect(a)
        try:
            writer.write(
                b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nUpgrade: count\r\n"
                b"Connection: Upgrade\r\n\r\n"
            )
            await asyncio.wait_for(service.head.wait(), 10)
            await wait_for(
                lambda: any(not t._reading for t in probe.transports), 10, "B to pause reading"
            )
            writer.write(payload)
            await writer.drain()
            writer.write_eof()
            await wait_for(probe.ended_paused.is_set, 20, "the FIN to reach B while it is paused")
            (t,) = probe.transports
            assert t._eof_pending and sum(map(len, t._pending)) == len(payload)  # kept, in order
            service.gate.set()
            answer = await asyncio.wait_for(reader.read(), 20)  # until a clean EOF
        finally:
            writer.close()
        head, _, result = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), answer[:200]
        assert result == b"%d %s" % (len(payload), hashlib.sha256(payload).hexdigest().encode())
        assert probe.resumed_with_pending > 0
        await wait_for(lambda: _no_stream_left(a, b), what="the hop to be torn down")


# -- write_eof: the service half-closes a tunnel first -------------------------------------------
class HalfCloseFirst(ScriptedOrigin):
    """Upgrades, says ``bye`` and half-closes (FIN), then still reads the client's bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.received = bytearray()
        self.eof = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\nbye"
        )
        await writer.drain()
        writer.write_eof()
        while chunk := await reader.read(64 * 1024):
            self.received += chunk
        self.eof.set()


async def test_a_service_half_close_crosses_the_hop_as_a_half_close(
    cluster: Cluster, probe: Probe
) -> None:
    async with HalfCloseFirst() as service:
        a, b, host = await _two_nodes(cluster, service.port)
        reader, writer = await _connect(a)
        try:
            writer.write(
                b"GET / HTTP/1.1\r\nHost: "
                + host
                + b"\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n"
            )
            answer = await asyncio.wait_for(reader.read(), 20)  # the service's FIN: EOF here
            assert answer.startswith(b"HTTP/1.1 101 ") and answer.endswith(b"\r\n\r\nbye"), answer
            # ... but the connection is only half-closed: the client's bytes still get there
            writer.write(b"still here")
            await writer.drain()
            writer.write_eof()
            await asyncio.wait_for(service.eof.wait(), 20)
        finally:
            writer.close()
        assert bytes(service.received) == b"still here"
        await wait_for(lambda: _no_stream_left(a, b), what="the hop to be torn down")


# -- (d) a service that resets mid-response while the hop is backed up ---------------------------
class ResetMidResponse(ScriptedOrigin):
    """A response without a length, far larger than the windows; reset (RST) once ``cut``."""

    def __init__(self) -> None:
        super().__init__()
        self.cut = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n")
        block = b"z" * 65536
        sender = asyncio.ensure_future(self._send(writer, block))
        await self.cut.wait()
        sender.cancel()
        abort_with_reset(writer.transport)

    async def _send(self, writer: asyncio.StreamWriter, block: bytes) -> None:
        for _ in range(1024):  # 64 MiB at most: it never gets that far
            writer.write(block)
            await writer.drain()

    def closing(self) -> None:
        self.cut.set()


async def test_a_reset_mid_response_stays_a_reset_across_a_backed_up_hop(
    cluster: Cluster, probe: Probe
) -> None:
    async with ResetMidResponse() as service:
        a, b, host = await _two_nodes(cluster, service.port)
        reader, writer = await _connect(a, rcvbuf=64 * 1024)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200 "), head
            await wait_for(lambda: probe.write_paused, 20, "the hop to back up")
            service.cut.set()  # reset while every buffer of the hop is full
            # The client goes on reading (slowly): the agent learns of the reset as it reads
            # the service's socket again, B aborts the linked stream, A resets the client.
            received = 0
            with pytest.raises(ConnectionResetError):
                for _ in range(100_000):  # bounded: 64 MiB would be far past the windows
                    chunk = await asyncio.wait_for(reader.read(64 * 1024), 10)
                    if not chunk:
                        break  # a clean end: the cut-short body would look complete
                    received += len(chunk)
                    await asyncio.sleep(0.001)
            assert received < 64 << 20
            assert probe.aborts == 1
        finally:
            writer.close()
        await wait_for(lambda: _no_stream_left(a, b), what="the hop to be torn down")
