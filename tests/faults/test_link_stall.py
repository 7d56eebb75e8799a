"""A stalled agent link (nothing moves either way) ends every stream visibly once the dead-peer
timer fires (issue 7, rows 2 and 9): a response already started is reset, a request still
waiting gets a 503 page, never an empty reply or a clean end."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from protocol.session import SessionConfig

from .conftest import FaultStack
from .test_edge_shutdown_cut import HangingOrigin

pytestmark = pytest.mark.anyio

DEAD = 2.0  # the edge's dead-peer timeout in this test


async def test_stalled_link_resets_started_responses_and_fails_waiting_requests() -> None:
    stack = await FaultStack(dead_timeout=DEAD, heartbeat_interval=0.5).start()
    origin = HangingOrigin()
    loop = asyncio.get_running_loop()
    try:
        await stack.agent("sb1", session=SessionConfig(heartbeat_interval=0.5, dead_timeout=30))
        exposed = await stack.expose("sb1", origin.port)
        host = stack.host_of(exposed["exposedAt"])
        assert stack.edge is not None
        port = stack.edge.public_port

        started = socket.create_connection(("127.0.0.1", port), timeout=DEAD + 10)
        started.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        got = b""
        while len(got) < 1000:
            got += await loop.run_in_executor(None, started.recv, 65536)
        assert got.startswith(b"HTTP/1.1 200 OK")

        stack.proxy.stall()
        stalled_at = time.monotonic()
        waiting = socket.create_connection(("127.0.0.1", port), timeout=DEAD + 10)
        waiting.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())

        def read_all(sock: socket.socket) -> bytes | str:
            out = b""
            try:
                while chunk := sock.recv(65536):
                    out += chunk
            except ConnectionResetError:
                return "reset"
            return out

        ended, answer = await asyncio.gather(
            loop.run_in_executor(None, read_all, started),
            loop.run_in_executor(None, read_all, waiting),
        )
        elapsed = time.monotonic() - stalled_at
        assert ended == "reset", "a response cut by a stalled link ended like a complete one"
        assert isinstance(answer, bytes) and answer.startswith(b"HTTP/1.1 503 "), answer
        assert b"SANDBOX_NOT_CONNECTED" in answer
        assert elapsed < DEAD + 5  # the dead timer, not a client timeout, ended both
        started.close()
        waiting.close()
    finally:
        await stack.close()
        origin.close()
