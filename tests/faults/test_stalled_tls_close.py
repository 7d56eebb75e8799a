"""The HTTPS version of test_stalled_close.py: a clean close over TLS that the client never lets
finish ends with RST, never with a FIN that could pass for the end of a complete response, and a
client that keeps reading, however long the rest takes, gets every byte and ``close_notify``.

Over TLS the edge's close is the TLS layer's shutdown: it sends what is left, then
``close_notify``, and waits for the client's, until ``ssl_shutdown_timeout``
(``TLS_SHUTDOWN_TIMEOUT``), counted from the close whatever the client takes meanwhile, drops
what it still holds and closes the socket with a FIN. So that timeout is only a far backstop and
the connection's ``StalledCloseWatch`` decides: a client that takes nothing for a look of the
watch is reset; one that keeps taking bytes keeps the connection (here for well over the 5 s
the TLS layer used to allow); one that took everything but does not answer ``close_notify`` is
closed ``TLS_NOTIFY_WAIT`` later (a FIN: it lacks nothing); and at ``TLS_CLOSE_DEADLINE`` the
close ends whatever the progress (RST while bytes are owed).

The client is a real TLS client (``ssl.SSLObject`` over a socket on 127.0.0.1) whose reads the
test controls; buffers are set small on both sides as in test_stalled_close.py, or large on the
edge's side when megabytes must wait for the client at the close.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import pytest

from relay.mux import StalledCloseWatch, abort_with_reset, unsent_bytes
from tests.e2e.conftest import wait_until
from tests.faults.conftest import Stack, tls_files
from tests.faults.test_stalled_close import BODY, HEAD, _BigThenClose

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


async def _tls_stack(
    tmp_path: Path, alpn: str = "http/1.1", **config: Any
) -> tuple[Stack, ssl.SSLContext]:
    ca, cert, key = tls_files(tmp_path, f"*.{DOMAIN}")
    stack = await Stack(
        domain=DOMAIN, scheme="https", public_tls_cert=cert, public_tls_key=key, **config
    ).start()
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.check_hostname = False  # generated tokens may hold "_", which wildcards refuse
    context.set_alpn_protocols([alpn])
    return stack, context


@asynccontextmanager
async def _exposed_tls(
    tmp_path: Path, service: _BigThenClose, alpn: str = "http/1.1", **config: Any
) -> AsyncIterator[tuple[Stack, ssl.SSLContext, str]]:
    """An HTTPS edge with ``config``, an agent, and ``service`` exposed: the client's context
    and the preview host."""
    port = await service.start()
    stack, context = await _tls_stack(tmp_path, alpn, **config)
    try:
        await stack.agent("sb1")
        yield stack, context, stack.host_of((await stack.expose("sb1", port))["exposedAt"])
    finally:
        await stack.close()
        await service.close()


class _BigThenCloseOf(_BigThenClose):
    """``_BigThenClose`` with a body of ``size`` bytes."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            writer.write(HEAD + b"x" * self.size)
            await asyncio.wait_for(writer.drain(), 30)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.closed.set()


async def _connect(
    stack: Stack, context: ssl.SSLContext, host: str, rcvbuf: int, sndbuf: int
) -> tuple[_TlsClient, Any]:
    """A TLS client with a ``rcvbuf`` receive buffer, and the edge's connection to it, whose
    socket's send buffer is set to ``sndbuf``."""
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
    edge_sock = conn.transport.get_extra_info("socket")
    edge_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    # (the kernel doubles what it is asked for, up to twice net.core.wmem_max)
    assert edge_sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= sndbuf, (
        f"net.core.wmem_max is below {sndbuf // 2}: the edge's socket cannot hold the response"
    )
    return client, conn


async def closing_with(transport: Callable[[], Any], unsent: int) -> None:
    """Wait for the edge's close of ``transport`` to be under way with more than ``unsent``
    bytes the client has not taken (``transport()``: the transport, None once gone)."""

    def closing() -> bool:
        t = transport()
        return t is None or (t.is_closing() and unsent_bytes(t) > unsent)

    await wait_until(closing, 10, f"the edge's close, over {unsent} bytes left unsent")
    assert transport() is not None, "the connection ended before the test could look at it"


async def _stalled_request(
    stack: Stack,
    context: ssl.SSLContext,
    host: str,
    rcvbuf: int = 2048,
    sndbuf: int = 8192,
    unsent: int = 0,
) -> tuple[_TlsClient, Any]:
    """A TLS client that asks for the response and reads nothing; returns it and the edge's
    connection once the edge's close is under way with more than ``unsent`` bytes the client
    has not taken."""
    client, conn = await _connect(stack, context, host, rcvbuf, sndbuf)
    await client.send(b"GET /big HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n")
    await closing_with(lambda: conn.transport, unsent)
    return client, conn


