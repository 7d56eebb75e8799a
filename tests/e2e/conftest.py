"""In-process end-to-end stack: a real EdgeServer, real agents and a real origin on 127.0.0.1.

Everything listens on port 0 and talks over real sockets; only the process is shared. Tests about
processes themselves (signals, restarts, the CLI) live in test_processes.py.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from agent.core import Agent, AgentConfig
from tunneld.auth import agent_token
from tunneld.config import Config
from tunneld.edge import EdgeServer
from tunneld.store import Store

from .origin import Origin

# A WebSocket handshake as any client sends it (the key is RFC 6455's example): the headers of an
# admin API ws connect (GET /v1/sandboxes/{id}/ports/{port}/ws).
WS_HANDSHAKE = {
    "upgrade": "websocket",
    "connection": "Upgrade",
    "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
    "sec-websocket-version": "13",
}


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"use_uvloop": False}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request):
    return request.param


class Stack:
    def __init__(self, parser: str = "auto", **config: object) -> None:
        self.admin_token = secrets.token_urlsafe(16)
        self.secret = secrets.token_urlsafe(16)
        self.config = Config(
            public_port=0,
            agent_port=0,
            admin_port=0,
            admin_token=self.admin_token,
            secret=self.secret,
            parser=parser,
            grace_period=1.0,
            **config,  # type: ignore[arg-type]
        )
        self.edge: EdgeServer | None = None
        self.store: Store | None = None  # set before start(): exposures in it (else memory)
        self.agents: list[tuple[Agent, asyncio.Task[None]]] = []
        self.origins: list[Origin] = []
        self.admin: httpx.AsyncClient | None = None

    async def start(self) -> Stack:
        self.edge = EdgeServer(self.config, asyncio.get_running_loop(), self.store)
        await self.edge.start()
        self.admin = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.edge.admin_port}",
            headers={"authorization": f"Bearer {self.admin_token}"},
            timeout=30,
        )
        return self

    async def close(self) -> None:
        for agent, task in self.agents:
            await agent.stop()
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self.admin is not None:
            await self.admin.aclose()
        if self.edge is not None:
            await self.edge.stop(grace=0.2)
        for origin in self.origins:
            await origin.close()

    async def origin(self) -> Origin:
        origin = await Origin().start()
        self.origins.append(origin)
        return origin

    async def agent(self, sandbox_id: str = "sb1", *, wait: bool = True, **options: Any) -> Agent:
        """A running agent for ``sandbox_id``; ``options`` go to AgentConfig (tls, websocket...)."""
        assert self.edge is not None
        token = agent_token(self.secret, sandbox_id)
        agent = Agent(AgentConfig("127.0.0.1", self.edge.agent_port, sandbox_id, token, **options))
        task = asyncio.get_running_loop().create_task(agent.run())
        self.agents.append((agent, task))
        if wait:
            await asyncio.wait_for(agent.connected_event.wait(), 10)
        return agent

    async def expose(self, sandbox_id: str, port: int, **body: object) -> dict:
        assert self.admin is not None
        response = await self.admin.post(
            f"/v1/sandboxes/{sandbox_id}/ports", json={"port": port, **body}
        )
        assert response.status_code == 200, response.text
        return response.json()

    def host_of(self, url: str) -> str:
        return url.split("//", 1)[1].split("/", 1)[0]

    async def preview_host(self, port: int, sandbox_id: str = "sb1", **body: object) -> bytes:
        """An agent for ``sandbox_id`` connected and ``port`` exposed (``body``: the expose's
        options): its preview URL's Host, as bytes for raw requests."""
        await self.agent(sandbox_id)
        return self.host_of((await self.expose(sandbox_id, port, **body))["exposedAt"]).encode()

    def client(self, url: str, **kwargs: object) -> httpx.AsyncClient:
        """An httpx client for a preview URL: connects to 127.0.0.1, sends the preview Host."""
        assert self.edge is not None
        return httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.edge.public_port}",
            headers={"host": self.host_of(url)},
            timeout=kwargs.pop("timeout", 30),  # type: ignore[arg-type]
            **kwargs,  # type: ignore[arg-type]
        )


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    s = await Stack().start()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def holding_service() -> AsyncIterator[int]:
    """The port of a service in the 'sandbox' that accepts every connection and holds it open
    (a stream that stays), closed at the end."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.fixture(params=["httptools", "h11"])
async def any_parser_stack(request) -> AsyncIterator[Stack]:
    s = await Stack(parser=request.param).start()
    try:
        yield s
    finally:
        await s.close()


async def wait_until(
    predicate: Callable[[], object], timeout: float = 5, what: str = "condition"
) -> None:
    """Poll ``predicate`` until it is true; fail after ``timeout`` seconds naming ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


async def raw_request(
    port: int, data: bytes, *, read_until_close: bool = True, timeout: float = 10
) -> bytes:
    """Send raw bytes to 127.0.0.1:port and read the answer (until close, bounded by timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if read_until_close:
            return await asyncio.wait_for(reader.read(), timeout)
        return await asyncio.wait_for(reader.read(65536), timeout)
    finally:
        writer.close()


async def read_to_end(reader: asyncio.StreamReader, timeout: float = 10) -> bytes:
    """What the edge sends on a connection until it closes it (EOF or reset), at most
    ``timeout`` seconds (TimeoutError past them: the connection stayed open)."""
    out = b""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                out += chunk
    except ConnectionResetError:
        pass
    return out


def _crashes(records: list[logging.LogRecord]) -> list[str]:
    return [
        f"{r.name}: {r.getMessage()}"
        for r in records
        if r.levelno >= logging.ERROR and r.exc_info is not None
    ]


@pytest.fixture(autouse=True)
def no_unhandled_errors(caplog):
    """Fail a test in which any callback raised: asyncio only logs those, it does not fail.

    Autouse fixtures are set up first and torn down last, so this runs after the other fixtures'
    teardown (``Stack.close``, ``edge.stop``): a traceback logged there fails the test as well as
    one logged while the fixtures were set up or while the test ran.
    """
    caplog.set_level(logging.WARNING)
    yield
    crashes = [
        f"[{when}] {line}"
        for when in ("setup", "call", "teardown")
        for line in _crashes(caplog.get_records(when))
    ]
    assert not crashes, "\n".join(crashes)
