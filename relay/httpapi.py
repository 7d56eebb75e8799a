"""A small HTTP/1.1 JSON API server on asyncio streams and h11, shared by the edge's admin API
(tunneld/admin.py) and the agent's local control API (agent/local_api.py).

Theory of operation
-------------------
One task per client connection drives one ``h11.Connection``:

1. Past ``Limits.max_connections`` concurrent connections, or past
   ``Limits.max_connections_per_ip`` from the client's IP address, a new one gets 503
   ``TOO_MANY_CONNECTIONS`` at once and is closed (after a lingering drain, see 4). The warning
   saying so is rate-limited (:class:`relay.budget.RateLimitedLog`): anyone who can connect can
   cause one per connection.
2. Read one whole request. An idle keep-alive connection waits at most ``idle_timeout`` for the
   first byte of its next request and is then closed without a word; from that first byte, the
   head and the body together must arrive within ``request_timeout`` (a client dripping one byte a
   second cannot hold the connection). The head is bounded while still incomplete (h11's
   ``max_incomplete_event_size``) *and* when it arrives complete in one read (we never read past
   ``max_head_bytes`` while waiting for a head). A declared ``Content-Length`` over
   ``max_body_bytes`` is refused before the body is read (so before ``100 Continue`` is sent);
   a chunked body is counted as it arrives. ``Expect: 100-continue`` is answered when the body is
   first needed.
3. Hand the request to the route handler (each server keeps its own routes). The handler returns a
   :class:`Response`, raises :class:`ApiError` (rendered ``{"error": message, "code": code}``), or
   takes the connection over (:meth:`Exchange.detach`, the admin API's WebSocket connect). Any other
   exception is logged with its traceback and answered 500 ``INTERNAL_ERROR``: a traceback never
   reaches a client. Then the next keep-alive cycle starts. A long handler (the admin API's wait
   for a port) runs its work through :meth:`Exchange.unless_client_leaves`: the connection is read
   meanwhile, and the client closing it (EOF, as Go's ``net/http`` takes it, or an error) cancels
   the work and ends the connection without an answer; bytes of a pipelined next request read
   meanwhile are kept for it (at most ``max_head_bytes``; past that the connection is no longer
   watched).
4. A request that cannot be read (malformed, too large, too slow) is answered with a JSON error and
   ``Connection: close``; then we shut our side down and keep reading and discarding for up to
   ``linger_seconds`` / ``linger_max_bytes`` before closing ("lingering close", as Apache and nginx
   do): closing a socket with unread input sends a reset, which can destroy the answer before the
   client reads it.

Not a hot path: requests are rare and tiny, so clarity wins over speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl as ssl_module
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final, TypeVar

import h11
import orjson

from .budget import RateLimitedLog

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_HEAD_BYTES",
    "ApiError",
    "ApiServer",
    "ClientGone",
    "Exchange",
    "Handler",
    "Limits",
    "Request",
    "Response",
    "error_response",
    "json_response",
    "shown",
]

log = logging.getLogger(__name__)

# Request head limit: h11's default, a little above nginx's 8 KiB large_client_header_buffers and
# node's 16 KiB --max-http-header-size. API requests carry a handful of short headers.
MAX_HEAD_BYTES: Final = 16 * 1024
# The biggest legitimate body is one small JSON object; 64 KiB leaves room for sloppy clients.
MAX_BODY_BYTES: Final = 64 * 1024
_READ_CHUNK: Final = 16 * 1024
# Longest rendering of client input (a method, a path) in a log line or an error message.
_MAX_SHOWN: Final = 64
_STATUSES: Final = frozenset(s.value for s in HTTPStatus)
# Statuses that never carry a body, so no Content-Type or Content-Length either.
_NO_BODY: Final = frozenset({204, 304})
_T = TypeVar("_T")


class ApiError(Exception):
    """A refused or failed request: ``status``, a stable ``code`` (UPPER_SNAKE) and a human
    ``message``, answered as ``{"error": message, "code": code}`` plus ``headers``."""

    def __init__(
        self, status: int, code: str, message: str, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = tuple(headers)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.code!r}, {self.message!r})"


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-server bounds. Every read is bounded in size and time."""

    max_head_bytes: int = MAX_HEAD_BYTES
    max_body_bytes: int = MAX_BODY_BYTES
    # Wait for the first byte of a request (a new or a kept-alive connection), then close quietly.
    idle_timeout: float = 10.0
    # From a request's first byte to its last (head and body), then 408; also bounds each write.
    request_timeout: float = 10.0
    # Concurrent connections being served; a connection taken over by a handler no longer counts.
    max_connections: int = 64
    # The same, per client IP address (None: no limit of its own), so one client cannot hold them
    # all and lock the others out.
    max_connections_per_ip: int | None = None
    # Lingering close after an error answer: read and discard this long, this much at most.
    linger_seconds: float = 1.0
    linger_max_bytes: int = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str  # as sent, percent-encoded, with the query
    path: str  # the target before "?"
    query: str  # the target after "?"
    headers: Sequence[tuple[bytes, bytes]]  # names lowercased (h11)
    raw_headers: Sequence[tuple[bytes, bytes]]  # names as sent, to relay a request
    body: bytes
    peer: tuple[str, int] | None
    # A WebSocket upgrade handed over after its head (servers created with accept_upgrades=True):
    # the body was not read, so the connection closes after a normal answer.
    upgrade: bool = False

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lowercase), or None."""
        return next((v for n, v in self.headers if n == name), None)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    headers: Sequence[tuple[str, str]] = ()
    content_type: str = "application/json"


def json_response(status: int, obj: object, headers: Sequence[tuple[str, str]] = ()) -> Response:
    return Response(status, orjson.dumps(obj), tuple(headers))


def error_response(exc: ApiError) -> Response:
    return json_response(exc.status, {"error": exc.message, "code": exc.code}, exc.headers)


def shown(text: str) -> str:
    """Client input shortened for a log line or an error message."""
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."


class Exchange:
    """One request's view of its connection, for a handler that takes the connection over."""

    __slots__ = ("_conn", "_reader", "detached", "writer")

    def __init__(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._conn = conn
        self._reader = reader
        self.writer = writer
        self.detached = False

    def detach(self) -> bytes:
        """Stop serving HTTP on this connection: the caller now owns ``writer`` and its transport
        (the server will neither write to nor close it; the caller sets its own protocol and
        resumes reading). Returns the bytes the client sent after the request head, which the
        caller must process first. The handler then returns ``None``."""
        self.detached = True
        leftover = bytes(self._conn.trailing_data[0])
        # Bytes the StreamReader received but we did not read yet: no public API reads them
        # without waiting, and they must not be lost with the reader.
        buffered: bytearray = getattr(self._reader, "_buffer", bytearray())
        leftover += bytes(buffered)
        buffered.clear()
        return leftover

    async def unless_client_leaves(
        self, work: Awaitable[_T], max_pipelined: int = MAX_HEAD_BYTES
    ) -> _T:
        """Await ``work`` while reading the connection; if the client closes it first, cancel
        ``work`` (awaiting its end, so its cleanup ran) and raise :class:`ClientGone`. Bytes the
        client sends meanwhile (a pipelined request) go to h11 for the next cycle."""
        task = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(self._client_left(max_pipelined))
        try:
            await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            task.cancel()
            await asyncio.wait((task,))  # its cleanup (the agent told to stop) runs first
            raise ClientGone
        finally:
            for t in (task, watch):
                if not t.done():
                    t.cancel()
            await asyncio.gather(task, watch, return_exceptions=True)

    async def _client_left(self, max_pipelined: int) -> None:
        """Return once the client's side of the connection is closed; never if it sends more
        than ``max_pipelined`` bytes first (those are not read: the next cycle reads them)."""
        try:
            while len(self._conn.trailing_data[0]) < max_pipelined:
                data = await self._reader.read(_READ_CHUNK)
                if not data:
                    return
                self._conn.receive_data(data)
        except ConnectionError:
            return
        await asyncio.get_running_loop().create_future()  # watched no more; cancelled at the end


Handler = Callable[[Request, Exchange], Awaitable[Response | None]]


class ClientGone(Exception):
    """The client closed its connection while its request was being served: nobody to answer."""


_ClientGone = ClientGone


class _Idle(Exception):
    pass


class ApiServer:
    """``ApiServer(handler, name=...)``; ``await start(host, port)``; ``await close()``.

    ``limits`` may be replaced at any time; it applies to new connections and requests.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        name: str,
        limits: Limits | None = None,
        accept_upgrades: bool = False,
        internal_error: str = "Internal error.",
        logger: logging.Logger | None = None,
    ) -> None:
        self.limits = limits if limits is not None else Limits()
        self._log = logger if logger is not None else log
        self._handler = handler
        self._name = name
        self._accept_upgrades = accept_upgrades
        self._internal_error = internal_error
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._per_ip: dict[str, int] = {}  # connections being served, by client IP
        self._refusals = RateLimitedLog(self._log, f"warnings about refused {name} connections")

    @property
    def server(self) -> asyncio.Server | None:
        return self._server

    @property
    def connections(self) -> int:
        """Connections being served now (taken-over ones not included)."""
        return len(self._connections)

    async def start(
        self,
        host: str,
        port: int,
        *,
        reuse_port: bool = False,
        ssl: ssl_module.SSLContext | None = None,
    ) -> asyncio.Server:
        self._server = await asyncio.start_server(
            self._on_connection, host, port, reuse_port=reuse_port, ssl=ssl
        )
        return self._server

    async def close(self) -> None:
        """Stop listening and drop every connection being served (idle keep-alives included).
        Connections taken over by a handler are the handler's to close, so this does not wait
        for them: no ``server.wait_closed()``, which waits for every connection from 3.12 on
        (the agent's close would hang on its own open port watches). Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        # Each served connection's task closes its socket and waits for that before it ends.
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- connections -------------------------------------------------------------------------

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        limits = self.limits
        peer = writer.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        count = self._per_ip.get(ip, 0)
        per_ip = limits.max_connections_per_ip
        if len(self._connections) >= limits.max_connections or (
            per_ip is not None and count >= per_ip
        ):
            now = asyncio.get_running_loop().time()
            if len(self._connections) >= limits.max_connections:
                self._refusals.log(
                    now,
                    "%s: refused a connection, %d already open",
                    self._name,
                    len(self._connections),
                )
                message = (
                    f"Too many connections to the {self._name}: "
                    f"the limit is {limits.max_connections}."
                )
            else:
                self._refusals.log(
                    now,
                    "%s: refused a connection from %s, %d already open from it",
                    self._name,
                    ip,
                    count,
                )
                message = (
                    f"Too many connections to the {self._name} from {ip}: the limit is {per_ip} "
                    "per client address."
                )
            err = ApiError(503, "TOO_MANY_CONNECTIONS", message)
            with contextlib.suppress(Exception):
                await self._fail(h11.Connection(h11.SERVER), reader, writer, err, limits)
            await _close(writer, limits.request_timeout)
            return
        self._connections.add(task)
        self._per_ip[ip] = count + 1
        exchange: Exchange | None = None
        try:
            exchange = await self._serve(reader, writer, limits)
        except (ConnectionError, TimeoutError, _ClientGone):
            pass
        except asyncio.CancelledError:
            # close() cancels us. End normally: asyncio's stream callback calls task.exception(),
            # which raises (and logs an error) for a cancelled task.
            pass
        except Exception:
            self._log.exception("%s: connection failed", self._name)
        finally:
            self._connections.discard(task)
            left = self._per_ip.pop(ip) - 1
            if left:
                self._per_ip[ip] = left
            if exchange is None or not exchange.detached:
                await _close(writer, limits.request_timeout)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limits: Limits
    ) -> Exchange | None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head_bytes)
        while True:
            limits = self.limits
            try:
                request = await self._receive(conn, reader, writer, limits)
            except _Idle:
                return None
            except ApiError as err:
                await self._fail(conn, reader, writer, err, limits)
                return None
            exchange = Exchange(conn, reader, writer)
            response = await self._dispatch(request, exchange)
            if exchange.detached:
                return exchange
            if response is None:
                response = self._internal(request, "returned no response")
            writer.write(
                _serialize(conn, response, head=request.method == "HEAD", close=request.upgrade)
            )
            async with asyncio.timeout(limits.request_timeout):
                await writer.drain()
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return None  # Connection: close, HTTP/1.0, an upgrade answered normally
            conn.start_next_cycle()

    async def _receive(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        limits: Limits,
    ) -> Request:
        loop = asyncio.get_running_loop()
        # Set at the request's first byte (at once for pipelined bytes already received).
        deadline = loop.time() + limits.request_timeout if conn.trailing_data[0] else None
        head: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _framing_error(exc, limits) from None
            if event is h11.NEED_DATA:
                size = _READ_CHUNK
                if conn.their_state is h11.IDLE:
                    # h11 only bounds an *incomplete* head; read no further than the limit so a
                    # complete one cannot slip past it either.
                    size = min(size, limits.max_head_bytes - len(conn.trailing_data[0]))
                    if size <= 0:
                        raise _head_too_large(limits)
                if conn.they_are_waiting_for_100_continue:
                    writer.write(
                        conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                    )
                if deadline is None:
                    try:
                        async with asyncio.timeout(limits.idle_timeout):
                            data = await reader.read(size)
                    except TimeoutError:
                        raise _Idle from None
                    deadline = loop.time() + limits.request_timeout
                else:
                    try:
                        async with asyncio.timeout_at(deadline):
                            data = await reader.read(size)
                    except TimeoutError:
                        raise ApiError(
                            408, "REQUEST_TIMEOUT", "The request did not arrive in time."
                        ) from None
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                head = event
                length = next((v for n, v in event.headers if n == b"content-length"), None)
                if length is not None and int(length) > limits.max_body_bytes:
                    raise _body_too_large(limits)
                if self._accept_upgrades and _is_websocket_upgrade(event):
                    return _request(event, b"", writer, upgrade=True)
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > limits.max_body_bytes:
                    raise _body_too_large(limits)
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return _request(head, bytes(body), writer)
            else:  # ConnectionClosed before a new request: the client is done with us
                raise _ClientGone

    async def _dispatch(self, request: Request, exchange: Exchange) -> Response | None:
        try:
            return await self._handler(request, exchange)
        except ApiError as exc:
            return error_response(exc)
        except ClientGone:
            raise  # nobody to answer: the connection ends (_on_connection)
        except Exception:
            return self._internal(request, "failed")

    def _internal(self, request: Request, what: str) -> Response:
        self._log.error(
            "%s: %s %s %s",
            self._name,
            shown(request.method),
            shown(request.path),
            what,
            exc_info=True,
        )
        return error_response(ApiError(500, "INTERNAL_ERROR", self._internal_error))

    async def _fail(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        err: ApiError,
        limits: Limits,
    ) -> None:
        """Answer a request we cannot read, then shut down our side and linger (see above)."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        writer.write(_serialize(conn, error_response(err), close=True))
        async with asyncio.timeout(limits.request_timeout):
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        drained = 0
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(limits.linger_seconds):
                while drained < limits.linger_max_bytes:
                    chunk = await reader.read(_READ_CHUNK)
                    if not chunk:
                        break
                    drained += len(chunk)


def _framing_error(exc: h11.RemoteProtocolError, limits: Limits) -> ApiError:
    if exc.error_status_hint == 431:
        return _head_too_large(limits)
    return ApiError(400, "BAD_REQUEST", f"Malformed request: {exc}.")


def _head_too_large(limits: Limits) -> ApiError:
    return ApiError(
        431, "HEADERS_TOO_LARGE", f"Request head larger than {limits.max_head_bytes} bytes."
    )


def _body_too_large(limits: Limits) -> ApiError:
    return ApiError(
        413, "BODY_TOO_LARGE", f"Request body larger than {limits.max_body_bytes} bytes."
    )


def _is_websocket_upgrade(request: h11.Request) -> bool:
    return any(n == b"upgrade" and v.lower() == b"websocket" for n, v in request.headers)


def _address(value: object) -> tuple[str, int] | None:
    if isinstance(value, tuple) and len(value) >= 2:
        return (str(value[0]), int(value[1]))
    return None


def _request(
    head: h11.Request, body: bytes, writer: asyncio.StreamWriter, *, upgrade: bool = False
) -> Request:
    target = head.target.decode("latin-1")
    path, _, query = target.partition("?")
    return Request(
        method=head.method.decode("latin-1"),
        target=target,
        path=path,
        query=query,
        headers=tuple((bytes(n), bytes(v)) for n, v in head.headers),
        raw_headers=tuple((bytes(n), bytes(v)) for n, v in head.headers.raw_items()),
        body=body,
        peer=_address(writer.get_extra_info("peername")),
        upgrade=upgrade,
    )


def _serialize(
    conn: h11.Connection, response: Response, *, head: bool = False, close: bool = False
) -> bytes:
    headers: list[tuple[str, str]] = []
    body = response.body
    if response.status not in _NO_BODY:
        headers.append(("content-type", response.content_type))
        headers.append(("content-length", str(len(body))))
    headers.append(("cache-control", "no-store"))
    headers.extend(response.headers)
    if close:
        headers.append(("connection", "close"))
    if head or response.status in _NO_BODY:
        body = b""
    status = response.status
    reason = HTTPStatus(status).phrase.encode() if status in _STATUSES else b""
    out = bytearray(
        conn.send(h11.Response(status_code=status, headers=headers, reason=reason)) or b""
    )
    if body:
        out += conn.send(h11.Data(data=body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    return bytes(out)


async def _close(writer: asyncio.StreamWriter, timeout: float) -> None:
    """Close after what is written; a client that takes none of it within ``timeout`` (it
    pipelined requests and reads no answer) is dropped, or the socket, its buffer and this task
    would wait for it for ever."""
    writer.close()
    try:
        async with asyncio.timeout(timeout):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except Exception:
        pass