@pytest.mark.parametrize(
    ("timeouts", "deadline"),
    [
        # no look of the stalled-close watch before the close's deadline: the deadline acts
        ({"idle_timeout": 0, "keepalive_timeout": 60}, 1.0),
        # the watch's first look (idle_timeout) that finds nothing taken acts
        ({"idle_timeout": 0.5}, None),
    ],
    ids=["close-deadline", "watch"],
)
async def test_a_tls_close_the_client_never_lets_finish_ends_with_a_reset(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    timeouts: dict[str, Any],
    deadline: float | None,
) -> None:
    if deadline is not None:
        monkeypatch.setattr("tunneld.public.TLS_CLOSE_DEADLINE", deadline)
    service = _BigThenClose()
    async with _exposed_tls(tmp_path, service, **timeouts) as (stack, context, host):
        client: _TlsClient | None = None
        try:
            assert stack.edge is not None
            edge = stack.edge
            client, conn = await _stalled_request(stack, context, host)
            await asyncio.wait_for(service.closed.wait(), 5)
            await wait_until(
                lambda: conn not in edge.public_connections, 15, "the stalled connection was ended"
            )
            received, ended = await client.read_to_the_end(10)
            assert len(received) < len(HEAD) + BODY  # (the reset may discard what the kernel held)
            assert ended == "reset", f"a cut response ended with a {ended}"
        finally:
            if client is not None:
                client.sock.close()


# What the client of the next test takes at most at each look of the watch (socket bytes).
BITE: Final = 64 * 1024


