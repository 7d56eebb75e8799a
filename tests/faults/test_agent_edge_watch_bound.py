"""Bound: an edge's ``watch_port`` requests cannot make the agent probe without limit.

docs/agent.md, Waiting for a port: "at most 64 watches run at once per agent (these and the
edge's, see the admin API's ``POST /v1/sandboxes/{id}/ports/{port}/wait``); past that, 429
``TOO_MANY_WATCHES``"; docs/protocol.md lists ``TOO_MANY_WATCHES`` among the agent's replies to
``watch_port``. tests/e2e/test_wait_port.py checks the reply with the limit set to 0; here a
hostile edge fills the real limit itself: its 65th watch is refused with ``TOO_MANY_WATCHES``
and its id, the local API's own port watch is then refused 429 (one pool for both), and the
edge's watches end with its session, so a reconnecting edge cannot pile them up.

Real sockets on 127.0.0.1: a scripted edge (the sans-IO session) and the agent's local API.
"""

from __future__ import annotations

import socket

import orjson
import pytest

from agent.portwatch import MAX_WATCHES
from protocol import control
from tests.e2e.conftest import raw_request, wait_until

from .hostile_edge import hostile_edge

pytestmark = pytest.mark.anyio


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed): every probe is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_an_edge_gets_at_most_the_agents_watches_and_loses_them_with_its_session() -> None:
    port = _closed_port()
    async with hostile_edge() as (edge, agent):
        api = await agent.serve_local_api("127.0.0.1", 0)
        try:
            watches = agent.port_watches
            # Slow probes (every 10 s, for 5 min): the watches stay alive for the whole test.
            for request_id in range(1, MAX_WATCHES + 1):
                edge.tell(
                    control.WatchPort(request_id, port, "tcp", interval_ms=10_000, timeout_s=300)
                )
            await wait_until(lambda: watches.active == MAX_WATCHES, 10, "the edge's watches")

            edge.tell(control.WatchPort(MAX_WATCHES + 1, port, "tcp", timeout_s=300))
            reply = await edge.reply(MAX_WATCHES + 1)
            assert isinstance(reply, control.Error), reply
            assert reply.code == "TOO_MANY_WATCHES", reply
            assert watches.active == MAX_WATCHES

            # One pool: a process in the sandbox is refused as well, with the documented answer.
            body = orjson.dumps({"port": port, "mode": "tcp"})
            answer = await raw_request(
                api.port,
                b"POST /api/port-watch HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                b"application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body),
            )
            head, _, payload = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 429 "), answer[:200]
            assert orjson.loads(payload)["code"] == "TOO_MANY_WATCHES", answer[:400]

            # The link goes: every watch of that session ends and gives its slot back.
            assert edge.transport is not None
            edge.transport.abort()
            await wait_until(lambda: watches.active == 0, 10, "the watches to end with the link")
        finally:
            await api.close()


@pytest.mark.parametrize("port", [22, 1023, 3000])
async def test_an_edge_watch_of_a_port_the_agent_never_watches_is_refused(port: int) -> None:
    """docs/agent.md: "the agent exposes and watches ports 1024-65535 only, except 3000 and its
    own API port" -- also when an edge asks (tunneld's admin API refuses them first)."""
    async with hostile_edge() as (edge, agent):
        edge.tell(control.WatchPort(5, port, "tcp", timeout_s=300))
        reply = await edge.reply(5)
        assert isinstance(reply, control.Error), reply
        assert reply.code == "INVALID_PORT", reply
        assert reply.message.startswith(f"Invalid port number: {port}."), reply
        assert agent.port_watches.active == 0
        # status_min above status_max: refused before any probe, too.
        edge.tell(control.WatchPort(6, 8000, status_min=500, status_max=200))
        reply = await edge.reply(6)
        assert isinstance(reply, control.Error) and reply.code == "INVALID_REQUEST", reply
        assert agent.port_watches.active == 0
