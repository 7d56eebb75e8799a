"""A client's reset racing the service's end must cut one connection, never the sandbox's tunnel.

When the agent's FIN for a stream arrives, the edge half-closes the client's socket
(``write_eof``). On asyncio that is a ``shutdown(SHUT_WR)`` at once, which raises ENOTCONN when
the client reset the connection after the edge's last read and before the FIN: raised inside the
tunnel's event dispatch, it ended the whole agent session (every stream of the sandbox) and, with
the session's guard (relay/mux.py ``_internal_error``), logged an internal error. Found by the CI
(tests/e2e/test_public_tcp.py hit the race). Now ``write_eof_or_abort`` ends that connection alone,
as a reset (the stream is reset towards the service), and the session goes on.

The race is made certain: the client's RST reaches the edge's socket while the event loop (the
edge, the agent and this test share it) is blocked, and the FIN's handling is then run on the
stream's endpoint directly. Real sockets on 127.0.0.1; asyncio and uvloop."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import pytest

from tests.e2e.conftest import anyio_backend, wait_until
from tests.e2e.test_public_tcp import expose_tcp, tcp_stack

pytestmark = pytest.mark.anyio
__all__ = ["anyio_backend"]  # asyncio and uvloop


class Service:
    """The sandbox's service: keeps what it receives and counts the resets it sees (the agent
    passes a client's reset on); ``switch``: its answer to a request head first (a 101)."""

    def __init__(self, switch: bytes | None = None) -> None:
        self.switch = switch
        self.received = bytearray()
        self.resets = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.switch is not None:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(self.switch)
            while data := await reader.read(65536):
                self.received.extend(data)
        except ConnectionResetError:
            self.resets += 1
        finally:
            writer.close()


async def test_a_reset_client_at_the_service_s_end_loses_its_connection_only() -> None:
    stack = await tcp_stack()
    try:
        agent = await stack.agent("sb1")
        svc = Service()
        received = svc.received
        service = await asyncio.start_server(svc.serve, "127.0.0.1", 0)
        try:
            port = service.sockets[0].getsockname()[1]
            public_port = await expose_tcp(stack, "sb1", port)
            client = socket.create_connection(("127.0.0.1", public_port), timeout=10)
            client.sendall(b"hello")
            await wait_until(lambda: bytes(received) == b"hello", 10, "the service got the bytes")
            assert stack.edge is not None
            session = stack.edge.registry.get("sb1").session
            (endpoint,) = session.streams.values()
            # the client resets; its RST lands on the edge's socket while the loop is held
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            time.sleep(0.2)  # blocks the loop: the edge cannot notice the reset meanwhile
            endpoint.peer_ended()  # the agent's FIN for the stream, handled now
            # this connection is over, as a reset: the service's side is closed by the agent
            await wait_until(lambda: not session.streams, 10, "the stream to end")
            await wait_until(lambda: svc.resets == 1, 10, "the service to see a reset")
            # ...and the sandbox's tunnel goes on: a new connection through it works
            assert stack.edge.registry.get("sb1").session is session and not session.session.closed
            assert agent.session is not None and not agent.session.session.closed
            received.clear()
            second = socket.create_connection(("127.0.0.1", public_port), timeout=10)
            try:
                second.sendall(b"again")
                await wait_until(lambda: bytes(received) == b"again", 10, "a second connection")
            finally:
                second.close()
        finally:
            service.close()
    finally:
        await stack.close()


SWITCHED = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n"


async def _upgraded(port: int, host: bytes) -> socket.socket:
    """A client connection to the edge's public port whose request the service upgraded."""
    loop = asyncio.get_running_loop()
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    client.setblocking(False)
    request = b"GET / HTTP/1.1\r\nHost: %s\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n" % host
    await loop.sock_sendall(client, request)
    head = b""
    while b"\r\n\r\n" not in head:
        head += await asyncio.wait_for(loop.sock_recv(client, 4096), 10)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return client


async def test_a_reset_client_of_an_upgraded_connection_loses_it_only() -> None:
    """The same on an HTTP connection the service upgraded (tunneld/public.py: after a 101 its
    bytes and ends pass both ways, as for a WebSocket)."""
    stack = await tcp_stack()
    try:
        agent = await stack.agent("sb1")
        svc = Service(SWITCHED)
        service = await asyncio.start_server(svc.serve, "127.0.0.1", 0)
        try:
            port = service.sockets[0].getsockname()[1]
            exposed = await stack.expose("sb1", port)
            host = stack.host_of(exposed["exposedAt"]).encode()
            assert stack.edge is not None
            client = await _upgraded(stack.edge.public_port, host)
            session = stack.edge.registry.get("sb1").session
            (endpoint,) = session.streams.values()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            time.sleep(0.2)  # blocks the loop: the edge cannot notice the reset meanwhile
            endpoint.peer_ended()  # the service's end of the upgraded connection, handled now
            await wait_until(lambda: not session.streams, 10, "the stream to end")
            await wait_until(lambda: svc.resets == 1, 10, "the service to see a reset")
            assert stack.edge.registry.get("sb1").session is session and not session.session.closed
            assert agent.session is not None and not agent.session.session.closed
            (await _upgraded(stack.edge.public_port, host)).close()  # the tunnel still serves
        finally:
            service.close()
    finally:
        await stack.close()