class _BiteAtEveryLook:
    """A client socket that takes bytes only when the ``StalledCloseWatch`` of its connection is
    armed (when the edge's close begins, then after each look), and then at most ``most``: what
    its receive buffer holds, read right there in the watch's callback (non-blocking).

    So the client takes nothing for almost a whole period each time, yet something between
    every two looks, whatever the machine's load: the order comes from the watch itself, not
    from a client's timer racing it (a test process stalled for a period right after a look
    delayed such a client's read past the next look, which then found nothing taken)."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, most: int = BITE, unless_read: int | None = None
    ) -> None:
        self.most = most
        # ``unless_read``: no bite when the client's own reads took that much since the last arm
        self.unless_read = unless_read
        self.read = 0  # what the client's own reads took since the last arm
        self.sock: socket.socket | None = None
        self.raw = bytearray()  # taken, not yet given to the TLS client
        self.ended: str | None = None  # "reset" or "FIN" once the socket said so
        self.looks = -1  # arms of the watch of this client's connection after its first
        self.bitten = asyncio.Event()
        arm = StalledCloseWatch._arm

        def armed(watch: StalledCloseWatch, now: float) -> None:
            arm(watch, now)
            self._bite(watch)

        monkeypatch.setattr(StalledCloseWatch, "_arm", armed)

    def _bite(self, watch: StalledCloseWatch) -> None:
        sock = self.sock
        if sock is None or self.ended is not None:
            return
        if watch.transport.get_extra_info("peername") != sock.getsockname():
            return  # another connection's watch
        self.looks += 1  # (the first arm is the close's start: counted from -1)
        read, self.read = self.read, 0
        if self.unless_read is not None and read >= self.unless_read:
            return
        self._take(sock, self.most)
        self.bitten.set()

    def _take(self, sock: socket.socket, most: int) -> bool:
        """Up to ``most`` bytes the socket holds now; False once it has nothing more now (or
        has ended)."""
        taken = 0
        while taken < most and self.ended is None:
            try:
                data = sock.recv(min(65536, most - taken))
            except (BlockingIOError, InterruptedError):
                return False
            except ConnectionResetError:
                self.ended = "reset"
            else:
                if not data:
                    self.ended = "FIN"
                self.raw += data
                taken += len(data)
        return self.ended is None

    async def read_to_the_end(
        self, client: _TlsClient, gone: Callable[[], bool], timeout: float
    ) -> tuple[bytes, str]:
        """The plaintext the bites brought, and how the connection ended (as
        ``_TlsClient.read_to_the_end``). Once the edge's side is ``gone`` no watch is left to
        take bites at: the client then reads all its socket still holds, up to the end."""
        received = bytearray()
        async with asyncio.timeout(timeout):
            while True:
                try:
                    await asyncio.wait_for(self.bitten.wait(), 0.1)
                except TimeoutError:
                    if not gone() or self.sock is None:
                        continue
                    while self._take(self.sock, 1 << 20):
                        pass
                self.bitten.clear()
                if (ended := self._feed(client, received)) is not None:
                    return bytes(received), ended

    async def read_paced(
        self, client: _TlsClient, timeout: float, chunk: int, pause: float
    ) -> tuple[bytes, str]:
        """As ``_TlsClient.read_to_the_end`` (at most ``chunk`` socket bytes every ``pause``
        seconds), plus the bites: every read is a non-blocking one made right then, into the
        one buffer, so the bytes stay in order whoever took them."""
        assert self.sock is not None
        received = bytearray()
        async with asyncio.timeout(timeout):
            while True:
                before = len(self.raw)
                self._take(self.sock, chunk)
                self.read += len(self.raw) - before
                if (ended := self._feed(client, received)) is not None:
                    return bytes(received), ended
                await asyncio.sleep(pause)

    def _feed(self, client: _TlsClient, received: bytearray) -> str | None:
        """Give what was taken to the TLS client, its plaintext to ``received``; how the
        connection ended, or None while it goes on."""
        raw, self.raw = self.raw, bytearray()
        if raw:
            client.incoming.write(raw)
        if self.ended == "FIN":
            client.incoming.write_eof()
        try:
            while plain := client.tls.read(65536):
                received += plain
            return "close_notify"
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            return "close_notify"
        except ssl.SSLError as exc:
            return f"TLS error ({exc.reason})"
        if self.ended == "reset":
            return "reset"
        if self.ended == "FIN":
            return "FIN without close_notify"
        return None


async def test_a_slow_tls_client_that_keeps_reading_gets_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes the client takes keep the connection: taking at most 64 KiB of the socket at each
    look of the watch (0.25 s apart), nothing in between, over several looks, the client gets the
    whole response, then ``close_notify``. (``TLS_NOTIFY_WAIT`` is 0.5 s here: the client does
    not answer ``close_notify``, and the edge's side then ends that much later.)"""
    monkeypatch.setattr("tunneld.public.TLS_NOTIFY_WAIT", 0.5)
    bites = _BiteAtEveryLook(monkeypatch)
    async with _exposed_tls(
        tmp_path, _BigThenClose(), idle_timeout=0.25, keepalive_timeout=0.25
    ) as (stack, context, host):
        client: _TlsClient | None = None
        try:
            client, conn = await _connect(stack, context, host, rcvbuf=16384, sndbuf=8192)
            bites.sock = client.sock
            await client.send(b"GET /big HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n")
            edge = stack.edge
            assert edge is not None

            def gone() -> bool:
                return conn not in edge.public_connections

            received, ended = await bites.read_to_the_end(client, gone, 30)
            assert (len(received), ended) == (len(HEAD) + BODY, "close_notify")
            assert bites.looks >= 3, f"the response took {bites.looks} looks of the watch"
            await wait_until(gone, 15, "the edge's side ended")
        finally:
            if client is not None:
                client.sock.close()


# The tail of a long response: what the edge still holds when its close begins. The client then
# takes at most 8 KiB of its socket every 40 ms (at most 200 KiB/s), so the rest (over
# SLOW_LEFT bytes) takes it more than 6 s: longer than the 5 s the TLS layer used to allow.
SLOW_BODY: Final = 1536 * 1024
SLOW_LEFT: Final = 1280 * 1024


