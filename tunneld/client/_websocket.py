"""WebSocket client connection: wsproto over an anyio byte stream, with no background task.

Theory of operation: there is no reader task (a task group could not outlive ``ws_connect()``),
so whoever needs input reads: ``receive()`` waiting for a message, ``ping()`` waiting for its
pong, ``close()`` waiting for the peer's close frame. One read at a time holds ``_read_lock``;
each read feeds wsproto and dispatches *all* resulting events (messages queue up, pings queue a
pong, pongs wake their ``ping()``, a close frame records the peer's code and queues the reply),
then flushes what the events produced. A task that waited for the lock while another read
returns without reading (``_generation`` moved), so it re-checks its condition first and never
blocks on the socket when its answer already arrived. Writes hold ``_send_lock``; a write cut
short (timeout, cancellation) leaves half a frame on the wire, so it aborts the connection.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Sequence
from types import TracebackType
from typing import Final

import anyio
import anyio.abc
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import ProtocolError as WSProtocolError

from ._errors import (
    ConnectionClosed,
    TunnelConnectionError,
    TunnelError,
    TunnelTimeoutError,
    error_from_response,
)

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "WebSocket"]

# Largest message receive() assembles (sum of its fragments). The websockets library defaults to
# 1 MiB; 16 MiB leaves room for file-sized messages while still bounding memory. Larger messages
# close the connection with 1009 (message too big), as RFC 6455 §7.4.1 prescribes.
DEFAULT_MAX_MESSAGE_SIZE: Final = 16 * 1024 * 1024
# A rejected handshake's body is an error document; keep at most this much of it.
_MAX_REJECT_BODY: Final = 64 * 1024
_READ_SIZE: Final = 64 * 1024
_ABNORMAL_CLOSURE: Final = 1006
_MESSAGE_TOO_BIG: Final = 1009
# Close codes after which iteration ends quietly (normal closure, going away, no status).
_NORMAL_CLOSE_CODES: Final = frozenset({1000, 1001, 1005})


class WebSocket:
    """A WebSocket to a port inside a sandbox, relayed end to end through tunneld.

    Made by :meth:`Sandbox.ws_connect` (``wsConnect``). ``receive()`` returns ``str`` for text
    and ``bytes`` for binary messages; pings from the peer are answered while something reads.

    Example::

        async with await sb.ws_connect(8000, path="/ws") as ws:
            await ws.send("hello")
            reply = await ws.receive()
            async for message in ws:   # until the peer closes normally
                print(message)

    After the closing handshake ``close_code`` and ``close_reason`` hold the peer's close frame.
    """

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        *,
        timeout: float,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self._stream = stream
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._timeout = timeout
        self._max_message_size = max_message_size
        self._messages: deque[str | bytes] = deque()
        self._parts: list[str | bytes | bytearray] = []
        self._parts_size = 0
        self._pings: dict[bytes, anyio.Event] = {}
        self._outgoing = bytearray()
        self._read_lock = anyio.Lock()
        self._send_lock = anyio.Lock()
        self._generation = 0
        self._receive_closed = False
        self._stream_closed = False
        self._local_close: tuple[int, str] | None = None
        #: The peer's close code (None while open; 1006 if the connection was lost).
        self.close_code: int | None = None
        #: The peer's close reason (None while open).
        self.close_reason: str | None = None
        #: The subprotocol the server selected, if any.
        self.subprotocol: str | None = None

    # -- handshake ---------------------------------------------------------------------------

    async def _handshake(
        self,
        *,
        host: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        subprotocols: Sequence[str],
    ) -> None:
        request = Request(
            host=host,
            target=target,
            extra_headers=[(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            subprotocols=list(subprotocols),
        )
        accepted = False
        reject_status: int | None = None
        reject_body = bytearray()
        reject_done = False
        try:
            with anyio.fail_after(self._timeout):
                await self._stream.send(self._ws.send(request))
                while not accepted and not reject_done:
                    try:
                        data = await self._stream.receive(_READ_SIZE)
                    except anyio.EndOfStream:
                        raise TunnelConnectionError(
                            "tunneld closed the connection during the WebSocket handshake."
                        ) from None
                    self._ws.receive_data(data)
                    for event in self._ws.events():
                        if accepted:
                            self._handle(event)
                        elif isinstance(event, AcceptConnection):
                            accepted = True
                            self.subprotocol = event.subprotocol
                        elif isinstance(event, RejectConnection):
                            reject_status = event.status_code
                            reject_done = not event.has_body
                        elif isinstance(event, RejectData):
                            room = _MAX_REJECT_BODY - len(reject_body)
                            reject_body += event.data[: max(room, 0)]
                            reject_done = event.body_finished
        except TunnelError:
            raise
        except TimeoutError:
            raise TunnelTimeoutError(
                f"Timed out after {self._timeout:g}s waiting for the WebSocket handshake."
            ) from None
        except WSProtocolError as exc:
            raise TunnelError(f"WebSocket handshake failed: {exc}", "HANDSHAKE_FAILED") from exc
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise TunnelConnectionError(
                f"Connection to tunneld broke during the WebSocket handshake: {exc}"
            ) from exc
        if not accepted:
            assert reject_status is not None
            raise error_from_response(reject_status, "", bytes(reject_body))
        await self._flush()

    # -- public API --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the connection is closed (handshake done, lost, or aborted)."""
        return self._stream_closed

    async def send(self, message: str | bytes | bytearray | memoryview) -> None:
        """Send one message: ``str`` as a text frame, bytes-like as a binary frame.

        Raises :class:`ConnectionClosed` once the connection is closing or closed, and
        :class:`TunnelTimeoutError` if the write stalls for ``timeout`` (the connection is then
        aborted)."""
        event: Event
        if isinstance(message, str):
            event = TextMessage(data=message)
        else:
            event = BytesMessage(data=bytes(message))
        async with self._send_lock:
            if self._ws.state is not ConnectionState.OPEN or self._stream_closed:
                raise self._closed_error()
            await self._write(self._ws.send(event))

    async def receive(self) -> str | bytes:
        """Wait for the next message; ``str`` for text, ``bytes`` for binary.

        Fragmented messages are assembled (up to ``max_message_size``). Raises
        :class:`ConnectionClosed` with the peer's code and reason once the connection closed.
        No timeout of its own: wrap it in ``anyio.fail_after()`` to bound the wait."""
        while True:
            if self._messages:
                return self._messages.popleft()
            if self._receive_closed:
                raise self._closed_error()
            await self._read_once()

    async def ping(self, payload: bytes | None = None) -> None:
        """Send a ping and wait for the matching pong, bounded by the client's ``timeout``.

        ``payload`` (at most 125 bytes) defaults to 4 random bytes. Messages that arrive while
        waiting are kept for ``receive()``."""
        if payload is None:
            payload = os.urandom(4)
            while payload in self._pings:  # pragma: no cover - 1 in 2**32
                payload = os.urandom(4)
        elif payload in self._pings:
            raise ValueError("A ping with this payload is already waiting for its pong.")
        payload = bytes(payload)
        waiter = anyio.Event()
        self._pings[payload] = waiter
        try:
            with anyio.fail_after(self._timeout):
                async with self._send_lock:
                    if self._ws.state is not ConnectionState.OPEN or self._stream_closed:
                        raise self._closed_error()
                    await self._write(self._ws.send(Ping(payload=payload)))
                while not waiter.is_set():
                    if self._receive_closed:
                        raise self._closed_error()
                    await self._read_once()
        except TimeoutError:
            raise TunnelTimeoutError(
                f"No pong within {self._timeout:g}s.", "PING_TIMEOUT"
            ) from None
        finally:
            if self._pings.get(payload) is waiter:
                del self._pings[payload]

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Run the closing handshake: send a close frame, wait (bounded by ``timeout``) for the
        peer's, then close the connection. Idempotent. Messages still unread are dropped.

        Afterwards ``close_code``/``close_reason`` hold the peer's answer (1006 if none came)."""
        if self._stream_closed:
            return
        try:
            with anyio.move_on_after(self._timeout):
                async with self._send_lock:
                    if self._ws.state is ConnectionState.OPEN:
                        self._local_close = (code, reason)
                        await self._write(self._ws.send(CloseConnection(code=code, reason=reason)))
                while self._ws.state is not ConnectionState.CLOSED and not self._stream_closed:
                    await self._read_once()
        finally:
            self._receive_closed = True
            self._messages.clear()
            if self.close_code is None:
                self.close_code, self.close_reason = _ABNORMAL_CLOSURE, ""
            await self._abort()

    aclose = close

    async def __aenter__(self) -> WebSocket:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __aiter__(self) -> WebSocket:
        return self

    async def __anext__(self) -> str | bytes:
        try:
            return await self.receive()
        except ConnectionClosed as exc:
            if exc.code in _NORMAL_CLOSE_CODES:
                raise StopAsyncIteration from None
            raise

    # -- internals ---------------------------------------------------------------------------

    def _closed_error(self) -> ConnectionClosed:
        if self.close_code is not None:
            return ConnectionClosed(self.close_code, self.close_reason or "")
        if self._local_close is not None:
            return ConnectionClosed(*self._local_close)
        return ConnectionClosed(_ABNORMAL_CLOSURE, "")

    async def _read_once(self) -> None:
        generation = self._generation
        async with self._read_lock:
            if generation != self._generation:
                return  # someone else read meanwhile: let the caller re-check its condition
            data: bytes | None
            try:
                data = await self._stream.receive(_READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                data = None
            except OSError:
                data = None
            self._generation += 1
            if data is None or self._ws.state is ConnectionState.CLOSED:
                self._on_connection_lost()
            else:
                self._ws.receive_data(data)
                for event in self._ws.events():
                    self._handle(event)
        await self._flush()
        if data is None or self._ws.state is ConnectionState.CLOSED:
            # Closing handshake complete (or connection lost): the client may close TCP now.
            await self._abort()

    def _on_connection_lost(self) -> None:
        self._receive_closed = True
        if self.close_code is None:
            self.close_code, self.close_reason = _ABNORMAL_CLOSURE, ""

    def _handle(self, event: Event) -> None:
        if isinstance(event, TextMessage | BytesMessage):
            if self._receive_closed:
                return
            self._parts.append(event.data)
            self._parts_size += len(event.data)
            if self._parts_size > self._max_message_size:
                self._parts.clear()
                self._fail(_MESSAGE_TOO_BIG, "message too big")
                return
            if event.message_finished:
                if isinstance(event, TextMessage):
                    message: str | bytes = "".join(p for p in self._parts if isinstance(p, str))
                else:
                    message = b"".join(p for p in self._parts if not isinstance(p, str))
                self._parts.clear()
                self._parts_size = 0
                self._messages.append(message)
        elif isinstance(event, Ping):
            if self._ws.state is ConnectionState.OPEN:
                self._outgoing += self._ws.send(event.response())
        elif isinstance(event, Pong):
            if event.payload in self._pings:
                # A pong acknowledges every ping sent before the one it answers (RFC 6455 §5.5.3
                # lets a peer answer only the latest).
                for payload in list(self._pings):
                    self._pings.pop(payload).set()
                    if payload == event.payload:
                        break
        elif isinstance(event, CloseConnection):
            if self.close_code is None:
                self.close_code, self.close_reason = event.code, event.reason or ""
            self._receive_closed = True
            if self._ws.state is ConnectionState.REMOTE_CLOSING:
                self._outgoing += self._ws.send(event.response())
            elif self._ws.state is ConnectionState.OPEN:
                # wsproto reports a malformed frame as a CloseConnection without changing state:
                # send that close (1002/1007/...) ourselves.
                self._outgoing += self._ws.send(CloseConnection(event.code, event.reason))

    def _fail(self, code: int, reason: str) -> None:
        self._receive_closed = True
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        if self._ws.state is ConnectionState.OPEN:
            self._local_close = (code, reason)
            self._outgoing += self._ws.send(CloseConnection(code=code, reason=reason))

    async def _flush(self) -> None:
        if not self._outgoing or self._stream_closed:
            return
        async with self._send_lock:
            data = bytes(self._outgoing)
            self._outgoing.clear()
            if data:
                try:
                    await self._write(data)
                except ConnectionClosed:
                    pass  # the reader learns about it on its next read
                except TunnelTimeoutError:
                    pass

    async def _write(self, data: bytes) -> None:
        """Write under ``_send_lock``; any failure or interruption aborts the connection."""
        completed = False
        try:
            with anyio.fail_after(self._timeout):
                await self._stream.send(data)
            completed = True
        except TimeoutError:
            raise TunnelTimeoutError(
                f"Write to the WebSocket stalled for {self._timeout:g}s; connection aborted."
            ) from None
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self._on_connection_lost()
            raise self._closed_error() from None
        finally:
            if not completed:
                self._on_connection_lost()
                await self._abort()

    async def _abort(self) -> None:
        self._stream_closed = True
        self._receive_closed = True
        await anyio.aclose_forcefully(self._stream)
