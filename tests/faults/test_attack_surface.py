"""What an unauthenticated or hostile peer can make the edge hold, and the bound on each.

Every listener is attacked with real sockets on 127.0.0.1: the agent port before authentication
(plain TCP, TLS and the WebSocket carriage: peers that never speak, drip bytes, send oversized or
wrong upgrades, or flood bad tokens), the admin API before the token check, the public listener
(silent and dripping heads) and an authenticated agent that sends beyond the credit it was given.
Each test checks the resource is released (connections, sessions), the peer gets a clear answer
or a close, nothing is logged as a crash (``no_unhandled_errors``), and repeated bad input does
not turn into one log line per attempt. Load is sized for a 2-core machine: tens of connections,
every wait bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from pathlib import Path

import pytest
import wsproto
import wsproto.events as wse

from protocol import control
from protocol.errors import GoAwayCode
from protocol.events import ConnectionTerminated, ControlReceived, StreamOpened
from protocol.frames import FrameType, encode_frame
from protocol.session import Role, Session
from tests.e2e.conftest import Stack, wait_until
from tunneld.auth import agent_token

from .conftest import closed_within, log_messages, tls_files

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def _frames(session: Session) -> bytes:
    return b"".join(bytes(b) for b in session.data_to_send())


async def _bad_hello(port: int, sandbox_id: str, token: str) -> list[object]:
    """A Hello with ``token``; returns the control messages the edge sent before closing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        session = Session(Role.AGENT)
        session.send_control(control.Hello(sandbox_id, token))
        writer.write(_frames(session))
        data = await closed_within(reader, 10)
    finally:
        writer.close()
    session.receive_data(data)
    return [e.message for e in session.events_received() if isinstance(e, ControlReceived)]


# -- the agent port, before authentication ---------------------------------------------------------
async def test_silent_and_dripping_agent_connections_end_at_the_handshake_timeout() -> None:
    """A peer that never sends a hello is dropped after handshake_timeout, even while it keeps
    dripping bytes (the timer is not pushed back by activity), and the edge forgets it."""
    stack = await Stack(handshake_timeout=0.5).start()
    try:
        assert stack.edge is not None
        port = stack.edge.agent_port
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(30)]
        drip_reader, drip_writer = await asyncio.open_connection("127.0.0.1", port)
        preface = Session(Role.AGENT).data_to_send()
        drip = b"".join(bytes(b) for b in preface) + b"\x00" * 200  # preface, then a frame head

        async def dripping() -> bytes:
            for i in range(len(drip)):  # 0.05 s a byte: ~10 s if it were never cut
                if drip_reader.at_eof() or drip_writer.is_closing():
                    break
                drip_writer.write(drip[i : i + 1])
                try:
                    await asyncio.wait_for(drip_reader.read(1), 0.05)
                    break  # EOF or a byte: the edge answered (it closes right after)
                except TimeoutError:
                    continue
                except ConnectionError:
                    break
            return await closed_within(drip_reader, 5)

        drip_task = asyncio.create_task(dripping())
        for reader, _writer in conns:
            await closed_within(reader, 5)
        await asyncio.wait_for(drip_task, 10)
        assert drip_reader.at_eof() or drip_writer.is_closing()
        await wait_until(lambda: not stack.edge.agent_connections, what="no agent connections")
        for _reader, writer in [*conns, (drip_reader, drip_writer)]:
            writer.close()
    finally:
        await stack.close()


async def test_tls_agent_port_drops_a_peer_that_never_starts_tls(tmp_path: Path) -> None:
    """On a TLS agent port the hello timer only starts once TLS is up; a peer that opens TCP and
    never sends a ClientHello (or stops midway) must still go after handshake_timeout, not after
    the event loop's 60 s default for TLS handshakes."""
    ca, cert_file, key_file = tls_files(tmp_path, "edge.test", "127.0.0.1")
    stack = await Stack(tls_cert=cert_file, tls_key=key_file, handshake_timeout=0.5).start()
    try:
        assert stack.edge is not None
        port = stack.edge.agent_port
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(10)]
        # half a ClientHello: a TLS record header announcing more than is ever sent
        half_reader, half_writer = await asyncio.open_connection("127.0.0.1", port)
        half_writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 20)
        for reader, _writer in [*silent, (half_reader, half_writer)]:
            await closed_within(reader, 5)  # 60 s without the bound
        # a real agent still gets in
        client = ssl.create_default_context()
        ca.configure_trust(client)
        await stack.agent("sb1", tls=client, server_hostname="edge.test")
        for _reader, writer in [*silent, (half_reader, half_writer)]:
            writer.close()
    finally:
        await stack.close()


