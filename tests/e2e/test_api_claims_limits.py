"""docs/admin-api.md, the admin server's limits: "at most 256 connections being served,
admin_max_connections_per_ip (64) of them from one client IP (503 TOO_MANY_CONNECTIONS; a
WebSocket connect stops counting once handed to the sandbox)", and so does a raw TCP connect:
an orchestrator holding many WebSockets or port-forwards to its sandboxes is not locked out of
its own control plane. (The cap itself: tests/faults/test_attack_surface_2.py.)
"""

from __future__ import annotations

import asyncio

import pytest

from .conftest import WS_HANDSHAKE, Stack, wait_until

pytestmark = pytest.mark.anyio

IO_TIMEOUT = 10
PER_IP = 2


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def upgrade(stack: Stack, port: int, kind: str) -> asyncio.StreamWriter:
    """An admin connection upgraded to a stream to ``port`` (``ws`` or ``tcp``)."""
    assert stack.edge is not None
    headers = dict(WS_HANDSHAKE) if kind == "ws" else {"connection": "Upgrade", "upgrade": "tcp"}
    head = f"GET /v1/sandboxes/sb1/ports/{port}/{kind} HTTP/1.1\r\nHost: admin\r\n"
    head += f"Authorization: Bearer {stack.admin_token}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.admin_port)
    writer.write(head.encode())
    if kind == "tcp":  # the edge's own 101, once the agent connected
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
        assert answer.startswith(b"HTTP/1.1 101 "), answer
    return writer


async def test_handed_over_connections_leave_the_per_ip_cap(holding_service: int) -> None:
    stack = await Stack(admin_max_connections_per_ip=PER_IP).start()
    held: list[asyncio.StreamWriter] = []
    try:
        assert stack.edge is not None and stack.edge.admin is not None and stack.admin
        await stack.agent("sb1")
        http = stack.edge.admin.http
        for kind in ("ws", "tcp") * (PER_IP + 1):  # three of each, more than the cap
            held.append(await upgrade(stack, holding_service, kind))
            await wait_until(lambda: http.connections == 0, IO_TIMEOUT, "the hand-over")
        await wait_until(
            lambda: (
                stack.edge is not None
                and len(stack.edge.registry.get("sb1").session.streams) == len(held)
            ),
            IO_TIMEOUT,
            "every stream open",
        )
        # the cap's connections are all free for requests
        answers = await asyncio.gather(
            *(stack.admin.get("/v1/sandboxes/sb1") for _ in range(PER_IP))
        )
        assert [r.status_code for r in answers] == [200] * PER_IP
        assert answers[0].json()["streams"] == len(held)
    finally:
        for writer in held:
            writer.close()
        await stack.close()