@pytest.mark.parametrize("passthrough", [False, True], ids=["tls", "tls-passthrough-fallback"])
async def test_a_slow_tls_client_gets_megabytes_left_at_the_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, passthrough: bool
) -> None:
    """A client downloading at about 200 KiB/s with over a MiB still in the edge's buffers and
    the kernel's when the service finishes gets every byte and ``close_notify``, however long
    past the close that takes: the watch (0.5 s looks) sees it take bytes at every look. Also
    through the passthrough listener (``public_tls_passthrough``), whose connections for the
    edge's own names are terminated by the same TLS layer (``SniListener``). When its reads on
    its own timer took less than 32 KiB since the previous look of the watch (the test process,
    which runs the edge too, stalled for a look: right after the previous one or after the close
    began), the client empties its receive buffer at the look (``_BiteAtEveryLook``), so such a
    stall cannot reset a correct edge; otherwise it reads only on its timer. The client
    does not answer ``close_notify``: the edge's side ends ``TLS_NOTIFY_WAIT`` (0.5 s here)
    after it took everything."""
    monkeypatch.setattr("tunneld.public.TLS_NOTIFY_WAIT", 0.5)  # the client does not answer
    bites = _BiteAtEveryLook(monkeypatch, unless_read=32 * 1024)
    async with _exposed_tls(
        tmp_path,
        _BigThenCloseOf(SLOW_BODY),
        idle_timeout=0.5,
        keepalive_timeout=0.5,
        public_tls_passthrough=passthrough,
    ) as (stack, context, host):
        client: _TlsClient | None = None
        try:
            client, conn = await _connect(stack, context, host, 16384, 2 * SLOW_BODY)
            bites.sock = client.sock
            await client.send(b"GET /big HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n")
            await closing_with(lambda: conn.transport, SLOW_LEFT)
            received, ended = await bites.read_paced(client, 60, chunk=8192, pause=0.04)
            assert (len(received), ended) == (len(HEAD) + SLOW_BODY, "close_notify")
            assert received == HEAD + b"x" * SLOW_BODY
            edge = stack.edge
            assert edge is not None
            await wait_until(
                lambda: conn not in edge.public_connections, 15, "the edge's side ended"
            )
        finally:
            if client is not None:
                client.sock.close()


async def test_a_tls_client_that_never_answers_close_notify_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that took everything, ``close_notify`` included, and neither answers it nor
    closes: the edge closes the socket ``TLS_NOTIFY_WAIT`` later (here 0.5 s) with a FIN, not
    at the TLS layer's far backstop (``TLS_SHUTDOWN_TIMEOUT``) nor at ``TLS_CLOSE_DEADLINE``;
    no look of the watch (keepalive_timeout 60 s) would end it either."""
    monkeypatch.setattr("tunneld.public.TLS_NOTIFY_WAIT", 0.5)
    async with _exposed_tls(tmp_path, _BigThenClose(), idle_timeout=0, keepalive_timeout=60) as (
        stack,
        context,
        host,
    ):
        client: _TlsClient | None = None
        try:
            edge = stack.edge
            assert edge is not None
            client, conn = await _stalled_request(stack, context, host, rcvbuf=65536)
            received, ended = await client.read_to_the_end(30)
            assert (len(received), ended) == (len(HEAD) + BODY, "close_notify")
            await wait_until(
                lambda: conn not in edge.public_connections, 15, "the unanswered close was ended"
            )
            loop = asyncio.get_running_loop()
            assert await asyncio.wait_for(loop.sock_recv(client.sock, 65536), 5) == b""  # FIN
        finally:
            if client is not None:
                client.sock.close()


async def test_a_reset_of_a_closing_tls_connection_owing_bytes_is_a_reset(tmp_path: Path) -> None:
    """``abort_with_reset`` on a TLS transport whose clean close is under way, with nothing in
    its own buffer but the rest of what it was given (and ``close_notify``) still in the TLS
    layer's TCP transport and the kernel: the peer lacks bytes, so it sees a reset, not the FIN
    of ``abort()`` alone (which drops what the TCP transport holds). A bare TLS server on the
    test's loop (asyncio's or uvloop's SSL layer), a client that reads only at the end."""
    ca, cert, key = tls_files(tmp_path, "127.0.0.1")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    transports: list[asyncio.Transport] = []

    class _Server(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transports.append(transport)  # type: ignore[arg-type]  # uvloop's: not a subclass

    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Server, "127.0.0.1", 0, ssl=server_context)
    client: _TlsClient | None = None
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        port = server.sockets[0].getsockname()[1]
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), 5)
        client_context = ssl.create_default_context()
        ca.configure_trust(client_context)
        client = _TlsClient(sock, client_context, "127.0.0.1")
        await client.handshake()
        await wait_until(lambda: bool(transports), 5, "the server's side of the connection")
        (transport,) = transports
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        # less than the TCP transport's high-water mark beyond what the kernel takes: none of
        # it stays in the TLS transport's own buffer
        transport.write(b"x" * 48 * 1024)
        transport.close()
        await wait_until(
            lambda: not transport.get_write_buffer_size() and unsent_bytes(transport) > 0,
            5,
            "the close under way, the rest below the TLS transport",
        )
        abort_with_reset(transport)
        received, ended = await client.read_to_the_end(10)
        assert len(received) < 48 * 1024
        assert ended == "reset", f"the reset of a connection owing bytes ended with a {ended}"
    finally:
        if client is not None:
            client.sock.close()
        server.close()
