"""docs/admin-api.md, "WebSocket connect (wsConnect)": how the edge rebuilds the client's
handshake for the sandbox's server, checked with a real ``websockets`` server in the sandbox
and a raw handshake from a socket (so every header the client sends is the test's choice).

"request target = path, default /; Host: localhost:{port}; the Authorization header removed;
X-Forwarded-For and X-Sandbox-Name added; the client's own forwarding headers (Forwarded,
X-Real-IP, X-Forwarded-*, X-Sandbox-*, X-Tunnel-*) and any header name with _ dropped, as on
preview URLs; every other header, including Sec-WebSocket-* and Origin, kept". The admin token
reaching the sandbox, or a client choosing the X-Sandbox-Name a service sees, would be a hole.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator
from urllib.parse import quote

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed

from tunneld.tcpws import BEARER_PREFIX

from .conftest import WS_HANDSHAKE, Stack

pytestmark = pytest.mark.anyio

IO_TIMEOUT = 10
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = base64.b64encode(
    hashlib.sha1((KEY + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
).decode()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Recorder:
    """A WebSocket server that records each handshake's path and headers, then echoes."""

    def __init__(self) -> None:
        self.handshakes: list[tuple[str, Headers]] = []
        self.port = 0

    async def handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        self.handshakes.append((ws.request.path, ws.request.headers))
        try:
            async for message in ws:
                await ws.send(message)
        except ConnectionClosed:  # the test's raw client leaves without a close frame
            pass


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    rec = Recorder()

    def choose(ws: ServerConnection, offered: object) -> str | None:
        return "chat"

    async with serve(
        rec.handler, "127.0.0.1", 0, select_subprotocol=choose, compression=None
    ) as server:
        rec.port = server.sockets[0].getsockname()[1]
        yield rec


async def handshake(stack: Stack, port: int, query: str, extra: list[tuple[str, str]]) -> bytes:
    """A raw handshake to the admin API's ws endpoint; returns the answer's head."""
    assert stack.edge is not None
    lines = [
        f"GET /v1/sandboxes/sb1/ports/{port}/ws{query} HTTP/1.1",
        f"Host: 127.0.0.1:{stack.edge.admin_port}",
        f"Authorization: Bearer {stack.admin_token}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {KEY}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in extra),
    ]
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.admin_port)
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
    finally:
        writer.close()


async def test_the_handshake_the_sandbox_gets(stack: Stack, recorder: Recorder) -> None:
    await stack.agent("sb1")
    path = "/chat?room=1&q=a%20b"
    head = await handshake(
        stack,
        recorder.port,
        "?path=" + quote(path, safe="/"),
        [
            ("Origin", "https://app.example"),
            ("Sec-WebSocket-Protocol", "chat, other"),
            ("X-Custom", "kept"),
            ("User-Agent", "claims-test/1"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Forwarded-Host", "evil.example"),
            ("X-Sandbox-Name", "other"),
            ("Forwarded", "for=6.6.6.6"),
            ("X-Real-IP", "6.6.6.6"),
            ("X-Tunnel-Evil", "1"),
            ("X_Forwarded_For", "6.6.6.6"),
        ],
    )
    # the 101 is the sandbox server's, end to end
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert f"\r\nSec-WebSocket-Accept: {ACCEPT}\r\n".encode() in head
    assert b"sec-websocket-protocol: chat" in head.lower()
    assert len(recorder.handshakes) == 1
    seen_path, headers = recorder.handshakes[0]
    assert seen_path == path  # the query survives the path parameter intact
    assert headers.get_all("Host") == [f"localhost:{recorder.port}"]
    assert "Authorization" not in headers  # the admin token never reaches the sandbox
    assert headers.get_all("X-Forwarded-For") == ["127.0.0.1"]
    assert headers.get_all("X-Sandbox-Name") == ["sb1"]
    for dropped in ("X-Forwarded-Host", "Forwarded", "X-Real-IP", "X-Tunnel-Evil"):
        assert dropped not in headers, dropped
    assert not [name for name in headers if "_" in name]
    assert headers.get_all("Origin") == ["https://app.example"]
    assert headers.get_all("Sec-WebSocket-Protocol") == ["chat, other"]
    assert headers.get_all("Sec-WebSocket-Key") == [KEY]
    assert headers.get_all("Sec-WebSocket-Version") == ["13"]
    assert headers.get_all("X-Custom") == ["kept"]
    assert headers.get_all("User-Agent") == ["claims-test/1"]


async def test_without_a_path_the_target_is_the_root(stack: Stack, recorder: Recorder) -> None:
    await stack.agent("sb1")
    head = await handshake(stack, recorder.port, "", [])
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert [path for path, _ in recorder.handshakes] == ["/"]


@pytest.mark.parametrize("path", ["/caf\u00e9", "/a\tb", "/a\x00b", "/a\x7fb", "/a b", "ws"])
async def test_a_path_that_is_no_request_target_is_invalid_path(stack: Stack, path: str) -> None:
    """'400 INVALID_PATH: ws path not an absolute path': a path the edge cannot send as a
    request target (not printable ASCII, a space) is refused as the path, not answered 400
    BAD_REQUEST ('malformed HTTP', which the client's request was not) quoting the rebuilt
    head."""
    assert stack.admin is not None
    await stack.agent("sb1")
    r = await stack.admin.get(
        "/v1/sandboxes/sb1/ports/8000/ws", params={"path": path}, headers=WS_HANDSHAKE
    )
    assert (r.status_code, r.json()) == (
        400,
        {"error": "path must be an absolute path, e.g. /ws.", "code": "INVALID_PATH"},
    )


async def test_a_percent_encoded_path_reaches_the_service_as_sent(
    stack: Stack, recorder: Recorder
) -> None:
    await stack.agent("sb1")
    head = await handshake(stack, recorder.port, "?path=" + quote("/caf%C3%A9?q=%09", safe="/"), [])
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert [path for path, _ in recorder.handshakes] == ["/caf%C3%A9?q=%09"]


async def test_a_bearer_subprotocol_never_reaches_the_sandbox(
    stack: Stack, recorder: Recorder
) -> None:
    """'the Authorization header removed': the admin token offered as a subprotocol as well
    (tunneld.bearer.<base64url>, what a browser sends to the raw TCP endpoint, the only one that
    takes it) is removed too; the other offers are relayed and the server's choice comes back."""
    await stack.agent("sb1")
    bearer = BEARER_PREFIX + base64.urlsafe_b64encode(stack.admin_token.encode()).decode()
    bearer = bearer.rstrip("=")
    for offered, relayed in (
        (f"chat, {bearer}, other", ["chat, other"]),
        (bearer.upper(), []),
        (bearer, []),
    ):
        head = await handshake(stack, recorder.port, "", [("Sec-WebSocket-Protocol", offered)])
        assert head.startswith(b"HTTP/1.1 101 "), head
        headers = recorder.handshakes[-1][1]
        assert headers.get_all("Sec-WebSocket-Protocol") == relayed, offered
        assert stack.admin_token not in str(headers), offered
