"""The agent pings at least as often as the edge's welcome asks (``heartbeat_s``), never faster than
MIN_HEARTBEAT; its dead timeout always outlasts 1.5 of its own PING intervals."""

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


async def test_a_slower_edge_does_not_slow_the_agent() -> None:
    """The agent keeps its own (faster) pace and dead timeout: its PINGs are answered, so a
    dead link is still found within its own dead timeout."""
    stack = await Stack(heartbeat_interval=40.0, dead_timeout=90.0).start()
    try:
        agent = await stack.agent("sb1")
        assert agent.session is not None
        assert agent.session.session._heartbeat == 10.0
        assert agent.session.session._dead_timeout == 15.0
    finally:
        await stack.close()
