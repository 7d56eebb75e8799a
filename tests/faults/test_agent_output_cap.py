"""Bound: an edge that floods the agent with requests and never reads the replies.

Every ``expose``/``unexpose`` an edge pushes is answered with an ``ok`` (docs/protocol.md: "The
agent acknowledges the edge's pushes with a bare ``ok {id}``"), and the agent does not
rate-limit the edge. An edge that sends pushes without reading would make the agent's tunnel
output grow without bound; relay/mux.py's ``TUNNEL_OUTPUT_CAP`` (1 MiB, docs/operations.md's
bounds table, tested there for the edge's WebSocket pongs) stops reading such a peer, so the
flood is held at the sender, and the dead-peer timer then ends the session. This is that bound
on the agent's side: ~5 MB of replies provoked, at most the cap plus one read's replies kept.

Real sockets on 127.0.0.1: a scripted edge (the sans-IO session) that stops reading its socket;
the agent's tunnel socket has a small fixed send buffer so the kernel's share stays small.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from protocol import control
from protocol.session import SessionConfig
from relay.buffers import READ_SIZE
from relay.mux import TUNNEL_OUTPUT_CAP
from tests.e2e.conftest import wait_until

from .hostile_edge import hostile_edge

pytestmark = pytest.mark.anyio

PUSHES = 100_000  # ~50 bytes each way: ~5 MB of replies


async def test_an_edge_that_never_reads_its_replies_is_held_at_the_cap_then_dropped() -> None:
    session_config = SessionConfig(heartbeat_interval=1.0, dead_timeout=2.0)
    async with hostile_edge(session=session_config) as (edge, agent):
        mux = agent.session
        assert mux is not None and mux.transport is not None and edge.transport is not None
        sock = mux.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
        edge.transport.pause_reading()  # the edge never reads again
        peak = 0
        flush = type(mux).flush

        def measured() -> None:
            nonlocal peak
            flush(mux)
            peak = max(peak, mux.output_backlog)

        mux.flush = measured  # type: ignore[method-assign]
        for request_id in range(1, PUSHES + 1):
            edge.session.send_control(control.Unexpose(request_id, 9000))
        edge.flush()

        # The cap, plus the replies to one read's requests (a reply is about a request's size).
        bound = TUNNEL_OUTPUT_CAP + 2 * READ_SIZE
        await wait_until(
            lambda: mux._read_paused or peak > bound, 30, "the agent to stop reading the edge"
        )
        assert peak <= bound, (peak, bound)
        assert peak > TUNNEL_OUTPUT_CAP // 2, peak  # the flood did fill the agent's output
        # Nothing arrives while the agent does not read: its dead-peer timer ends the session.
        async with asyncio.timeout(20):
            await asyncio.shield(mux.closed)
        assert mux.end_reason is not None and "TIMEOUT" in mux.end_reason, mux.end_reason
        assert peak <= bound, (peak, bound)
