"""Python SDK of tunneld: preview URLs for sandbox ports, mirroring Cloudflare Sandbox SDK's Ports.

Runs on asyncio, uvloop and trio (anyio); depends only on h11, wsproto, orjson and anyio.

Example::

    from tunneld.client import TunnelClient

    async with TunnelClient("http://127.0.0.1:7070", token="admin-secret") as client:
        sb = client.sandbox("abc123")
        p = await sb.expose_port(8000, name="api")      # sb.exposePort(...) also works
        print(p.url)                                    # http://8000-abc123-<token>.localhost:8080/
        await sb.wait_for_port(8000, path="/health", timeout=30)  # or waitForPort
        print(await sb.get_exposed_ports())
        async with await sb.ws_connect(8000, path="/ws") as ws:
            await ws.send("hi")
            print(await ws.receive())
        async with await sb.open_tcp(6379) as tcp:     # raw TCP: an anyio byte stream
            await tcp.send(b"PING\\r\\n")
        await sb.unexpose_port(8000)
"""

from __future__ import annotations

from ._api import ExposedPort, RequestList, Sandbox, SandboxInfo, TunnelClient
from ._errors import (
    AuthenticationError,
    ConflictError,
    ConnectionClosed,
    InvalidPortError,
    InvalidSandboxIdError,
    InvalidTokenError,
    NotFoundError,
    PortNotReadyError,
    SandboxNotConnectedError,
    TunnelConnectionError,
    TunnelError,
    TunnelTimeoutError,
    ValidationError,
)
from ._tcp import TcpStream, WebSocketTcpStream
from ._websocket import WebSocket

__all__ = [
    "AuthenticationError",
    "ConflictError",
    "ConnectionClosed",
    "ExposedPort",
    "InvalidPortError",
    "InvalidSandboxIdError",
    "InvalidTokenError",
    "NotFoundError",
    "PortNotReadyError",
    "RequestList",
    "Sandbox",
    "SandboxInfo",
    "SandboxNotConnectedError",
    "TcpStream",
    "TunnelClient",
    "TunnelConnectionError",
    "TunnelError",
    "TunnelTimeoutError",
    "ValidationError",
    "WebSocket",
    "WebSocketTcpStream",
]