async def test_bad_token_floods_are_refused_each_time_and_logged_boundedly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """100 hellos with wrong tokens: each is refused with AUTH_FAILED and counted in the metrics,
    but the log gets a bounded number of lines (a first burst, then a summary), not one a try."""
    caplog.set_level(logging.INFO, logger="tunneld")
    stack = await Stack().start()
    try:
        assert stack.edge is not None
        port = stack.edge.agent_port
        sem = asyncio.Semaphore(10)

        async def one(i: int) -> list[object]:
            async with sem:
                return await _bad_hello(port, f"sb{i}", "not-a-token")

        replies = await asyncio.gather(*(one(i) for i in range(100)))
        for messages in replies:
            assert any(
                isinstance(m, control.Error) and m.code == "AUTH_FAILED" for m in messages
            ), messages
        assert stack.edge.metrics.agent_auth_failures._value.get() == 100
        lines = log_messages(caplog, "authentication failed")
        assert 1 <= len(lines) <= 20, f"{len(lines)} log lines for 100 bad tokens"
        # the log says that the others were not logged one by one
        assert log_messages(caplog, "not logged"), "the suppression itself was never logged"
        await wait_until(lambda: not stack.edge.agent_connections, what="no agent connections")
        good = await stack.agent("sb-good")  # a real agent is unaffected
        assert good.session_id
    finally:
        await stack.close()


async def test_silent_peer_floods_are_logged_boundedly(caplog: pytest.LogCaptureFixture) -> None:
    """60 connections that never send a hello: all dropped, a bounded number of log lines."""
    caplog.set_level(logging.INFO, logger="tunneld")
    stack = await Stack(handshake_timeout=0.3).start()
    try:
        assert stack.edge is not None
        conns = [
            await asyncio.open_connection("127.0.0.1", stack.edge.agent_port) for _ in range(60)
        ]
        for reader, _writer in conns:
            await closed_within(reader, 5)
        for _reader, writer in conns:
            writer.close()
        await wait_until(lambda: not stack.edge.agent_connections, what="no agent connections")
        lines = log_messages(caplog, "sent no hello")
        assert 1 <= len(lines) <= 20, f"{len(lines)} log lines for 60 silent peers"
    finally:
        await stack.close()


