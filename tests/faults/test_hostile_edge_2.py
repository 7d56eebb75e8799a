"""What a hostile edge can make the agent open, dial and keep (continues test_agent_api_port.py
and test_agent_preview_exposures.py).

The agent dials only its configured loopback hosts, whatever the edge puts in a stream's open
metadata, and every stream the edge opens that it refuses, or that fails to connect, leaves
nothing behind in the agent: no stream, no dial task, the session still up.
"""

from __future__ import annotations

import asyncio
import socket

import orjson
import pytest

from protocol.errors import ResetCode
from protocol.events import StreamAccepted, StreamReset
from protocol.frames import Flag, FrameType, encode_frame

from .hostile_edge import HostileEdge, hostile_edge

pytestmark = pytest.mark.anyio

REQUEST = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"


@pytest.fixture
def anyio_backend():
    return "asyncio"


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _open_with_metadata(edge: HostileEdge, port: int, extra: dict[str, object]) -> int:
    """Open a direct stream whose SYN metadata carries ``extra`` fields the protocol does not
    define (the sans-IO session never writes them, so its SYN is rewritten before it leaves)."""
    sid = edge.session.open_stream(port, "direct", "203.0.113.9:4444")
    ctrl = edge.session._ctrl  # the SYN is the last header + metadata queued
    meta = orjson.dumps({"port": port, "via": "direct", "client": "203.0.113.9:4444"})
    assert bytes(ctrl[-1]) == meta, ctrl[-2:]
    del ctrl[-2:]
    payload = orjson.dumps({"port": port, "via": "direct", "client": "x", **extra})
    ctrl.append(encode_frame(FrameType.DATA, Flag.SYN, sid, payload))
    edge.flush()
    return sid


async def test_the_edge_cannot_choose_the_host_the_agent_dials() -> None:
    """A service listening on 127.0.0.2 only (another loopback address, like any host that is
    not the sandbox's own) is never reached, whatever host the edge names in the open."""
    accepted = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    try:
        server = await asyncio.start_server(serve, "127.0.0.2", 0)
    except OSError:
        pytest.skip("127.0.0.2 is not a local address here")
    port = server.sockets[0].getsockname()[1]
    try:
        async with hostile_edge() as (edge, agent):
            outcomes = []
            for extra in (
                {"host": "127.0.0.2"},
                {"host": "127.0.0.2", "address": "127.0.0.2", "dial": f"127.0.0.2:{port}"},
            ):
                sid = _open_with_metadata(edge, port, extra)
                outcomes.append(await edge.outcome(sid))
            for event in outcomes:
                assert isinstance(event, StreamReset), event
                assert event.code in (ResetCode.CONNECT_REFUSED, ResetCode.CONNECT_FAILED)
            assert agent.connected  # the session is fine: only the streams were refused
    finally:
        server.close()
        await server.wait_closed()
    assert accepted == 0, "the agent dialled a host the edge chose"


async def test_refused_and_failed_streams_leave_nothing_in_the_agent() -> None:
    """A burst of streams the agent must refuse (ports out of range, port 3000, preview to an
    unexposed port) or cannot connect (a closed port): each is reset with its code, and once
    they are answered the agent holds no stream and no dial task for any of them."""
    closed = _closed_port()
    async with hostile_edge(exposures=[]) as (edge, agent):
        session = agent.session
        assert session is not None
        expected: dict[int, set[ResetCode]] = {}
        refused = {ResetCode.PORT_NOT_ALLOWED}
        failed = {ResetCode.CONNECT_REFUSED, ResetCode.CONNECT_FAILED}
        for i in range(50):
            expected[edge.open(80 + i, "direct", REQUEST, flush=False)] = refused
            expected[edge.open(3000, "direct", REQUEST, flush=False)] = refused
            expected[edge.open(closed, "preview", REQUEST, flush=False)] = refused
            expected[edge.open(closed, "direct", REQUEST, flush=False)] = failed
        edge.flush()
        seen: dict[int, object] = {}
        async with asyncio.timeout(20):
            while len(seen) < len(expected):
                event = await edge.events.get()
                sid = getattr(event, "stream_id", None)
                if sid in expected and isinstance(event, (StreamReset, StreamAccepted)):
                    seen[sid] = event
        for sid, event in seen.items():
            assert isinstance(event, StreamReset), event
            assert event.code in expected[sid], (sid, event)
        assert not session.streams, f"{len(session.streams)} streams left in the agent"
        assert not session._dialing, f"{len(session._dialing)} dial tasks left in the agent"
        assert agent.connected
