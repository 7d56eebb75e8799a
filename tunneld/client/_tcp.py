"""Raw TCP to a sandbox port through tunneld's admin API (``Sandbox.open_tcp``).

Theory of operation: one admin connection per TCP stream. The SDK sends
``GET /v1/sandboxes/{id}/ports/{port}/tcp`` with ``Connection: Upgrade`` and ``Upgrade: tcp``;
tunneld answers ``101 Switching Protocols`` only once the agent has connected to
``127.0.0.1:PORT`` in the sandbox, or an error document (502 ``UPSTREAM_CONNECT_FAILED`` when
nothing listens, 404, 401...) which becomes the SDK's typed exception. After the 101 the
connection carries the service's bytes both ways, unframed: :class:`TcpStream` is that connection
as an anyio byte stream, with the bytes h11 read past the 101 delivered first.

Ends map one to one: ``send_eof()`` is a TCP half-close that reaches the service as its own
half-close, a clean end of the service's output is ``anyio.EndOfStream``, and an abnormal end
anywhere on the path (service reset, agent killed, tunneld gone) is a reset here, which anyio
raises as ``anyio.BrokenResourceError``: never a clean ``EndOfStream``.

Every wait but ``receive()`` is bounded: dialling by the client's ``timeout``, the upgrade and
each 64 KiB piece of a ``send()`` by the ``timeout`` of ``open_tcp`` (default: the client's),
with both carriers. A service (or a path) that stops taking bytes makes ``send()`` raise
:class:`TunnelTimeoutError` instead of hanging; one that is slow but reading is not an error,
however large the send. A send cut short (that timeout, or the caller's cancellation) has sent
an unknown part of its bytes, so the stream is then reset: the service sees an abnormal end,
never a clean end of truncated data. ``send_eof()``, ``aclose()`` and ``abort()`` of the raw
stream do not wait (a shutdown or close of the socket; over TLS no close_notify is awaited);
the WebSocket's close handshake is bounded by ``timeout``.
"""

from __future__ import annotations

import socket
import struct
from typing import Any, Final

import anyio
import anyio.abc
import h11

from ._errors import (
    ConnectionClosed,
    TunnelConnectionError,
    TunnelError,
    TunnelTimeoutError,
    error_from_response,
)
from ._http import HTTPTransport
from ._websocket import WebSocket

__all__ = ["TcpStream", "WebSocketTcpStream", "open_tcp_stream"]

# The subprotocol of raw TCP over WebSocket (tunneld/tcpws.py).
TCP_SUBPROTOCOL: Final = "tunneld.tcp"

_READ_SIZE: Final = 64 * 1024
# send() writes at most this much per timed wait: the timeout bounds a stall, not a large send
# to a service that is slow but reading.
_SEND_PIECE: Final = 64 * 1024
# An error document's body: the admin API's are small JSON objects.
_MAX_ERROR_BODY: Final = 64 * 1024
_LINGER_RESET: Final = struct.pack("ii", 1, 0)


class TcpStream(anyio.abc.ByteStream):
    """A byte stream to ``127.0.0.1:PORT`` inside a sandbox (from :meth:`Sandbox.open_tcp`).

    ``receive()`` returns the service's bytes and raises ``anyio.EndOfStream`` once it ended its
    output normally, ``anyio.BrokenResourceError`` when the connection was reset (an abnormal
    end); it waits for data as a socket does (wrap it in ``anyio.fail_after()`` to bound it).
    ``send()`` raises :class:`TunnelTimeoutError` when nothing takes its bytes for ``timeout``
    seconds (each 64 KiB piece), and then resets the stream. ``send_eof()`` half-closes (the
    service reads EOF and may still answer); ``aclose()`` ends normally; ``abort()`` resets, so
    the service sees an abnormal end too.

    Example::

        async with await sb.open_tcp(6379) as tcp:
            await tcp.send(b"PING\\r\\n")
            print(await tcp.receive())   # b"+PONG\\r\\n"
    """

    def __init__(
        self, stream: anyio.abc.ByteStream, buffered: bytes = b"", *, timeout: float
    ) -> None:
        self._stream = stream
        self._buffered = buffered
        self._timeout = timeout

    async def receive(self, max_bytes: int = _READ_SIZE) -> bytes:
        if self._buffered:
            data, self._buffered = self._buffered[:max_bytes], self._buffered[max_bytes:]
            return data
        return await self._stream.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        """Send ``item``. Raises :class:`TunnelTimeoutError` if the write stalls: no 64 KiB of it
        taken within ``timeout`` (the service does not read, or the path to it is stuck). A send
        that does not complete (that, the caller's cancellation, a broken connection) resets
        the stream, since an unknown part of ``item`` went out."""
        completed = False
        try:
            for start in range(0, len(item), _SEND_PIECE):
                with anyio.fail_after(self._timeout):
                    await self._stream.send(item[start : start + _SEND_PIECE])
            completed = True
        except TimeoutError:
            raise TunnelTimeoutError(
                f"Write to the raw TCP stream stalled for {self._timeout:g}s (the service is not "
                "reading, or the path to it is stuck); connection reset."
            ) from None
        finally:
            if not completed:
                await self.abort()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def abort(self) -> None:
        """Close with a reset (RST): the far end sees an abnormal end, not a clean EOF."""
        try:
            sock = self._stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except (
            OSError,
            AttributeError,
            ValueError,  # uvloop's socket of a closed transport: "negative file descriptor"
            anyio.TypedAttributeLookupError,
        ):  # closed: nothing to reset
            pass
        await anyio.aclose_forcefully(self._stream)

    @property
    def extra_attributes(self) -> Any:
        return self._stream.extra_attributes


