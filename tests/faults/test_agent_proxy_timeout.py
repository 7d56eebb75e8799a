"""Bound: a proxy that never finishes its CONNECT answer costs the agent one connect timeout.

docs/agent.md, Behind an HTTP proxy: the agent "reads the answer head (at most 16 KiB, within the
10 s connect timeout, never a byte past it)", and a failure "count[s] as a failed attempt of that
address: the failover to the next ``--server`` entry and the backoff are unchanged". The 16 KiB
cap is tested in tests/agent/test_proxy_config.py; here the time bound, for a proxy that says
nothing and for one that drips a head that never ends (so the bound is on the whole answer, not
on each read): the attempt fails as "timed out", the agent closes its socket to the proxy, and
the next edge of the list gets the session.

Real sockets on 127.0.0.1: scripted proxies, a scripted edge (the sans-IO session).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from agent.core import Agent, AgentConfig, EdgeAddress, _Failure
from agent.proxy import parse_proxy_url
from tests.e2e.conftest import wait_until

from .hostile_edge import HostileEdge

pytestmark = pytest.mark.anyio

TIMEOUT = 1.0  # the agent's connect timeout in these tests (10 s by default)


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")  # the CONNECT request, never answered


async def _dripping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 Connection established\r\nX-Pad: ")
    for _ in range(400):  # at most 20 s: one byte of a header line that never ends
        if writer.is_closing() or reader.at_eof():
            return
        writer.write(b"a")
        await asyncio.sleep(0.05)  # the proxy's pace, not synchronisation


@pytest.mark.parametrize("proxy", [_silent, _dripping], ids=["silent", "dripping"])
async def test_an_unfinished_connect_answer_is_one_timed_out_attempt_then_the_next_edge(
    proxy: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> None:
    closed: list[bool] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await proxy(reader, writer)
            await reader.read()  # until the agent closes its socket to the proxy
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            closed.append(True)
            writer.close()

    loop = asyncio.get_running_loop()
    proxy_server = await asyncio.start_server(serve, "127.0.0.1", 0)
    edge_server = await loop.create_server(HostileEdge, "127.0.0.1", 0)
    proxy_port = proxy_server.sockets[0].getsockname()[1]
    edge_port = edge_server.sockets[0].getsockname()[1]
    proxied = EdgeAddress(
        "127.0.0.1", edge_port, proxy=parse_proxy_url(f"http://127.0.0.1:{proxy_port}")
    )
    agent = Agent(
        AgentConfig(
            "127.0.0.1",
            edge_port,
            "sb1",
            "t",
            servers=(proxied, EdgeAddress("127.0.0.1", edge_port)),
            connect_timeout=TIMEOUT,
        )
    )
    try:
        failures: list[_Failure] = []
        async with asyncio.timeout(20):
            session = await agent.connect_round(failures)
        assert session is not None, failures
        assert [(f.label, f.what) for f in failures] == [
            (
                f"edge 127.0.0.1:{edge_port} (1 of 2) via proxy 127.0.0.1:{proxy_port}",
                f"timed out after {TIMEOUT:g} s",
            )
        ]
        assert session.edge == agent.config.servers[1]  # the next edge got the session
        await wait_until(lambda: closed, 10, "the agent to close its socket to the proxy")
    finally:
        await agent.stop()
        proxy_server.close()
        edge_server.close()
        await proxy_server.wait_closed()
        await edge_server.wait_closed()
