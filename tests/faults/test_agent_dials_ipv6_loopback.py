"""A service listening on ``[::1]`` only is reached, by preview streams and by port watches.

docs/agent.md: the agent connects a stream "to ``127.0.0.1:PORT`` (then ``[::1]:PORT``)", and
each port-watch probe "dials ``127.0.0.1:PORT``, then ``[::1]:PORT`` if that fails". Dev servers
that bind ``localhost`` often get ``::1`` alone; tests/faults/test_hostile_edge_2.py checks that
nothing beyond the two loopback hosts is dialled, this that the second one is.

Real sockets: a service on ``[::1]:P`` while ``127.0.0.1:P`` is held bound and not listening
(so it refuses, and no other test's listener can answer there); a scripted edge.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from agent.portwatch import WatchSpec, watch_port
from protocol.events import StreamAccepted

from .hostile_edge import hostile_edge

ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nfrom 6"


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here"),
]


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(ANSWER)
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass  # a tcp-mode probe connects and hangs up
    finally:
        writer.close()


@pytest.fixture
async def v6_only() -> AsyncIterator[int]:
    """A port with an HTTP service on [::1] and a refusing 127.0.0.1."""
    for _ in range(20):  # a port free on both families
        v6 = socket.socket(socket.AF_INET6)
        v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        v6.bind(("::1", 0))
        port = v6.getsockname()[1]
        v4 = socket.socket()
        try:
            v4.bind(("127.0.0.1", port))
        except OSError:
            v4.close()
            v6.close()
            continue
        break
    else:
        pytest.fail("no port free on both 127.0.0.1 and ::1")
    v6.listen()
    server = await asyncio.start_server(_serve, sock=v6)
    try:
        yield port
    finally:
        server.close()
        await server.wait_closed()
        v4.close()


async def test_a_preview_stream_reaches_a_service_on_ipv6_loopback_only(v6_only: int) -> None:
    async with hostile_edge([v6_only]) as (edge, _agent):
        sid = edge.open(v6_only, data=b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        assert isinstance(await edge.outcome(sid), StreamAccepted)
        assert await edge.read_stream(sid) == ANSWER


@pytest.mark.parametrize("mode", ["tcp", "http"])
async def test_a_port_watch_finds_a_service_on_ipv6_loopback_only(v6_only: int, mode: str) -> None:
    spec = WatchSpec(v6_only, mode, "/", interval=0.1, timeout=10.0)
    async with asyncio.timeout(20):
        result = await watch_port(spec)  # the agent's hosts: 127.0.0.1, then ::1
    assert result.ready, result
    if mode == "http":
        assert result.last is not None and result.last.status == 200
