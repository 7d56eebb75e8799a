"""The agent fails over between several edge addresses (issue 9: ``--server a:7000,b:7000``).

Real sockets on 127.0.0.1 and real ``EdgeServer``s. A refusing address is a socket bound to a
port but not listening (ECONNREFUSED), kept bound for the test's life so nobody else takes the
port. The order of attempts is read from the agent's own log ("connecting to edge ..."), which
is also what an operator reads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trustme

from agent import core
from agent.core import Agent, AgentConfig, EdgeAddress
from tests.e2e.origin import OriginThread
from tests.e2e.procs import Processes, admin_client, is_connected, preview_get, wait_for
from tunneld.auth import agent_token

from .conftest import FaultProxy, Stack

LOG = "tunnel.agent"


@pytest.fixture
def agent_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=LOG)
    return caplog


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOG]


def attempts(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the agent dialled, in order ("edge 127.0.0.1:7000 (1 of 2)" ...)."""
    prefix = "connecting to "
    return [m[len(prefix) :] for m in messages(caplog) if m.startswith(prefix)]


def retry_delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    found = (re.search(r"retrying in ([0-9.]+) s$", m) for m in messages(caplog))
    return [float(match.group(1)) for match in found if match]


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


def edges(*ports: int) -> tuple[EdgeAddress, ...]:
    return tuple(EdgeAddress("127.0.0.1", port) for port in ports)


def config(secret: str, servers: tuple[EdgeAddress, ...], **options: Any) -> AgentConfig:
    first = servers[0]
    token = agent_token(secret, "sb1")
    return AgentConfig(first.host, first.port, "sb1", token, servers=servers, **options)


@asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[Agent]:
    task = asyncio.get_running_loop().create_task(agent.run())
    try:
        yield agent
    finally:
        await agent.stop()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass


@asynccontextmanager
async def edge_pair() -> AsyncIterator[tuple[Stack, Stack]]:
    """Two edges sharing one agent secret (as the nodes of one deployment do)."""
    a = await Stack().start()
    b = Stack()
    b.secret = a.secret
    b.config = dataclasses.replace(b.config, secret=a.secret)
    try:
        await b.start()
        yield a, b
    finally:
        await b.close()
        await a.close()


@pytest.mark.anyio
async def test_refusing_first_address_fails_over_to_the_second_without_backoff(
    stack: Stack, refusing: int, agent_log: pytest.LogCaptureFixture, monkeypatch
) -> None:
    # Any backoff sleep would last 30-60 s: the agent must be on the second edge well before.
    monkeypatch.setattr(core, "BACKOFF_FIRST", 60.0)
    assert stack.edge is not None
    edge = stack.edge.agent_port
    async with running(Agent(config(stack.secret, edges(refusing, edge)))) as agent:
        await asyncio.wait_for(agent.connected_event.wait(), 10)
        assert stack.edge.registry.get("sb1").session is not None
        origin = await stack.origin()
        exposed = await stack.expose("sb1", origin.port)
        async with stack.client(exposed["exposedAt"]) as client:
            r = await client.get("/")
        assert (r.status_code, r.content) == (200, b"hello from origin")
    assert attempts(agent_log) == [
        f"edge 127.0.0.1:{refusing} (1 of 2)",
        f"edge 127.0.0.1:{edge} (2 of 2)",
    ]
    logged = messages(agent_log)
    assert any(
        m.startswith(f"cannot connect to edge 127.0.0.1:{refusing} (1 of 2): ConnectionRefused")
        for m in logged
    ), logged
    assert any(
        m.startswith(f"connected to edge 127.0.0.1:{edge} (2 of 2) as sandbox sb1") for m in logged
    )
    assert retry_delays(agent_log) == []


@pytest.mark.anyio
async def test_go_away_from_the_edge_moves_the_agent_to_the_next_edge(
    agent_log: pytest.LogCaptureFixture,
) -> None:
    async with edge_pair() as (a, b):
        assert a.edge is not None and b.edge is not None
        port_a, port_b = a.edge.agent_port, b.edge.agent_port
        origin = await b.origin()
        # B keeps its own exposures (no shared store here): the welcome from B brings them.
        exposed = await b.expose("sb1", origin.port)
        async with running(Agent(config(a.secret, edges(port_a, port_b)))) as agent:
            await asyncio.wait_for(agent.connected_event.wait(), 10)
            assert a.edge.registry.get("sb1").session is not None
            assert attempts(agent_log) == [f"edge 127.0.0.1:{port_a} (1 of 2)"]
            await a.edge.stop(grace=0.2)  # GO_AWAY(SHUTTING_DOWN), then the link closes
            a.edge = None  # stopped: a.close() must not stop it again

            await wait_until(
                lambda: agent.connected and b.edge.registry.get("sb1").session is not None,
                10,
                "the agent on edge B",
            )
            async with b.client(exposed["exposedAt"]) as client:
                r = await client.get("/")
            assert (r.status_code, r.content) == (200, b"hello from origin")
        # The draining edge is not tried first: the next round starts with B.
        assert attempts(agent_log) == [
            f"edge 127.0.0.1:{port_a} (1 of 2)",
            f"edge 127.0.0.1:{port_b} (2 of 2)",
        ]
        assert any("GO_AWAY SHUTTING_DOWN" in m for m in messages(agent_log))


