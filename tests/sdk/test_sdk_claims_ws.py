"""docs/sdk.md, WebSocket: "async for message in ws stops quietly on a normal close (1000,
1001, 1005) and raises ConnectionClosed on any other code" (1000 and 4002:
test_client.py::test_ws_async_iteration); "ws.close_code and ws.close_reason hold the peer's
close frame". Against the fake admin API's echo server (conftest.py), which closes with the
code it is told, and a raw server for 1005 (a close frame without a code, which wsproto's
server side cannot send)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re

import anyio
import anyio.abc
import pytest

from tunneld.client import ConnectionClosed, TunnelClient

from .conftest import ADMIN_TOKEN, FakeAdmin, wait_until

pytestmark = pytest.mark.anyio

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


async def test_iteration_stops_quietly_on_1001(fake_admin: FakeAdmin) -> None:
    async with TunnelClient(fake_admin.url, ADMIN_TOKEN, timeout=10) as client:
        async with await client.sandbox("abc123").ws_connect(8000) as ws:
            for message in ("a", b"b", "close:1001:going away"):
                await ws.send(message)
            assert [m async for m in ws] == ["a", b"b"]
            assert (ws.close_code, ws.close_reason) == (1001, "going away")


async def test_iteration_stops_quietly_on_a_close_without_a_code() -> None:
    """The peer's close frame has no payload: 1005, a normal close."""
    client_frames = bytearray()

    async def serve(stream: anyio.abc.ByteStream) -> None:
        async with stream:
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.receive()
            key = re.search(rb"(?i)sec-websocket-key: *(\S+)", head)
            assert key is not None
            accept = base64.b64encode(hashlib.sha1(key.group(1) + GUID).digest())
            await stream.send(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
                b"\x81\x01a\x88\x00"  # a text message "a", then a close frame without a code
            )
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                while True:
                    client_frames.extend(await stream.receive())

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    with anyio.fail_after(20):
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, serve)
            client = TunnelClient(f"http://127.0.0.1:{port}", ADMIN_TOKEN, timeout=10)
            async with await client.sandbox("abc123").ws_connect(8000) as ws:
                assert [m async for m in ws] == ["a"]
                assert (ws.close_code, ws.close_reason) == (1005, "")
            await wait_until(lambda: client_frames, 10, "the client's close frame")
            tg.cancel_scope.cancel()
    assert client_frames[0] == 0x88  # the closing handshake was answered


@pytest.mark.parametrize("code", [1002, 1008, 1011, 3000])
async def test_iteration_raises_on_any_other_code(fake_admin: FakeAdmin, code: int) -> None:
    async with TunnelClient(fake_admin.url, ADMIN_TOKEN, timeout=10) as client:
        async with await client.sandbox("abc123").ws_connect(8000) as ws:
            await ws.send(f"close:{code}:bad")
            with pytest.raises(ConnectionClosed) as info:
                async for _ in ws:
                    pass
            assert (info.value.code, info.value.reason) == (code, "bad")
