"""The agent pings at the pace the edge's welcome announces (``heartbeat_s``), never faster than
MIN_HEARTBEAT, and never declares the edge dead before the edge had two chances to ping it."""

from __future__ import annotations

import asyncio
import time

import pytest

from agent.core import MIN_HEARTBEAT

from .conftest import Stack
from .hostile_edge import HostileEdge, hostile_edge

pytestmark = pytest.mark.anyio


async def _wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_agent_adopts_the_edges_heartbeat() -> None:
    stack = await Stack(heartbeat_interval=0.3).start()
    try:
        agent = await stack.agent("sb1")
        session = agent.session
        assert session is not None
        # its own PINGs (default pace: one per 10 s) come back as an RTT sample within a second
        await _wait_for(lambda: session.rtt is not None, 3.0)
        assert session.session._heartbeat == 0.3
        assert session.session._dead_timeout == 15.0  # its own, longer than 1.5 x 0.3
    finally:
        await stack.close()


async def test_a_hostile_tiny_heartbeat_is_clamped() -> None:
    """A welcome cannot turn the agent into a PING flood."""
    edge = HostileEdge()
    edge.heartbeat_s = 0.001
    async with hostile_edge(edge=edge) as (_, agent):
        assert agent.session is not None
        assert agent.session.session._heartbeat == MIN_HEARTBEAT


async def test_a_long_heartbeat_stretches_the_dead_timeout() -> None:
    stack = await Stack(heartbeat_interval=40.0, dead_timeout=90.0).start()
    try:
        agent = await stack.agent("sb1")
        assert agent.session is not None
        assert agent.session.session._dead_timeout == 60.0  # 1.5 x the edge's 40 s
    finally:
        await stack.close()
