"""Every end of the agent's session is logged with its reason (row 10 of issue 7, agent side).

An operator reading the agent's log must be able to tell a TLS misconfiguration from a dropped
link, an edge restart, a dead peer or a refused token, without turning on debug logging.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

import pytest
import trustme

from agent.core import Agent, AgentConfig
from protocol.session import SessionConfig
from tests.e2e.conftest import Stack
from tunneld.auth import agent_token

from .conftest import FaultStack

pytestmark = pytest.mark.anyio


async def _logged(caplog: pytest.LogCaptureFixture, *needles: str, timeout: float = 15) -> str:
    """The first agent log line (WARNING or above) containing every needle, waited for."""
    deadline = time.monotonic() + timeout
    while True:
        for record in caplog.records:
            line = record.getMessage()
            if (
                record.name == "tunnel.agent"
                and record.levelno >= logging.WARNING
                and all(n in line for n in needles)
            ):
                return line
        if time.monotonic() > deadline:
            lines = [r.getMessage() for r in caplog.records if r.name == "tunnel.agent"]
            raise AssertionError(f"no agent log line with {needles}: {lines}")
        await asyncio.sleep(0.05)


async def test_tls_failure_logs_the_ssl_reason(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    edge_ca, other_ca = trustme.CA(), trustme.CA()
    cert = edge_ca.issue_cert("edge.test", "127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    stack = await Stack(tls_cert=str(cert_file), tls_key=str(key_file)).start()
    try:
        context = ssl.create_default_context()
        other_ca.configure_trust(context)  # trusts a CA that did not sign the edge's certificate
        await stack.agent("sb1", wait=False, tls=context, server_hostname="edge.test")
        line = await _logged(caplog, "TLS", "CERTIFICATE_VERIFY_FAILED")
    finally:
        await stack.close()
    assert "certificate" in line


async def test_link_lost_logs_the_connection_error(caplog: pytest.LogCaptureFixture) -> None:
    stack = await FaultStack().start()
    try:
        await stack.agent("sb1")
        stack.proxy.drop()  # RST on the agent's link
        line = await _logged(caplog, "session", "connection lost")
    finally:
        await stack.close()
    assert "reset" in line.lower(), line


async def test_edge_going_away_logs_the_go_away_code(caplog: pytest.LogCaptureFixture) -> None:
    stack = await Stack().start()
    try:
        agent = await stack.agent("sb1")
        assert stack.edge is not None
        await stack.edge.stop(grace=0.2)
        stack.edge = None
        await _logged(caplog, "session", "SHUTTING_DOWN")
        await agent.stop()
    finally:
        await stack.close()


async def test_dead_link_logs_the_timeout(caplog: pytest.LogCaptureFixture) -> None:
    stack = await FaultStack().start()
    try:
        token = agent_token(stack.secret, "sb1")
        config = SessionConfig(heartbeat_interval=0.3, dead_timeout=1.0)
        agent = Agent(AgentConfig("127.0.0.1", stack.proxy.port, "sb1", token, session=config))
        task = asyncio.get_running_loop().create_task(agent.run())
        stack.agents.append((agent, task))
        await asyncio.wait_for(agent.connected_event.wait(), 10)
        stack.proxy.stall()  # nothing gets through, nothing is closed
        await _logged(caplog, "session", "TIMEOUT")
    finally:
        await stack.close()


async def test_refused_token_logs_the_refusal(caplog: pytest.LogCaptureFixture) -> None:
    stack = await Stack().start()
    try:
        assert stack.edge is not None
        agent = Agent(AgentConfig("127.0.0.1", stack.edge.agent_port, "sb1", "not-a-token"))
        task = asyncio.get_running_loop().create_task(agent.run())
        stack.agents.append((agent, task))
        line = await _logged(caplog, "refused")
    finally:
        await stack.close()
    assert "AUTH" in line or "token" in line.lower(), line
