"""Control requests from an agent are rate-limited per session (issue 7, row 4): past the burst
the edge answers RATE_LIMITED (429 at the agent's local API), and the session stays up."""

from __future__ import annotations

import asyncio

import pytest

from agent.errors import AgentError

from .conftest import Stack

pytestmark = pytest.mark.anyio


async def test_requests_past_the_burst_are_refused_then_allowed_again() -> None:
    stack = await Stack(control_rate=0.5, control_burst=3).start()
    try:
        agent = await stack.agent("sb1")
        for port in (8001, 8002, 8003):  # the burst
            await agent.expose(port)
        with pytest.raises(AgentError) as err:
            await agent.expose(8004)
        assert (err.value.code, err.value.status) == ("RATE_LIMITED", 429)
        assert agent.connected  # refused, not disconnected
        assert stack.edge is not None
        assert sorted(r.port for r in stack.edge.registry.exposures("sb1")) == [8001, 8002, 8003]
        # the bucket refills at control_rate: a request a little later goes through
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            try:
                await agent.expose(8004)
                break
            except AgentError as exc:
                assert exc.code == "RATE_LIMITED"
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.5)
        assert 8004 in agent.exposures
    finally:
        await stack.close()