async def test_websocket_agent_upgrades_that_are_not_agents_are_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The WebSocket carriage before authentication: an upgrade head past 16 KiB, an upgrade for
    another path and an upgrade that never completes are each closed; the edge keeps nothing."""
    caplog.set_level(logging.INFO, logger="tunnel.mux")
    stack = await Stack(handshake_timeout=30).start()
    try:
        assert stack.edge is not None
        port = stack.edge.agent_port
        # 1. an endless head: closed by its size bound, long before the hello timer
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /v1/agent HTTP/1.1\r\n")
        try:
            for _ in range(40):  # 40 KiB, far past the 16 KiB bound
                writer.write(b"x-pad: " + b"a" * 1015 + b"\r\n")
                await writer.drain()
        except ConnectionError:
            pass  # closed while we were still sending: the bound at work
        await closed_within(reader, 10)
        writer.close()
        assert log_messages(caplog, "agent link closed: WebSocket"), "not closed by the head bound"
    finally:
        await stack.close()
    stack = await Stack(handshake_timeout=0.5).start()
    try:
        assert stack.edge is not None
        port = stack.edge.agent_port
        # 2. another path: 404, closed
        ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(ws.send(wse.Request(host="edge", target="/admin")))
        answer = await closed_within(reader, 5)
        assert answer.startswith(b"HTTP/1.1 404 "), answer[:100]
        writer.close()
        # 3. an upgrade cut in the middle, then silence: the hello timer ends it
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /v1/agent HTTP/1.1\r\nHost: edge\r\nUpgrade: websocket\r\n")
        await closed_within(reader, 5)
        writer.close()
        await wait_until(lambda: not stack.edge.agent_connections, what="no agent connections")
    finally:
        await stack.close()


# -- an authenticated agent past its credit ----------------------------------------------------
async def test_agent_sending_beyond_its_credit_loses_its_session_not_the_edge() -> None:
    """A hostile agent answers a preview stream whose client reads nothing with far more bytes
    than the edge granted (up to 16 MiB, never waiting for credit). The edge ends that session
    with FLOW_CONTROL_ERROR instead of buffering it, the client's connection is cut, and another
    sandbox keeps being served."""
    stack = await Stack().start()
    try:
        assert stack.edge is not None
        origin = await stack.origin()
        await stack.agent("good")
        good_url = (await stack.expose("good", origin.port))["exposedAt"]
        exposed = await stack.expose("evil", 8000)
        host = stack.host_of(exposed["exposedAt"]).encode()

        reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.agent_port)
        evil = Session(Role.AGENT)
        evil.send_control(control.Hello("evil", agent_token(stack.secret, "evil")))
        writer.write(_frames(evil))

        async def until(kind: type, timeout: float = 10) -> object:
            async with asyncio.timeout(timeout):
                while True:
                    for event in evil.events_received():
                        if isinstance(event, kind):
                            return event
                    data = await reader.read(65536)
                    assert data, "the edge closed the link"
                    evil.receive_data(data)
                    writer.write(_frames(evil))

        welcome = await until(ControlReceived)
        assert isinstance(welcome.message, control.Welcome)  # type: ignore[attr-defined]
        # a client that sends its request and never reads: a small receive buffer, no reads
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", stack.edge.public_port))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        opened = await until(StreamOpened)
        sid = opened.stream_id  # type: ignore[attr-defined]
        evil.accept_stream(sid)
        writer.write(_frames(evil))
        frame = encode_frame(FrameType.DATA, 0, sid, b"x" * 65536)
        ended: object = None
        try:
            async with asyncio.timeout(20):
                for _ in range(256):  # 16 MiB, never reading the edge's window updates
                    writer.write(frame)
                    await writer.drain()
                ended = await until(ConnectionTerminated)
        except (ConnectionError, AssertionError):
            pass  # the edge cut the link before we read its GO_AWAY: fine
        if ended is None:
            with contextlib.suppress(ConnectionError, AssertionError, TimeoutError):
                ended = await until(ConnectionTerminated, 5)
        if ended is not None:
            assert ended.code == GoAwayCode.FLOW_CONTROL_ERROR, ended  # type: ignore[attr-defined]
        writer.close()
        await wait_until(
            lambda: all(s.sandbox_id != "evil" for s in stack.edge.agent_connections),
            what="the hostile session gone",
        )
        # the stalled client was cut (reset), not left holding the edge's buffers
        await wait_until(
            lambda: not any(c.sandbox_id == "evil" for c in stack.edge.public_connections),
            what="the evil sandbox's client connection closed",
        )
        sock.close()
        async with stack.client(good_url) as c:
            r = await c.get("/")
        assert r.status_code == 200
    finally:
        await stack.close()


# -- the admin API before the token check ------------------------------------------------------
async def test_unauthenticated_admin_flood_does_not_lock_out_the_token_holder() -> None:
    """Requests without the admin token are refused (401, then 429) from a budget of their own:
    a peer without the token cannot spend the orchestrator's admin_rate."""
    stack = await Stack(admin_rate=0.5, admin_burst=10).start()
    try:
        assert stack.edge is not None
        import httpx

        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{stack.edge.admin_port}", timeout=10
        ) as anon:
            codes = [(await anon.get("/v1/sandboxes")).status_code for _ in range(30)]
            codes += [
                (
                    await anon.get("/v1/sandboxes", headers={"authorization": "Bearer wrong"})
                ).status_code
                for _ in range(10)
            ]
        assert set(codes) <= {401, 429} and codes[0] == 401 and codes[-1] == 429, codes
        assert stack.admin is not None
        r = await stack.admin.get("/v1/sandboxes")
        assert r.status_code == 200, r.text
    finally:
        await stack.close()


# -- the public listener ---------------------------------------------------------------------------
async def test_public_heads_that_never_finish_are_408_at_head_timeout() -> None:
    """30 connections that never send a byte and one that drips its head a byte at a time:
    each gets 408 at head_timeout (dripping does not push the timer back), and the edge holds
    no public connection afterwards."""
    stack = await Stack(head_timeout=0.5).start()
    try:
        assert stack.edge is not None
        port = stack.edge.public_port
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(30)]
        head = b"GET / HTTP/1.1\r\nHost: 8000-sb1-abcdefghijklmnop.localhost\r\n" + (
            b"x-slow: " + b"y" * 150 + b"\r\n\r\n"
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answer = b""
        for i in range(len(head)):  # 0.05 s a byte: ~10 s to finish if the timer moved
            try:
                writer.write(head[i : i + 1])
                answer = await asyncio.wait_for(reader.read(65536), 0.05)
            except TimeoutError:
                continue
            except ConnectionError:
                break
            break
        answer += await closed_within(reader, 5)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        writer.close()
        for r, _w in conns:
            silent = await closed_within(r, 5)
            assert silent.startswith(b"HTTP/1.1 408 "), silent[:200]
        for _r, w in conns:
            w.close()
        await wait_until(lambda: not stack.edge.public_connections, what="no public connections")
    finally:
        await stack.close()
