"""docs/sdk.md's Errors table and ws_connect path rule, against a real in-process edge
(tests/e2e/conftest.py's Stack) rather than the fake admin API:

- "TunnelTimeoutError (also a TimeoutError): ... or 504 / AGENT_TIMEOUT", and the exposure is
  recorded anyway (docs/admin-api.md: "retrying is safe": the same URL).
- "SandboxNotConnectedError: SANDBOX_NOT_CONNECTED (503), also when the agent leaves during
  wait_for_port".
- "Any other error response becomes the base class": 503 SANDBOX_BUSY is a TunnelError, not a
  SandboxNotConnectedError a caller would treat as "the agent is away".
- ws_connect: a path that is not printable ASCII is ValidationError INVALID_PATH; percent-encoded
  by the caller it reaches the service as written.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator, Sequence

import anyio
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed

from tests.e2e.conftest import Stack
from tests.e2e.conftest import no_unhandled_errors as no_unhandled_errors  # autouse there
from tests.e2e.conftest import stack as stack  # a started Stack, closed after
from tests.sdk.test_doc_claims_sdk import anyio_backend as anyio_backend  # the edge's: asyncio
from tests.sdk.test_doc_claims_sdk import sdk
from tunneld.client import (
    SandboxNotConnectedError,
    TunnelError,
    TunnelTimeoutError,
    ValidationError,
)

pytestmark = pytest.mark.anyio

BOUND = 20
HEADERS: list[Headers] = []


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound but not listening for the whole test: a connect there is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
async def ws_paths() -> AsyncIterator[tuple[int, list[str]]]:
    """A WebSocket server in the 'sandbox' that records the path of each handshake (and its
    headers, in ``HEADERS``); it selects the subprotocol "chat" when offered."""
    paths: list[str] = []
    HEADERS.clear()

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        paths.append(ws.request.path)
        HEADERS.append(ws.request.headers)
        try:
            async for message in ws:
                await ws.send(message)
        except ConnectionClosed:
            pass

    def choose(ws: ServerConnection, offered: Sequence[str]) -> str | None:
        return "chat" if "chat" in offered else None

    async with serve(
        handler, "127.0.0.1", 0, compression=None, select_subprotocol=choose
    ) as server:
        yield server.sockets[0].getsockname()[1], paths


async def test_agent_timeout_is_a_timeout_and_the_exposure_is_kept() -> None:
    stack = await Stack(control_timeout=1.0).start()  # the retry's ack: 1 s of margin
    try:
        agent = await stack.agent("sb1")
        assert agent.session is not None
        transport = agent.session.transport
        transport.pause_reading()  # a frozen agent: it never acknowledges
        async with sdk(stack) as client:
            sb = client.sandbox("sb1")
            with anyio.fail_after(BOUND), pytest.raises(TunnelTimeoutError) as info:
                await sb.expose_port(8003, name="api")
            assert (info.value.status, info.value.code) == (504, "AGENT_TIMEOUT")
            assert isinstance(info.value, TimeoutError)
            [kept] = await sb.get_exposed_ports()
            assert (kept.port, kept.name) == (8003, "api")
            transport.resume_reading()
            assert await sb.expose_port(8003, name="api") == kept  # the retry: same URL
    finally:
        await stack.close()


async def test_the_agent_leaving_mid_wait_is_sandbox_not_connected(
    stack: Stack, closed_port: int
) -> None:
    agent = await stack.agent("sb1")
    async with sdk(stack) as client:

        async def leave() -> None:
            for _ in range(BOUND * 100):  # until the agent runs the watch
                if agent.port_watches.active == 1:
                    break
                await asyncio.sleep(0.01)
            await agent.stop()

        with anyio.fail_after(BOUND):
            async with anyio.create_task_group() as tg:
                tg.start_soon(leave)
                with pytest.raises(SandboxNotConnectedError) as info:
                    await client.sandbox("sb1").wait_for_port(closed_port, mode="tcp", timeout=60)
        assert (info.value.status, info.value.code) == (503, "SANDBOX_NOT_CONNECTED")


async def test_sandbox_busy_is_the_base_class(closed_port: int) -> None:
    writers: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    held = await asyncio.start_server(hold, "127.0.0.1", 0)
    stack = await Stack(max_streams=1).start()
    try:
        await stack.agent("sb1")
        async with sdk(stack) as client:
            sb = client.sandbox("sb1")
            async with await sb.open_tcp(held.sockets[0].getsockname()[1]):  # the one stream
                with pytest.raises(TunnelError) as info:
                    await sb.ws_connect(closed_port)
            assert type(info.value) is TunnelError
            assert (info.value.status, info.value.code) == (503, "SANDBOX_BUSY")
    finally:
        await stack.close()
        for writer in writers:
            writer.close()
        held.close()
        await held.wait_closed()


async def test_ws_connect_paths(stack: Stack, ws_paths: tuple[int, list[str]]) -> None:
    port, paths = ws_paths
    await stack.agent("sb1")
    async with sdk(stack) as client:
        sb = client.sandbox("sb1")
        for path in ("/caf\u00e9", "/a\tb"):
            with pytest.raises(ValidationError) as info:
                await sb.ws_connect(port, path=path)
            assert (info.value.status, info.value.code) == (400, "INVALID_PATH"), path
        async with await sb.ws_connect(port, path="/caf%C3%A9?room=1&x=a%20b") as ws:
            await ws.send("hi")
            assert await ws.receive() == "hi"
    assert paths == ["/caf%C3%A9?room=1&x=a%20b"]


async def test_ws_connect_headers_and_subprotocols_reach_the_service(
    stack: Stack, ws_paths: tuple[int, list[str]]
) -> None:
    """docs/sdk.md, WebSocket: "The handshake goes end to end to the sandbox's server, so
    headers and subprotocols reach it. The selected subprotocol is in ws.subprotocol." The
    admin token does not reach it."""
    port, _ = ws_paths
    await stack.agent("sb1")
    async with sdk(stack) as client:
        sb = client.sandbox("sb1")
        async with await sb.ws_connect(
            port,
            headers={"X-Trace": "t1", "Origin": "https://app.example"},
            subprotocols=["v2", "chat"],
        ) as ws:
            assert ws.subprotocol == "chat"
            await ws.send(b"bytes")
            assert await ws.receive() == b"bytes"
    [headers] = HEADERS
    assert headers.get_all("X-Trace") == ["t1"]
    assert headers.get_all("Origin") == ["https://app.example"]
    assert headers.get_all("Sec-WebSocket-Protocol") == ["v2, chat"]
    assert "Authorization" not in headers
    assert stack.admin_token not in str(headers)
