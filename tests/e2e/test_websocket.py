"""WebSockets through the preview URL (raw relay after the Upgrade) and via the admin wsConnect."""

from __future__ import annotations

import asyncio

import pytest
import websockets
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from tunneld.client import TunnelClient

from .conftest import Stack, wait_until

pytestmark = pytest.mark.anyio

MIB = 1 << 20


class EchoServer:
    """A real WebSocket server (the ``websockets`` library) inside the sandbox."""

    def __init__(self) -> None:
        self.close_codes: list[int | None] = []
        self.paths: list[str] = []
        self.hosts: list[str | None] = []

    async def handler(self, ws) -> None:
        self.paths.append(ws.request.path)
        self.hosts.append(ws.request.headers.get("Host"))
        try:
            async for message in ws:
                if message == "close-me":
                    await ws.close(4002, "server says bye")
                    break
                await ws.send(message)
        except websockets.ConnectionClosed:
            pass
        self.close_codes.append(ws.close_code)

    async def start(self):
        self.server = await serve(self.handler, "127.0.0.1", 0, max_size=4 * MIB)
        self.port = (
            self.server.sockets[0].getsockname()[1] if hasattr(self.server, "sockets") else None
        )
        if self.port is None:  # pragma: no cover - older websockets
            self.port = next(iter(self.server.sockets)).getsockname()[1]
        return self

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def echo():
    server = await EchoServer().start()
    try:
        yield server
    finally:
        await server.close()


def _preview_ws(stack: Stack, url: str, path: str = "/"):
    host = stack.host_of(url)
    return connect(
        f"ws://{host}{path}",
        host="127.0.0.1",
        port=stack.edge.public_port,
        max_size=4 * MIB,
        open_timeout=10,
        close_timeout=5,
    )


async def test_websocket_echo_through_preview_url(
    any_parser_stack: Stack, echo: EchoServer
) -> None:
    stack = any_parser_stack
    await stack.agent("sb1")
    exposed = await stack.expose("sb1", echo.port)
    async with _preview_ws(stack, exposed["exposedAt"], "/chat?room=1") as ws:
        await ws.send("hello")
        assert await asyncio.wait_for(ws.recv(), 5) == "hello"
        await ws.send(b"\x00\x01binary\xff")
        assert await asyncio.wait_for(ws.recv(), 5) == b"\x00\x01binary\xff"
        big = bytes(range(256)) * (MIB // 256)
        await ws.send(big)
        assert await asyncio.wait_for(ws.recv(), 10) == big
        pong = await ws.ping(b"are you there")
        await asyncio.wait_for(pong, 5)
        await ws.close(4001, "client says bye")
    assert ws.close_code == 4001
    await wait_until(lambda: echo.close_codes, 5, "the echo server to see the close")
    assert echo.close_codes == [4001]
    assert echo.paths == ["/chat?room=1"]
    assert echo.hosts == [f"localhost:{echo.port}"]


async def test_server_close_code_reaches_client(stack: Stack, echo: EchoServer) -> None:
    await stack.agent("sb1")
    exposed = await stack.expose("sb1", echo.port)
    async with _preview_ws(stack, exposed["exposedAt"]) as ws:
        await ws.send("close-me")
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 4002
    assert ws.close_reason == "server says bye"


async def test_websocket_needs_exposure_and_token(stack: Stack, echo: EchoServer) -> None:
    await stack.agent("sb1")
    exposed = await stack.expose("sb1", echo.port)
    url = exposed["exposedAt"]
    other = 65000 if echo.port != 65000 else 65001  # a port that was never exposed
    wrong_token = url.replace("-sb1-", "-sb1-x")
    unexposed = url.replace(f"//{echo.port}-", f"//{other}-")
    assert unexposed != url
    for bad in (wrong_token, unexposed):
        with pytest.raises(websockets.InvalidStatus) as info:
            async with _preview_ws(stack, bad):
                pass
        assert info.value.response.status_code == 404, bad
        assert b'"INVALID_TOKEN"' in info.value.response.body, bad
    # the echo server never saw an upgrade; the right URL still works
    assert echo.paths == []
    async with _preview_ws(stack, url) as ws:
        await ws.send("ok")
        assert await ws.recv() == "ok"


async def test_sdk_ws_connect_on_unexposed_port(stack: Stack, echo: EchoServer) -> None:
    await stack.agent("sb1")
    async with TunnelClient(
        f"http://127.0.0.1:{stack.edge.admin_port}", stack.admin_token
    ) as client:
        sandbox = client.sandbox("sb1")
        assert await sandbox.get_exposed_ports() == []
        ws = await sandbox.ws_connect(echo.port, path="/direct?x=1")
        async with ws:
            await ws.send("via admin")
            assert await ws.receive() == "via admin"
            await ws.send(b"\x01" * MIB)
            assert await ws.receive() == b"\x01" * MIB
            await ws.ping(b"p")
            await ws.close(4003, "done")
    await wait_until(lambda: echo.close_codes, 5, "the echo server to see the close")
    assert echo.close_codes == [4003]
    assert echo.paths == ["/direct?x=1"]


async def test_sdk_ws_connect_needs_admin_token(stack: Stack, echo: EchoServer) -> None:
    from tunneld.client import AuthenticationError

    await stack.agent("sb1")
    async with TunnelClient(f"http://127.0.0.1:{stack.edge.admin_port}", "wrong") as client:
        with pytest.raises(AuthenticationError):
            await client.sandbox("sb1").ws_connect(echo.port)


async def test_sdk_ws_connect_offline_sandbox(stack: Stack) -> None:
    from tunneld.client import NotFoundError, SandboxNotConnectedError

    async with TunnelClient(
        f"http://127.0.0.1:{stack.edge.admin_port}", stack.admin_token
    ) as client:
        with pytest.raises(NotFoundError):
            await client.sandbox("nobody").ws_connect(8000)
        await client.sandbox("later").expose_port(8000)  # known, but no agent
        with pytest.raises(SandboxNotConnectedError):
            await client.sandbox("later").ws_connect(8000)