@pytest.mark.anyio
async def test_a_lost_session_retries_the_same_edge_first(
    stack: Stack, refusing: int, agent_log: pytest.LogCaptureFixture
) -> None:
    """An edge restart or a blip: the edge that worked is tried again before the others."""
    assert stack.edge is not None
    async with FaultProxy("127.0.0.1", stack.edge.agent_port) as proxy:
        servers = edges(refusing, proxy.port)
        async with running(Agent(config(stack.secret, servers))) as agent:
            await asyncio.wait_for(agent.connected_event.wait(), 10)
            first = agent.session_id
            assert proxy.drop() == 1
            await wait_until(
                lambda: agent.connected and agent.session_id != first, 10, "a new session"
            )
    assert attempts(agent_log) == [
        f"edge 127.0.0.1:{refusing} (1 of 2)",
        f"edge 127.0.0.1:{proxy.port} (2 of 2)",
        f"edge 127.0.0.1:{proxy.port} (2 of 2)",  # the one that last worked, first
    ]


@pytest.mark.anyio
async def test_edge_down_then_back_retries_in_order_with_backoff_bounded_by_the_cap(
    stack: Stack, refusing: int, agent_log: pytest.LogCaptureFixture, monkeypatch
) -> None:
    cap = 0.4  # uncapped, the 6th round's delay would be 3.2 s
    monkeypatch.setattr(core, "BACKOFF_CAP", cap)
    assert stack.edge is not None
    async with FaultProxy("127.0.0.1", stack.edge.agent_port) as proxy:
        down, other = f"edge 127.0.0.1:{proxy.port} (1 of 2)", f"edge 127.0.0.1:{refusing} (2 of 2)"
        async with running(Agent(config(stack.secret, edges(proxy.port, refusing)))) as agent:
            await asyncio.wait_for(agent.connected_event.wait(), 10)
            proxy.refuse()  # the edge is down: every new link is reset at once
            proxy.drop()

            def rounds_failed() -> int:
                return sum(m.startswith("no edge answered") for m in messages(agent_log))

            await wait_until(lambda: rounds_failed() >= 6, 30, "six failed rounds")
            proxy.accept()  # the edge is back
            await wait_until(
                lambda: agent.connected and stack.edge.registry.get("sb1").session is not None,
                10,
                "the agent back on the edge",
            )
    tried = attempts(agent_log)
    assert tried[0] == down
    # After the loss: rounds of (the edge that worked, then the other), in order, until it is back.
    after = tried[1:]
    assert len(after) >= 13 and len(after) % 2 == 1, after
    assert after == [down, other] * (len(after) // 2) + [down]
    logged = messages(agent_log)
    assert any(m.startswith(f"cannot connect to {other}: ConnectionRefused") for m in logged), (
        logged
    )
    assert any(m.startswith(f"cannot connect to {down}: ") for m in logged), logged
    delays = retry_delays(agent_log)  # the session end's, then one per failed round
    assert len(delays) >= 7
    assert all(delay <= cap for delay in delays), delays
    assert max(delays[-3:]) >= cap / 2  # it did grow to the cap (jitter: [cap/2, cap])


@pytest.mark.anyio
async def test_silent_address_costs_at_most_the_connect_timeout(
    stack: Stack, agent_log: pytest.LogCaptureFixture
) -> None:
    """An edge that accepts the connection but never answers the Hello (black-holed)."""
    accepted: list[asyncio.BaseTransport] = []

    class Silent(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.append(transport)

    loop = asyncio.get_running_loop()
    silent = await loop.create_server(Silent, "127.0.0.1", 0)
    silent_port = silent.sockets[0].getsockname()[1]
    assert stack.edge is not None
    servers = edges(silent_port, stack.edge.agent_port)
    try:
        agent = Agent(config(stack.secret, servers, connect_timeout=1.0))
        async with running(agent):
            started = loop.time()
            await asyncio.wait_for(agent.connected_event.wait(), 10)
            elapsed = loop.time() - started
    finally:
        silent.close()
        for transport in accepted:
            transport.close()
        await silent.wait_closed()
    assert accepted, "the silent edge was never dialled"
    assert 1.0 <= elapsed < 6.0, elapsed  # the timeout, then the next edge at once (generous)
    logged = messages(agent_log)
    assert f"cannot connect to edge 127.0.0.1:{silent_port} (1 of 2): timed out after 1 s" in logged


@pytest.mark.anyio
async def test_a_name_with_several_addresses_tries_them_in_order_and_is_resolved_each_round(
    stack: Stack, refusing: int, agent_log: pytest.LogCaptureFixture, monkeypatch
) -> None:
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo
    lookups: list[str] = []
    answers: list[tuple[str, int]] = []

    async def getaddrinfo(host: Any, port: Any, **kwargs: Any) -> Any:
        if host != "edges.test":
            return await real(host, port, **kwargs)
        lookups.append(host)
        return [
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", address)
            for address in answers
        ]

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    assert stack.edge is not None
    async with (
        FaultProxy("127.0.0.1", stack.edge.agent_port) as first,
        FaultProxy("127.0.0.1", stack.edge.agent_port) as second,
    ):
        answers[:] = [("127.0.0.1", refusing), ("127.0.0.1", first.port)]
        servers = (EdgeAddress("edges.test", 7000),)
        async with running(Agent(config(stack.secret, servers))) as agent:
            await asyncio.wait_for(agent.connected_event.wait(), 10)
            assert first.accepted == 1
            assert attempts(agent_log) == [
                f"edge edges.test:7000 at 127.0.0.1:{refusing} (address 1 of 2)",
                f"edge edges.test:7000 at 127.0.0.1:{first.port} (address 2 of 2)",
            ]
            # DNS changes while connected: the next round must use the new answer.
            answers[:] = [("127.0.0.1", second.port)]
            session = agent.session_id
            first.refuse()
            first.drop()
            await wait_until(
                lambda: agent.connected and agent.session_id != session, 10, "reconnected"
            )
            assert second.accepted == 1
    assert lookups == ["edges.test", "edges.test"]
    connected = [m for m in messages(agent_log) if m.startswith("connected to ")]
    assert connected[-1].startswith(
        f"connected to edge edges.test:7000 at 127.0.0.1:{second.port} as sandbox sb1"
    )


@pytest.mark.anyio
async def test_with_tls_each_edge_is_checked_against_its_own_entry_host(
    tmp_path: Any, agent_log: pytest.LogCaptureFixture, monkeypatch
) -> None:
    """The certificate names edge.test only: the entry other.test fails, edge.test connects."""
    ca = trustme.CA()
    cert = ca.issue_cert("edge.test")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_file), append=True)
    cert.private_key_pem.write_to_path(str(key_file))
    stack = await Stack(tls_cert=str(cert_file), tls_key=str(key_file)).start()
    try:
        assert stack.edge is not None
        port = stack.edge.agent_port
        loop = asyncio.get_running_loop()
        real = loop.getaddrinfo

        async def getaddrinfo(host: Any, port_: Any, **kwargs: Any) -> Any:
            if host in ("other.test", "edge.test"):  # both names are this edge
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port_))]
            return await real(host, port_, **kwargs)

        monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
        context = ssl.create_default_context()
        ca.configure_trust(context)
        servers = (
            EdgeAddress("other.test", port, tls=True),
            EdgeAddress("edge.test", port, tls=True),
        )
        async with running(Agent(config(stack.secret, servers, tls=context))) as agent:
            await asyncio.wait_for(agent.connected_event.wait(), 10)
            session = stack.edge.registry.get("sb1").session
            assert session is not None and session.transport is not None
            assert session.transport.get_extra_info("ssl_object") is not None
    finally:
        await stack.close()
    logged = messages(agent_log)
    assert any(
        m.startswith(f"cannot connect to edge other.test:{port} (1 of 2) at 127.0.0.1:{port}: ")
        and "TLS handshake failed" in m
        and "other.test" in m.split(": ", 1)[1]
        for m in logged
    ), logged
    assert any(m.startswith(f"connected to edge edge.test:{port} (2 of 2) at ") for m in logged)


