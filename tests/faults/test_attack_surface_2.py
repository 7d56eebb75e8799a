"""What an unauthenticated or hostile peer can make the edge and the agent hold and log
(continues test_attack_surface.py).

The bounds checked here: agent connections that have not authenticated yet (``max_pending_agents``,
plain and TLS, refused at once past it); admin API connections per client IP
(``admin_max_connections_per_ip``, so one peer cannot lock the token holder out); and the log
lines a peer can cause one per connection or stream (refused API connections, bad WebSocket
upgrades on the agent port, streams a hostile edge opens to ports the agent refuses), which are
rate-limited like the agent port's warnings (``relay.budget.RateLimitedLog``). Real sockets on
loopback; several client addresses come from binding the client socket to 127.0.0.2 / 127.0.0.3
before connecting (Linux routes all of 127/8 to lo). Sized for a 2-core machine.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

import pytest
import wsproto
import wsproto.events as wse

from protocol.errors import ResetCode
from protocol.events import StreamReset
from relay.httpapi import ApiServer, Limits, json_response
from tests.e2e.conftest import Stack, wait_until
from tunneld.admin import LIMITS
from tunneld.config import Config

from .conftest import closed_within, log_messages, tls_files
from .hostile_edge import hostile_edge

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _connect(
    port: int, source: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


def _close_all(conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    for _reader, writer in conns:
        writer.close()


def _refused(stack: Stack) -> float:
    assert stack.edge is not None
    return float(stack.edge.metrics.agent_connections_refused._value.get())


# -- agent connections before authentication -----------------------------------------------------
async def test_pending_agent_connections_are_capped_and_a_real_agent_gets_in_after(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """8 silent connections fill max_pending_agents = 8: 30 more are each closed at once (while
    the 8 are still held), counted, and logged in a bounded number of lines. Once the 8 reach
    handshake_timeout, a real agent connects."""
    caplog.set_level(logging.INFO, logger="tunneld")
    stack = await Stack(max_pending_agents=8, handshake_timeout=2.0).start()
    silent: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    extra: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        edge = stack.edge
        assert edge is not None
        port = edge.agent_port
        silent = [await _connect(port) for _ in range(8)]
        await wait_until(lambda: len(edge.pending_agents) == 8, what="8 pending agents")
        extra = [await _connect(port) for _ in range(30)]
        for reader, _writer in extra:
            assert await closed_within(reader, 1.5) == b""  # closed without a word
        # refused at accept, not dropped at the handshake timeout: the 8 are still held
        assert len(edge.pending_agents) == 8
        assert all(s.transport is not None for s in edge.agent_connections)
        assert _refused(stack) == 30
        lines = log_messages(caplog, "connections already wait to authenticate")
        assert 1 <= len(lines) <= 10, f"{len(lines)} log lines for 30 refused connections"
        assert log_messages(caplog, "not logged"), "the suppression itself was never logged"
        for reader, _writer in silent:
            await closed_within(reader, 5)  # handshake_timeout
        await wait_until(lambda: not edge.pending_agents, what="no pending agents")
        agent = await stack.agent("sb1")
        assert agent.session_id
        assert _refused(stack) == 30
        assert not edge.pending_agents  # an authenticated agent is no longer pending
    finally:
        _close_all(silent + extra)
        await stack.close()


async def test_tls_handshakes_count_as_pending_agents(tmp_path: Path) -> None:
    """On a TLS agent port a connection counts from its accept, while its TLS handshake runs:
    4 peers that never send a ClientHello fill max_pending_agents = 4, and 10 more are closed
    at once. Once the 4 are dropped, a TLS agent connects (and stops counting)."""
    ca, cert_file, key_file = tls_files(tmp_path, "edge.test", "127.0.0.1")
    stack = await Stack(
        tls_cert=cert_file, tls_key=key_file, max_pending_agents=4, handshake_timeout=2.0
    ).start()
    silent: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    extra: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        edge = stack.edge
        assert edge is not None
        port = edge.agent_port
        silent = [await _connect(port) for _ in range(4)]
        await wait_until(lambda: len(edge.pending_agents) == 4, what="4 pending handshakes")
        extra = [await _connect(port) for _ in range(10)]
        for reader, _writer in extra:
            assert await closed_within(reader, 1.5) == b""
        assert len(edge.pending_agents) == 4 and _refused(stack) == 10
        for reader, _writer in silent:
            await closed_within(reader, 5)  # the TLS handshake bound
        await wait_until(lambda: not edge.pending_agents, what="no pending agents")
        client = ssl.create_default_context()
        ca.configure_trust(client)
        agent = await stack.agent("sb1", tls=client, server_hostname="edge.test")
        assert agent.session_id
        session = edge.registry.get("sb1").session  # type: ignore[union-attr]
        assert session is not None and session.transport is not None
        assert session.transport.get_extra_info("ssl_object") is not None
        assert not edge.pending_agents
    finally:
        _close_all(silent + extra)
        await stack.close()


def test_pending_agents_setting() -> None:
    """The default leaves room for a reconnect storm; 0 would refuse every agent."""
    from tunneld.config import ConfigError, load_config

    assert Config().max_pending_agents == 1024
    secrets = {"TUNNELD_ADMIN_TOKEN": "a", "TUNNELD_SECRET": "s"}
    config = load_config(None, environ={**secrets, "TUNNELD_MAX_PENDING_AGENTS": "7"})
    assert config.max_pending_agents == 7
    with pytest.raises(ConfigError, match="max_pending_agents"):
        load_config(None, {"max_pending_agents": 0}, environ=secrets)
    assert Config().admin_max_connections_per_ip == 64 < LIMITS.max_connections
    for bad in (0, LIMITS.max_connections + 1):
        with pytest.raises(ConfigError, match="admin_max_connections_per_ip"):
            load_config(None, {"admin_max_connections_per_ip": bad}, environ=secrets)


async def test_websocket_upgrade_floods_are_logged_boundedly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """40 WebSocket upgrades for another path on the agent port: each gets its 404 and is
    closed, but "agent link closed" is logged a bounded number of times, with a summary."""
    caplog.set_level(logging.INFO, logger="tunnel.mux")
    stack = await Stack().start()
    try:
        assert stack.edge is not None
        port = stack.edge.agent_port

        async def one() -> bytes:
            reader, writer = await _connect(port)
            try:
                ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
                writer.write(ws.send(wse.Request(host="edge", target="/admin")))
                return await closed_within(reader, 5)
            finally:
                writer.close()

        sem = asyncio.Semaphore(10)

        async def limited() -> bytes:
            async with sem:
                return await one()

        answers = await asyncio.gather(*(limited() for _ in range(40)))
        assert all(a.startswith(b"HTTP/1.1 404 ") for a in answers)
        lines = log_messages(caplog, "agent link closed:")
        assert 1 <= len(lines) <= 10, f"{len(lines)} log lines for 40 bad upgrades"
        assert log_messages(caplog, "not logged"), "the suppression itself was never logged"
    finally:
        await stack.close()


# -- the admin API: per client IP ----------------------------------------------------------------
async def test_one_client_ip_cannot_hold_every_admin_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A peer at 127.0.0.2 holds admin_max_connections_per_ip = 4 idle connections: its next
    ones get 503 TOO_MANY_CONNECTIONS at once (naming its address; the warnings bounded), while
    the token holder at 127.0.0.3 is still served. When the peer lets one go, it may open one."""
    caplog.set_level(logging.INFO, logger="tunneld.admin")
    stack = await Stack(admin_max_connections_per_ip=4).start()
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        edge = stack.edge
        assert edge is not None and edge.admin is not None
        port = edge.admin_port
        try:
            held = [await _connect(port, "127.0.0.2") for _ in range(4)]
        except OSError:
            pytest.skip("127.0.0.2 is not a local address here")
        await wait_until(lambda: edge.admin.http.connections == 4, what="4 admin connections")
        for _ in range(30):
            reader, writer = await _connect(port, "127.0.0.2")
            answer = await closed_within(reader, 5)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
            assert b'"code":"TOO_MANY_CONNECTIONS"' in answer
            assert b"from 127.0.0.2: the limit is 4 per client address" in answer
        lines = log_messages(caplog, "refused a connection from 127.0.0.2")
        assert 1 <= len(lines) <= 10, f"{len(lines)} log lines for 30 refused connections"
        assert log_messages(caplog, "not logged")
        # the token holder, from another address
        reader, writer = await _connect(port, "127.0.0.3")
        writer.write(
            b"GET /v1/sandboxes HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n"
            b"Authorization: Bearer " + stack.admin_token.encode() + b"\r\n\r\n"
        )
        answer = await closed_within(reader, 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        # one of the peer's connections ends: its count goes down with it
        held.pop()[1].close()
        await wait_until(lambda: edge.admin.http.connections == 3, what="3 admin connections")
        reader, writer = await _connect(port, "127.0.0.2")
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        answer = await closed_within(reader, 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    finally:
        _close_all(held)
        await stack.close()


async def test_refusals_over_the_connection_cap_are_logged_boundedly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The shared API server (admin API, agent local API) over its total cap: 40 connections
    each get their 503, and the warnings are a burst, then a summary."""
    logger = logging.getLogger("test.attack_surface_2.api")
    caplog.set_level(logging.INFO, logger=logger.name)

    async def handler(request: object, exchange: object) -> object:
        return json_response(200, {})

    server = ApiServer(
        handler,  # type: ignore[arg-type]
        name="test API",
        limits=Limits(max_connections=2, linger_seconds=0.2),
        logger=logger,
    )
    listener = await server.start("127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        held = [await _connect(port) for _ in range(2)]
        await wait_until(lambda: server.connections == 2, what="2 connections")
        for _ in range(40):
            reader, writer = await _connect(port)
            answer = await closed_within(reader, 5)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 503 ") and b"the limit is 2." in answer
        lines = log_messages(caplog, "refused a connection")
        assert 1 <= len(lines) <= 10, f"{len(lines)} log lines for 40 refused connections"
        assert log_messages(caplog, "not logged")
    finally:
        _close_all(held)
        await server.close()


# -- the agent, against a hostile edge ----------------------------------------------------------
async def test_streams_to_refused_ports_are_logged_boundedly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hostile edge opens 60 streams the agent must refuse (a port out of range, port 3000, a
    preview stream to an unexposed port): each is reset PORT_NOT_ALLOWED, and the agent's
    warnings about them are a burst, then a summary, not one a stream."""
    caplog.set_level(logging.INFO, logger="tunnel.agent")
    async with hostile_edge(exposures=[]) as (edge, agent):
        sids = []
        for i in range(20):
            sids.append(edge.open(80 + i, "direct", flush=False))
            sids.append(edge.open(3000, "direct", flush=False))
            sids.append(edge.open(8000 + i, "preview", flush=False))
        edge.flush()
        for sid in sids:
            event = await edge.outcome(sid)
            assert isinstance(event, StreamReset) and event.code == ResetCode.PORT_NOT_ALLOWED
        lines = [
            m
            for m in log_messages(caplog, "edge ")
            if "never dials" in m or "control API; refused" in m or "not exposed; refused" in m
        ]
        assert 1 <= len(lines) <= 10, f"{len(lines)} log lines for 60 refused streams"
        assert log_messages(caplog, "not logged"), "the suppression itself was never logged"
        assert agent.connected
