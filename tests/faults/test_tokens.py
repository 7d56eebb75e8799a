"""Row 13 of issue 7: a token that stops verifying ends the session that used it.

Rotating the secret (SIGHUP) closes the sessions whose token the new secret does not verify, and a
token minted with an expiry (``tunneld token ID --ttl 24h``) closes its live session when it
expires. Both end with GO_AWAY AUTH_FAILED and a log line on the edge.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time

import httpx
import pytest

from agent.core import Agent, AgentConfig
from tests.e2e.procs import Processes
from tunneld.auth import agent_token
from tunneld.cli import apply_reload

from .conftest import Stack

pytestmark = pytest.mark.anyio


async def _wait(predicate, timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        await asyncio.sleep(0.02)


def _session(stack: Stack, sandbox_id: str):
    state = stack.edge.registry.get(sandbox_id)
    return None if state is None else state.session


async def _agent_with(stack: Stack, sandbox_id: str, token: str) -> Agent:
    agent = Agent(AgentConfig("127.0.0.1", stack.edge.agent_port, sandbox_id, token))
    task = asyncio.get_running_loop().create_task(agent.run())
    stack.agents.append((agent, task))
    return agent


async def test_reload_with_rotated_secret_closes_sessions_it_no_longer_verifies(
    stack: Stack, caplog
) -> None:
    caplog.set_level(logging.INFO)
    origin = await stack.origin()
    await stack.agent("sb1")
    await stack.agent("sb2")
    exposed = await stack.expose("sb1", origin.port)
    first = _session(stack, "sb1")
    # A reload that keeps the secret leaves every session alone.
    apply_reload(stack.edge, dataclasses.replace(stack.config))
    assert _session(stack, "sb1") is first and not first.session.closed
    # A rotated secret ends both sessions, with AUTH_FAILED, and says why.
    apply_reload(stack.edge, dataclasses.replace(stack.config, secret="rotated-secret"))
    await _wait(lambda: _session(stack, "sb1") is None and _session(stack, "sb2") is None)
    assert first.session.closed

    def agents_told() -> bool:  # each agent logs the GO_AWAY it received
        ended = [r for r in caplog.records if "session ended: AUTH_FAILED" in r.getMessage()]
        return len(ended) >= 2

    await _wait(agents_told, what="agents saw GO_AWAY AUTH_FAILED")
    messages = [r.getMessage() for r in caplog.records]
    assert any("sb1" in m and "no longer verifies" in m for m in messages), messages
    # Its reconnects are refused, and its URL no longer reaches the sandbox.
    async with stack.client(exposed["exposedAt"]) as client:
        r = await client.get("/")
    assert r.status_code == 503
    await _wait(lambda: _session(stack, "sb1") is None, timeout=1)


async def test_expiring_token_closes_its_live_session(stack: Stack, caplog) -> None:
    caplog.set_level(logging.INFO)
    token = agent_token(stack.secret, "sb1", expires_at=int(time.time()) + 2)
    agent = await _agent_with(stack, "sb1", token)
    await asyncio.wait_for(agent.connected_event.wait(), 10)
    live = _session(stack, "sb1")
    assert live is not None
    await _wait(lambda: live.session.closed, timeout=10, what="session closed at expiry")
    await _wait(lambda: agent.last_refusal is not None, what="reconnect refused")
    assert agent.last_refusal[0] == "AUTH_FAILED"
    messages = [r.getMessage() for r in caplog.records]
    assert any("sb1" in m and "expired" in m for m in messages), messages
    assert _session(stack, "sb1") is None


async def test_expired_token_is_refused_at_connect(stack: Stack) -> None:
    token = agent_token(stack.secret, "sb1", expires_at=int(time.time()) - 1)
    agent = Agent(AgentConfig("127.0.0.1", stack.edge.agent_port, "sb1", token))
    with pytest.raises(ConnectionError):
        await agent.connect_once()
    assert agent.last_refusal is not None and agent.last_refusal[0] == "AUTH_FAILED"
    assert _session(stack, "sb1") is None


async def test_unexpired_v2_and_v1_tokens_work_side_by_side(stack: Stack) -> None:
    origin = await stack.origin()
    v2 = agent_token(stack.secret, "sb1", expires_at=int(time.time()) + 3600)
    agent = await _agent_with(stack, "sb1", v2)
    await asyncio.wait_for(agent.connected_event.wait(), 10)
    await stack.agent("sb2")  # v1
    for sandbox in ("sb1", "sb2"):
        exposed = await stack.expose(sandbox, origin.port)
        async with stack.client(exposed["exposedAt"]) as client:
            assert (await client.get("/")).status_code == 200


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_sighup_with_rotated_secret_closes_the_agent_session(tmp_path, loop: str) -> None:
    procs = Processes(tmp_path, loop)
    secret_file = tmp_path / "secret"
    secret_file.write_text(procs.secret + "\n")
    try:
        ports = procs.start_edge(
            env=procs.env(
                TUNNELD_ADMIN_TOKEN=procs.admin_token, TUNNELD_SECRET_FILE=str(secret_file)
            )
        )
        agent, _ = procs.start_agent("sb1")
        with httpx.Client(
            base_url=f"http://127.0.0.1:{ports['admin']}",
            headers={"authorization": f"Bearer {procs.admin_token}"},
            timeout=10,
        ) as admin:

            def connected() -> bool:
                sandboxes = admin.get("/v1/sandboxes").json()["sandboxes"]
                return any(s["id"] == "sb1" and s["connected"] for s in sandboxes)

            _wait_sync(connected, "agent connected")
            secret_file.write_text("a-rotated-secret\n")
            procs.edge.send_signal(signal.SIGHUP)
            _wait_sync(lambda: not connected(), "session closed after SIGHUP")
            time.sleep(0.5)  # a reconnect with the old token must stay refused
            assert not connected()
        procs.stop(procs.edge)
        procs.stop(agent)
        edge_log = procs.output(procs.edge)
        agent_log = procs.output(agent)
        assert "no longer verifies" in edge_log, edge_log
        assert "AUTH_FAILED" in agent_log, agent_log
        assert "Traceback" not in edge_log + agent_log
    finally:
        procs.close()


def _wait_sync(predicate, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        time.sleep(0.05)
