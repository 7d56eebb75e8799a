"""The HTTPS version of test_stalled_close.py: a clean close over TLS that the client never lets
finish ends with RST, never with a FIN that could pass for the end of a complete response.

Over TLS the edge's close is the TLS layer's shutdown: it sends what is left, then
``close_notify``, and gives up after ``ssl_shutdown_timeout`` (``TLS_SHUTDOWN_TIMEOUT``), dropping
what it still holds and closing the socket with a FIN. A client that read nothing then gets part
of the response and a FIN: a response without a length looks complete to a client that does
not insist on ``close_notify``. So the edge resets such a connection itself at
``TLS_CLOSE_DEADLINE``, before the TLS layer's timeout, when bytes are still owed; and, as over
plain HTTP, at the first look of its stalled-close watch that finds nothing taken. A slow client
that keeps reading gets every byte and the ``close_notify``.

The client is a real TLS client (``ssl.SSLObject`` over a socket on 127.0.0.1) whose reads the
test controls; buffers are set small on both sides as in test_stalled_close.py.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest

from relay.mux import unsent_bytes
from tests.e2e.conftest import wait_until
from tests.faults.conftest import Stack, tls_files
from tests.faults.test_stalled_close import BODY, HEAD, _BigThenClose
from tunneld.tls import TLS_CLOSE_DEADLINE, TLS_SHUTDOWN_TIMEOUT

pytestmark = pytest.mark.anyio

DOMAIN = "preview.test"


class _TlsClient:
    """A TLS client over a non-blocking socket that reads only when told to."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, host: str) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=host)

    async def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def handshake(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(100):
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), 5)
                assert data, "the edge closed during the handshake"
                self.incoming.write(data)
            else:
                await self._flush()
                return
        raise AssertionError("no TLS handshake")

    async def send(self, data: bytes) -> None:
        self.tls.write(data)
        await self._flush()

    async def read_to_the_end(
        self, timeout: float, chunk: int = 65536, pause: float = 0.0
    ) -> tuple[bytes, str]:
        """Everything the client can still read (``chunk`` socket bytes a read, ``pause``
        seconds apart), and how the connection ended."""
        loop = asyncio.get_running_loop()
        received = bytearray()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    raw = await loop.sock_recv(self.sock, chunk)
                    if raw:
                        self.incoming.write(raw)
                    else:
                        self.incoming.write_eof()
                    try:
                        while plain := self.tls.read(65536):
                            received += plain
                        return bytes(received), "close_notify"
                    except ssl.SSLWantReadError:
                        pass
                    except ssl.SSLZeroReturnError:
                        return bytes(received), "close_notify"
                    except ssl.SSLError as exc:
                        return bytes(received), f"TLS error ({exc.reason})"
                    if not raw:
                        return bytes(received), "FIN without close_notify"
                    if pause:
                        await asyncio.sleep(pause)
        except ConnectionResetError:
            return bytes(received), "reset"


async def _tls_stack(tmp_path: Path, **config: Any) -> tuple[Stack, ssl.SSLContext]:
    ca, cert, key = tls_files(tmp_path, f"*.{DOMAIN}")
    stack = await Stack(
        domain=DOMAIN, scheme="https", public_tls_cert=cert, public_tls_key=key, **config
    ).start()
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.check_hostname = False  # generated tokens may hold "_", which wildcards refuse
    context.set_alpn_protocols(["http/1.1"])
    return stack, context


async def _stalled_request(
    stack: Stack, context: ssl.SSLContext, host: str, rcvbuf: int = 2048
) -> tuple[_TlsClient, object]:
    """A TLS client that asks for the response and reads nothing; returns it and the edge's
    connection once the edge's close is under way with bytes the client has not taken."""
    assert stack.edge is not None
    edge = stack.edge
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", edge.public_port)), 5)
    client = _TlsClient(sock, context, host)
    await client.handshake()
    await wait_until(lambda: len(edge.public_connections) == 1, 5, "the edge accepted it")
    (conn,) = edge.public_connections
    assert conn.transport is not None
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    await client.send(b"GET /big HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n")

    def closing_with_unsent() -> bool:
        t = conn.transport
        return t is None or (t.is_closing() and unsent_bytes(t) > 0)

    await wait_until(closing_with_unsent, 5, "the edge's close, bytes left unsent")
    assert conn.transport is not None, "the connection ended before the test could look at it"
    return client, conn


@pytest.mark.parametrize(
    ("timeouts", "tls_timeouts"),
    [
        # no look of the stalled-close watch before the TLS shutdown timeout: the deadline acts
        ({"idle_timeout": 0, "keepalive_timeout": 60}, None),
        # the watch's first look (idle_timeout) that finds nothing taken acts: with the TLS
        # shutdown timeout (and so the deadline) pushed past the test's wait, nothing else would
        ({"idle_timeout": 0.5}, 60.0),
    ],
    ids=["tls-deadline", "watch"],
)
async def test_a_tls_close_the_client_never_lets_finish_ends_with_a_reset(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    timeouts: dict[str, float],
    tls_timeouts: float | None,
) -> None:
    if tls_timeouts is not None:
        monkeypatch.setattr("tunneld.edge.TLS_SHUTDOWN_TIMEOUT", tls_timeouts + 1)
        monkeypatch.setattr("tunneld.public.TLS_CLOSE_DEADLINE", tls_timeouts)
    service = _BigThenClose()
    port = await service.start()
    stack, context = await _tls_stack(tmp_path, **timeouts)
    client: _TlsClient | None = None
    try:
        await stack.agent("sb1")
        host = stack.host_of((await stack.expose("sb1", port))["exposedAt"])
        assert stack.edge is not None
        edge = stack.edge
        client, conn = await _stalled_request(stack, context, host)
        await asyncio.wait_for(service.closed.wait(), 5)
        await wait_until(
            lambda: conn not in edge.public_connections,
            TLS_SHUTDOWN_TIMEOUT + 10,
            "the stalled connection was ended",
        )
        received, ended = await client.read_to_the_end(10)
        assert len(received) < len(HEAD) + BODY  # (the reset may discard what the kernel held)
        assert ended == "reset", f"a cut response ended with a {ended}"
    finally:
        if client is not None:
            client.sock.close()
        await stack.close()
        await service.close()


async def test_a_slow_tls_client_that_keeps_reading_gets_everything(tmp_path: Path) -> None:
    """Bytes the client takes keep the connection: read slowly over several looks of the watch
    (0.25 s apart; at most 8 KiB of the socket every 20 ms: about a second for the response,
    well within ``TLS_CLOSE_DEADLINE``), the whole response arrives, then ``close_notify``."""
    service = _BigThenClose()
    port = await service.start()
    stack, context = await _tls_stack(tmp_path, idle_timeout=0.25, keepalive_timeout=0.25)
    client: _TlsClient | None = None
    try:
        await stack.agent("sb1")
        host = stack.host_of((await stack.expose("sb1", port))["exposedAt"])
        client, conn = await _stalled_request(stack, context, host, rcvbuf=16384)
        received, ended = await client.read_to_the_end(
            TLS_CLOSE_DEADLINE + 10, chunk=8192, pause=0.02
        )
        assert (len(received), ended) == (len(HEAD) + BODY, "close_notify")
        edge = stack.edge
        assert edge is not None
        await wait_until(
            lambda: conn not in edge.public_connections,
            TLS_SHUTDOWN_TIMEOUT + 5,
            "the edge's side ended",
        )
    finally:
        if client is not None:
            client.sock.close()
        await stack.close()
        await service.close()
