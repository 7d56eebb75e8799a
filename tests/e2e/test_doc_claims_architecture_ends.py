"""docs/architecture.md, step 8 of a request's path: 'TCP half-close maps to FIN per direction',
on a preview URL (HTTP), against a real in-process edge and agent over real sockets on
127.0.0.1, with a service that answers only once it has read its client's FIN (as a ``nc``-style
service does) and frames its answer by closing the connection, so the client can tell a complete
answer (FIN) from a cut one (RST) by the end alone."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import AsyncIterator

import pytest

from .conftest import Stack
from .origin import pattern_block

pytestmark = pytest.mark.anyio

ANSWER = pattern_block(7)[: 600 * 1024]  # past every window and water mark on the way


class EofService:
    """Reads until EOF (a FIN; a reset raises), then answers with a close-delimited response and
    closes: what it read and how its input ended are kept."""

    def __init__(self) -> None:
        self.received = b""
        self.ended: str | None = None
        self.done = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                self.received = await asyncio.wait_for(reader.read(), 10)
                self.ended = "eof"
            except ConnectionResetError:
                self.ended = "reset"
                return
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + ANSWER)
            await writer.drain()
        finally:
            writer.close()
            self.done.set()


@pytest.fixture
async def service() -> AsyncIterator[tuple[EofService, int]]:
    svc = EofService()
    server = await asyncio.start_server(svc.serve, "127.0.0.1", 0)
    try:
        yield svc, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_a_client_fin_reaches_the_service_and_its_fin_ends_the_answer(
    stack: Stack, service: tuple[EofService, int]
) -> None:
    """The client sends a request with a body and half-closes: the service reads the request,
    body intact, then EOF (not a reset); its answer, framed only by its close, reaches the client
    whole and ends with a FIN, not an RST."""
    svc, port = service
    host = await stack.preview_host(port, "sb1")
    assert stack.edge is not None
    body = pattern_block(8)[:300_000]
    request = b"POST /up HTTP/1.1\r\nHost: " + host + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
    try:
        writer.write(request + body)
        await writer.drain()
        writer.write_eof()  # the client's FIN: it sends no more, still reads
        answer = await asyncio.wait_for(reader.read(), 10)  # a reset would raise here
        assert reader.at_eof()
    finally:
        writer.close()
    await asyncio.wait_for(svc.done.wait(), 10)
    assert svc.ended == "eof", svc.ended
    assert svc.received.endswith(b"\r\n\r\n" + body), svc.received[:200]
    head, _, got = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert hashlib.sha256(got).digest() == hashlib.sha256(ANSWER).digest(), len(got)


async def test_the_answer_still_arrives_when_the_client_half_closes_before_the_agent_dialled(
    stack: Stack, service: tuple[EofService, int]
) -> None:
    """The head, the body and the FIN all in one write, before the agent can have dialled the
    service: the FIN waits behind the bytes (it is not a reset, and not lost), so the service
    still reads the whole request and then EOF."""
    svc, port = service
    host = await stack.preview_host(port, "sb1")
    assert stack.edge is not None
    request = b"POST /up HTTP/1.1\r\nHost: " + host + b"\r\nContent-Length: 5\r\n\r\nhello"
    with socket.create_connection(("127.0.0.1", stack.edge.public_port), timeout=10) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := await asyncio.to_thread(sock.recv, 1 << 20):  # bounded by the timeout
            chunks.append(chunk)
    await asyncio.wait_for(svc.done.wait(), 10)
    assert svc.ended == "eof" and svc.received.endswith(b"\r\n\r\nhello")
    assert b"".join(chunks).partition(b"\r\n\r\n")[2] == ANSWER
