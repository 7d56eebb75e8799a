"""The order of a connect round after a session ends, with three edges (docs/agent.md, Several
edges): "A session that ends after a welcome starts the next round with the same edge ... After
``GO_AWAY SHUTTING_DOWN`` (that edge is draining) the round starts with the next address and
tries the draining one last." tests/faults/test_agent_failover.py checks the first address of
the round with two edges; with three, the draining edge must come after both others, not just
after the next one, and a plain loss must start with the same edge again.

Real sockets on 127.0.0.1: edge A is a scripted edge (the sans-IO session); B and C refuse
(bound, not listening). The order is read from the agent's own "connecting to" lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from collections.abc import Iterator

import pytest

from agent.core import Agent, AgentConfig, EdgeAddress
from protocol.errors import GoAwayCode
from tests.e2e.conftest import wait_until

from .hostile_edge import HostileEdge

pytestmark = pytest.mark.anyio


@contextlib.contextmanager
def refusing() -> Iterator[int]:
    """A loopback port that refuses connections for as long as the block runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def attempts(caplog: pytest.LogCaptureFixture) -> list[int]:
    """The ``(N of 3)`` of every "connecting to" line, in order."""
    found = []
    for record in caplog.records:
        match = re.match(r"connecting to edge \S+ \((\d) of 3\)", record.getMessage())
        if match:
            found.append(int(match.group(1)))
    return found


async def test_a_draining_edge_is_tried_last_and_a_lost_one_first(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tunnel.agent")
    edges: list[HostileEdge] = []

    def edge_a() -> HostileEdge:
        edges.append(HostileEdge())
        return edges[-1]

    loop = asyncio.get_running_loop()
    server = await loop.create_server(edge_a, "127.0.0.1", 0)
    port_a = server.sockets[0].getsockname()[1]
    with refusing() as port_b, refusing() as port_c:
        servers = tuple(EdgeAddress("127.0.0.1", p) for p in (port_a, port_b, port_c))
        agent = Agent(AgentConfig("127.0.0.1", port_a, "sb1", "t", servers=servers))
        runner = asyncio.create_task(agent.run())
        try:
            await wait_until(lambda: agent.connected, 10, "the first session, on A")
            assert attempts(caplog) == [1]

            # A drains: GO_AWAY(SHUTTING_DOWN), then the link closes.
            first = edges[-1]
            first.session.close(GoAwayCode.SHUTTING_DOWN)
            first.flush()
            assert first.transport is not None
            first.transport.close()
            await wait_until(lambda: len(edges) == 2 and agent.connected, 10, "back on A")
            assert attempts(caplog) == [1, 2, 3, 1]  # B, C, then the draining A last

            # A's link is lost without a GO_AWAY: the next round starts with A again.
            second = edges[-1]
            assert second.transport is not None
            second.transport.abort()
            await wait_until(lambda: len(edges) == 3 and agent.connected, 10, "A again")
            assert attempts(caplog) == [1, 2, 3, 1, 1]
        finally:
            await agent.stop()
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
            server.close()
            for edge in edges:
                if edge.transport is not None:
                    edge.transport.abort()
            await server.wait_closed()
