"""Fixtures for the fault and abuse suite: the e2e ``Stack`` plus a fault proxy on its agent link.

``faulty_stack`` is a ``Stack`` whose agents connect through a ``FaultProxy`` (``stack.proxy``)
instead of straight to the edge's agent port, so a test can stall, drop, refuse, slow or corrupt
the agent link while real clients use real preview URLs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from agent.core import Agent, AgentConfig
from tests.cluster.nodes import Cluster
from tests.e2e.conftest import (  # re-exported: the same fixtures as the e2e suite
    Stack,
    anyio_backend,
    no_unhandled_errors,
    raw_request,
    stack,
)
from tests.redis_server import RedisServer
from tunneld.auth import agent_token

from .faultproxy import FaultProxy

__all__ = [
    "FaultProxy",
    "FaultStack",
    "Stack",
    "anyio_backend",
    "closed_within",
    "fault_proxy_to",
    "faulty_stack",
    "log_messages",
    "logged_stack",
    "no_unhandled_errors",
    "raw_request",
    "stack",
    "tls_files",
]


class FaultStack(Stack):
    """A ``Stack`` whose agents reach the edge through ``self.proxy``."""

    proxy: FaultProxy

    async def start(self) -> FaultStack:
        await super().start()
        assert self.edge is not None
        self.proxy = await FaultProxy("127.0.0.1", self.edge.agent_port).start()
        return self

    async def close(self) -> None:
        # The proxy first: agents then see their link fail and stop promptly.
        await self.proxy.close()
        await super().close()

    async def agent(self, sandbox_id: str = "sb1", *, wait: bool = True, **options: Any) -> Agent:
        token = agent_token(self.secret, sandbox_id)
        agent = Agent(AgentConfig("127.0.0.1", self.proxy.port, sandbox_id, token, **options))
        task = asyncio.get_running_loop().create_task(agent.run())
        self.agents.append((agent, task))
        if wait:
            await asyncio.wait_for(agent.connected_event.wait(), 10)
        return agent


@pytest.fixture
async def faulty_stack() -> AsyncIterator[FaultStack]:
    s = await FaultStack().start()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def logged_stack() -> AsyncIterator[Stack]:
    """A ``Stack`` with the access log on."""
    s = await Stack(access_log=True).start()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def fault_proxy_to() -> AsyncIterator[Any]:
    """``await fault_proxy_to(port, seed=...)``: a started proxy to 127.0.0.1:port, closed after."""
    proxies: list[FaultProxy] = []

    async def make(port: int, **options: Any) -> FaultProxy:
        proxy = await FaultProxy("127.0.0.1", port, **options).start()
        proxies.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in proxies:
            await proxy.close()


async def closed_within(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes (EOF or reset), within ``timeout``."""
    out = bytearray()
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionError:
                return bytes(out)
            if not chunk:
                return bytes(out)
            out += chunk


async def get_and_close(port: int, host: bytes) -> bytes:
    """A ``GET /`` with ``Connection: close`` to a preview host: everything until the end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def log_messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    """The captured log messages that contain ``text``."""
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def tls_files(
    directory: Path, *names: str, ca: trustme.CA | None = None
) -> tuple[trustme.CA, str, str]:
    """A certificate for ``names`` (host names or IP addresses) issued by ``ca`` (a new trustme CA
    by default), written for the edge: ``(ca, cert.pem with the chain, key.pem)``."""
    ca = trustme.CA() if ca is None else ca
    cert = ca.issue_cert(*names)
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_file), append=True)
    cert.private_key_pem.write_to_path(str(key_file))
    return ca, str(cert_file), str(key_file)


@pytest.fixture
async def nodes(redis_server: RedisServer) -> AsyncIterator[Cluster]:
    """In-process cluster nodes on a real redis-server (tests/cluster/nodes.py), closed after."""
    c = Cluster(redis_server)
    try:
        yield c
    finally:
        await c.close()
