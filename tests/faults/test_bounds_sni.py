"""Bounds of the TLS passthrough listener's wait for a ClientHello (tunneld/sni.py, read by
tunneld/tcpexpose.py ``_Peek``) against clients that send it slowly.

- A ClientHello dribbled one byte at a time still routes: the listener asks the kernel for the
  bytes the parser needs (SO_RCVLOWAT) and looks again when they are there, so it neither stalls
  on a partial hello nor wakes up per byte; the sandbox's service then reads the very bytes sent.
- A client that keeps sending, one byte now and then, and never completes its hello is closed at
  ``head_timeout`` from its first byte: progress does not extend the wait (slowloris), and it
  leaves no peeking connection counted.

(The other hostile hellos - oversized, truncated then silent, truncated then FIN, not TLS - are
tests/e2e/test_public_tcp.py::test_hostile_client_hellos_are_closed_promptly.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.conftest import wait_until
from tests.test_sni import client_hello

from .conftest import Stack, closed_within, tls_files

pytestmark = pytest.mark.anyio

DOMAIN = "preview.test"
TOKEN = "sni0token"
HEAD_TIMEOUT = 2.0
IO_TIMEOUT = 10.0


async def start_passthrough(tmp_path: Path, head_timeout: float) -> Stack:
    """An edge whose public TLS listener passes TLS through to ``tls`` exposures."""
    _, cert_file, key_file = tls_files(tmp_path, f"*.{DOMAIN}")
    return await Stack(
        domain=DOMAIN,
        scheme="https",
        public_tls_cert=cert_file,
        public_tls_key=key_file,
        public_tls_passthrough=True,
        head_timeout=head_timeout,
    ).start()


@pytest.fixture
async def passthrough(tmp_path: Path) -> AsyncIterator[Stack]:
    stack = await start_passthrough(tmp_path, HEAD_TIMEOUT)
    try:
        yield stack
    finally:
        await stack.close()


class Recorder:
    """The sandbox's TCP service: keeps what each connection sent."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Recorder:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                self.received += chunk
        except ConnectionError:
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_a_client_hello_dribbled_byte_by_byte_is_routed(passthrough: Stack) -> None:
    stack = passthrough
    assert stack.edge is not None
    service = await Recorder().start()
    try:
        await stack.agent("sb1")
        await stack.expose("sb1", service.port, protocol="tls", token=TOKEN)
        hello = client_hello(f"{service.port}-sb1-{TOKEN}.{DOMAIN}")
        _reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
        try:
            for i in range(len(hello)):  # about 1.5 KiB in well under HEAD_TIMEOUT
                writer.write(hello[i : i + 1])
                await writer.drain()
                if i % 8 == 0:
                    await asyncio.sleep(0.001)
            await wait_until(
                lambda: len(service.received) >= len(hello),
                timeout=IO_TIMEOUT,
                what="the hello to reach the sandbox's service",
            )
            assert bytes(service.received) == hello  # unterminated: the very bytes
        finally:
            writer.transport.abort()
    finally:
        service.close()


async def test_a_hello_that_never_completes_is_closed_at_head_timeout(passthrough: Stack) -> None:
    stack = passthrough
    assert stack.edge is not None
    hello = client_hello(f"8000-sb1-{TOKEN}.{DOMAIN}")
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
    try:

        async def dribble() -> None:
            # one byte every 0.2 s: progress all along, the hello complete only after ~100 s
            for i in range(len(hello) - 1):
                writer.write(hello[i : i + 1])
                await asyncio.sleep(0.2)

        sender = asyncio.ensure_future(dribble())
        try:
            # closed by head_timeout, not by the end of the hello (the slack is for a slow CI)
            await closed_within(reader, HEAD_TIMEOUT + 5)
            assert not sender.done()  # closed while the client was still making progress
        finally:
            sender.cancel()
        await wait_until(
            lambda: stack.edge.tcp.peeking == 0,  # type: ignore[union-attr]
            timeout=IO_TIMEOUT,
            what="no peeking connection left",
        )
    finally:
        writer.transport.abort()