class WebSocketTcpStream(TcpStream):
    """The same byte stream carried in WebSocket binary messages (``open_tcp(port,
    websocket=True)``), for a path that passes WebSockets only. Ends map as for
    :class:`TcpStream`: ``send_eof()`` is an empty message (the service reads EOF), the
    service's end is ``anyio.EndOfStream`` (Close 1000), any other close (1011: a reset) is
    ``anyio.BrokenResourceError``."""

    def __init__(self, ws: WebSocket) -> None:
        super().__init__(ws._stream, timeout=ws._timeout)
        self._ws = ws

    async def receive(self, max_bytes: int = _READ_SIZE) -> bytes:
        while not self._buffered:
            try:
                message = await self._ws.receive()
            except ConnectionClosed as exc:
                if exc.code == 1000:
                    raise anyio.EndOfStream from None
                raise anyio.BrokenResourceError(
                    f"the stream ended abnormally (WebSocket close {exc.code})"
                ) from None
            if isinstance(message, str):  # tunneld sends binary messages only
                await self._ws._abort()
                raise anyio.BrokenResourceError("unexpected text message from tunneld")
            self._buffered = message
        data, self._buffered = self._buffered[:max_bytes], self._buffered[max_bytes:]
        return data

    async def send(self, item: bytes) -> None:
        """Send ``item`` in binary messages of at most 64 KiB, each bounded by ``timeout`` as
        :meth:`TcpStream.send` bounds its pieces (a stalled write raises
        :class:`TunnelTimeoutError` and aborts the connection). A send cut short between two
        messages (the caller's cancellation) aborts it too: part of ``item`` went out."""
        completed = False
        try:
            for start in range(0, len(item), _SEND_PIECE):  # nothing: an empty message is EOF
                await self._send(bytes(item[start : start + _SEND_PIECE]))
            completed = True
        finally:
            if not completed:
                await self._ws._abort()

    async def send_eof(self) -> None:
        await self._send(b"")

    async def _send(self, data: bytes) -> None:
        try:
            await self._ws.send(data)
        except ConnectionClosed as exc:
            raise anyio.BrokenResourceError(f"WebSocket closed ({exc.code})") from None

    async def aclose(self) -> None:
        await self._ws.close()


async def open_tcp_stream(
    transport: HTTPTransport, target: str, token: str | None, timeout: float
) -> TcpStream:
    """Dial tunneld, ask for the upgrade to raw TCP on ``target``; wait at most ``timeout`` for
    its answer (it comes once the agent connected to the port). ``timeout`` then bounds each
    piece of the stream's ``send()``."""
    stream = await transport.open_stream()
    try:
        buffered = await _upgrade(stream, transport, target, token, timeout)
        return TcpStream(stream, buffered, timeout=timeout)
    except BaseException:
        await anyio.aclose_forcefully(stream)
        raise


async def _upgrade(
    stream: anyio.abc.ByteStream,
    transport: HTTPTransport,
    target: str,
    token: str | None,
    timeout: float,
) -> bytes:
    conn = h11.Connection(h11.CLIENT)
    headers = [*transport.request_headers(token), ("Connection", "Upgrade"), ("Upgrade", "tcp")]
    status: int | None = None
    reason = ""
    body = bytearray()
    try:
        with anyio.fail_after(timeout):
            data = conn.send(h11.Request(method="GET", target=target, headers=headers))
            await stream.send(data + (conn.send(h11.EndOfMessage()) or b""))
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    try:
                        received = await stream.receive(_READ_SIZE)
                    except anyio.EndOfStream:
                        received = b""
                    conn.receive_data(received)
                elif isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                    return bytes(conn.trailing_data[0])
                elif isinstance(event, h11.Response):
                    status, reason = event.status_code, event.reason.decode("latin-1")
                elif isinstance(event, h11.Data):
                    body += event.data[: max(_MAX_ERROR_BODY - len(body), 0)]
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
                # other 1xx: the final answer follows
    except TimeoutError:
        raise TunnelTimeoutError(
            f"Timed out after {timeout:g}s waiting for tunneld to connect ({target})."
        ) from None
    except h11.RemoteProtocolError as exc:
        raise TunnelConnectionError(
            f"Invalid or truncated HTTP response from tunneld: {exc}", "BAD_RESPONSE"
        ) from exc
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
        raise TunnelConnectionError(
            f"Connection to tunneld broke while opening raw TCP: {exc or type(exc).__name__}"
        ) from exc
    if status is None:
        raise TunnelConnectionError("tunneld closed the connection without answering.")
    if status < 400:
        raise TunnelError(
            f"tunneld answered HTTP {status} {reason} instead of switching to raw TCP.",
            "BAD_RESPONSE",
            status,
        )
    raise error_from_response(status, reason, bytes(body))