# -- real processes ------------------------------------------------------------------------------


def test_agent_process_fails_over_to_the_edge_process_and_serves_a_preview(
    procs: Processes, refusing: int
) -> None:
    ports = procs.start_edge()
    service = OriginThread()  # the sandbox's service
    try:
        server = f"127.0.0.1:{refusing},127.0.0.1:{ports['agent']}"
        agent, _ = procs.start_agent_at(server, "sb1")
        wait_for(lambda: is_connected(procs, "sb1"), 15, "the agent connected")
        with admin_client(procs) as admin:
            r = admin.post("/v1/sandboxes/sb1/ports", json={"port": service.port})
            assert r.status_code == 200, r.text
            url = r.json()["exposedAt"]
        answer = wait_for(
            lambda: (r := preview_get(procs, url)).status_code == 200 and r, 15, "a 200 preview"
        )
        assert answer.content == b"hello from origin"
        assert procs.stop(agent) == 0
    finally:
        service.close()
    out = procs.output(agent)
    assert f"connecting to edge 127.0.0.1:{refusing} (1 of 2)" in out
    assert f"cannot connect to edge 127.0.0.1:{refusing} (1 of 2): ConnectionRefused" in out
    assert f"connected to edge 127.0.0.1:{ports['agent']} (2 of 2) as sandbox sb1" in out
    assert "retrying in" not in out, out
    assert isinstance(answer, httpx.Response)
