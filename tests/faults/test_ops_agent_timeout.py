"""docs/operations.md: an agent that does not acknowledge an expose or unexpose in time.

- configuration table: "`control_timeout` ... seconds to wait for the agent's ack of
  expose/unexpose, then 504 `AGENT_TIMEOUT`"; Limits: "expose/unexpose ack | `control_timeout`";
- Troubleshooting: "admin 504 `AGENT_TIMEOUT` | the agent did not ack ... (stuck, overloaded,
  or a half-dead link not yet detected) | the change is recorded; retry; check the agent";
- Logs: `tunneld` warning "agent did not acknowledge in time".

The half-dead link is made real: the agent's link runs through a proxy that stops forwarding
(both ways, nothing closed), well within the dead timeout. The 504 comes after
`control_timeout`, the change is in the listing already, and once the link flows again the agent
applies it: the preview URL answers (expose) or stops answering (unexpose).
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from .conftest import FaultStack, get_and_close, log_messages

pytestmark = pytest.mark.anyio


async def test_an_unacknowledged_change_is_504_agent_timeout_and_recorded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="tunneld")
    stack = await FaultStack(control_timeout=0.5).start()  # dead_timeout stays 15 s
    try:
        edge = stack.edge
        assert edge is not None
        origin = await stack.origin()
        await stack.agent("sb1")
        stack.proxy.stall()  # the link half-dead: open, nothing moves
        r = await stack.admin.post("/v1/sandboxes/sb1/ports", json={"port": origin.port})
        assert r.status_code == 504, r.text
        assert r.json() == {
            "error": "The agent of sandbox sb1 did not acknowledge in time.",
            "code": "AGENT_TIMEOUT",
        }
        assert log_messages(caplog, "sandbox sb1: agent did not acknowledge in time")
        # "the change is recorded"
        ports = (await stack.admin.get("/v1/sandboxes/sb1/ports")).json()["ports"]
        assert [p["port"] for p in ports] == [origin.port]
        host = stack.host_of(ports[0]["exposedAt"]).encode()
        stack.proxy.pass_through()  # the link recovers: the agent gets the stalled expose
        for _ in range(100):  # bounded: each try waits at most 5 s
            answer = await get_and_close(edge.public_port, host)
            if answer.startswith(b"HTTP/1.1 200 "):
                break
            await asyncio.sleep(0.05)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"hello from origin")

        stack.proxy.stall()
        r = await stack.admin.delete(f"/v1/sandboxes/sb1/ports/{origin.port}")
        assert r.status_code == 504 and r.json()["code"] == "AGENT_TIMEOUT", r.text
        assert (await stack.admin.get("/v1/sandboxes/sb1/ports")).json()["ports"] == []
        stack.proxy.pass_through()
        answer = await get_and_close(edge.public_port, host)
        assert answer.startswith(b"HTTP/1.1 404 "), answer[:200]  # the edge routes no more
    finally:
        await stack.close()
