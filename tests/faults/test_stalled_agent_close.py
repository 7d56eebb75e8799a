"""A peer that stops reading cannot keep its ended session's connection for ever.

When a session ends (here: the edge's dead-peer timer, as for an agent stopped with SIGSTOP or a
hostile one), the tunnel transport still holds the bytes the peer did not take. A graceful close
waits for them to go out, and the kernel keeps probing a zero window without end, so the
connection, its buffers and its place in ``agent_connections`` stayed for ever. Now a
``dead_timeout`` without the peer taking a byte resets it (``relay.mux.StalledCloseWatch``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import pytest

from protocol import control
from protocol.events import ControlReceived
from protocol.session import Role, Session
from tests.e2e.conftest import Stack, anyio_backend, no_unhandled_errors
from tunneld.auth import agent_token

if TYPE_CHECKING:
    from tunneld.edge import EdgeServer, EdgeSession

__all__ = ["anyio_backend", "no_unhandled_errors"]

pytestmark = pytest.mark.anyio

DEAD_TIMEOUT = 1.0
UPLOADS = 4
UPLOAD_BYTES = 4 << 20


def connect_silent_agent(port: int, sandbox_id: str, token: str) -> socket.socket:
    """An agent that says hello, reads its welcome, then never reads again (a 4 KiB window)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    session = Session(Role.AGENT)
    session.send_control(control.Hello(sandbox_id, token))
    sock.sendall(b"".join(bytes(b) for b in session.data_to_send()))
    for _ in range(100):
        data = sock.recv(65536)
        assert data, "the edge closed the setup connection"
        session.receive_data(data)
        for event in session.events_received():
            if isinstance(event, ControlReceived) and isinstance(event.message, control.Welcome):
                return sock
    raise AssertionError("no welcome")


async def upload(port: int, host: str) -> asyncio.StreamWriter:
    """A public client sending a large body to the sandbox: the edge relays it to the agent."""
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST / HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n" % (host.encode(), UPLOAD_BYTES)
    )
    for _ in range(UPLOAD_BYTES // 65536):
        writer.write(b"x" * 65536)
        try:
            await asyncio.wait_for(writer.drain(), 0.5)
        except TimeoutError:
            break  # the tunnel stopped taking it: what the test needs
    return writer


@asynccontextmanager
async def silent_agent_flooded(
    stack: Stack, uploads: int = UPLOADS
) -> AsyncIterator[tuple[EdgeServer, EdgeSession, socket.socket]]:
    """sb1's agent reads nothing after its welcome (``connect_silent_agent``) while ``uploads``
    public clients send it large bodies through an exposed port; the edge's side of its
    connection has a small send buffer, so what the agent does not take stays in the transport,
    whatever the kernel's autotuning would have taken in. Yields the edge, its session of sb1
    and the agent's socket; the clients are cut at the end."""
    edge = stack.edge
    assert edge is not None and stack.admin is not None
    writers: list[asyncio.StreamWriter] = []
    sock: socket.socket | None = None
    try:
        r = await stack.admin.post("/v1/sandboxes/sb1/ports", json={"port": 8000})
        assert r.status_code == 200, r.text
        host = stack.host_of(r.json()["exposedAt"])
        token = agent_token(stack.secret, "sb1")
        sock = await asyncio.to_thread(connect_silent_agent, edge.agent_port, "sb1", token)
        (session,) = [c for c in edge.agent_connections if c.sandbox_id == "sb1"]
        assert session.transport is not None
        edge_sock = session.transport.get_extra_info("socket")
        edge_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        writers = list(
            await asyncio.gather(*(upload(edge.public_port, host) for _ in range(uploads)))
        )
        yield edge, session, sock
    finally:
        if sock is not None:
            sock.close()
        for writer in writers:
            writer.transport.abort()


def read_until_end(sock: socket.socket) -> str:
    """How the edge ended the connection, as the silent agent finally reads it."""
    sock.settimeout(10)
    try:
        for _ in range(10_000):
            if not sock.recv(65536):
                return "clean EOF"
        return "no end"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "still open"


async def test_an_agent_that_stops_reading_loses_its_ended_session_s_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "tunnel")
    stack = await Stack(dead_timeout=DEAD_TIMEOUT, heartbeat_interval=0.3).start()
    try:
        async with silent_agent_flooded(stack) as (edge, session, sock):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10 * DEAD_TIMEOUT
            while not session.session.closed:
                assert loop.time() < deadline, "the dead-peer timer did not end the session"
                await asyncio.sleep(0.05)
            transport = session.transport
            assert transport is not None and transport.get_write_buffer_size() > 0  # premise

            deadline = loop.time() + 4 * DEAD_TIMEOUT + 5
            while session in edge.agent_connections:
                assert loop.time() < deadline, (
                    "the ended session's connection was kept "
                    f"({session.output_backlog} bytes unsent to a peer that reads nothing)"
                )
                await asyncio.sleep(0.05)
            assert await asyncio.to_thread(read_until_end, sock) == "reset"
            assert any("read nothing" in rec.getMessage() for rec in caplog.records)
    finally:
        await stack.close()
