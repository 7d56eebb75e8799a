"""The agent's local control API: HTTP/1.1 on 127.0.0.1:3000, for processes inside the sandbox.

Theory of operation
-------------------
One asyncio task per client connection drives an ``h11.Connection``: read one whole request
(head <= 16 KiB, body <= 64 KiB, all of it within 10 s), refuse it if a browser sent it, route it
through the ``LocalAPI._routes`` table, send one JSON response, then start the next keep-alive
cycle. Any framing trouble (malformed head, head or body too large, too slow) gets a small JSON
error with ``Connection: close`` and ends the connection. This is not a hot path: requests are
rare and tiny, so clarity wins over speed.

Two API families share the routing table:

* native ``/v1/...``: errors are ``{"error": <sentence>, "code": <CODE>}`` with the status from
  :mod:`agent.errors`;
* Cloudflare's legacy container endpoints ``/api/...`` (sandbox-sdk <= 0.10.3), so existing tooling
  keeps working: success bodies carry ``"success": true`` and a ``timestamp``, errors use the legacy
  ``{code, message, context, httpStatus, timestamp}`` shape. Unlike the legacy container, expose is
  idempotent and unexposing an unknown port succeeds (as Cloudflare >= 0.8.13 does).

The controller (the agent core) does the work; this module only validates input, translates, and
never lets a traceback reach a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Final, Protocol

import h11
import orjson

from agent.errors import AgentError, api_port_error, status_for
from protocol.control import Exposure
from protocol.hostnames import ValidationError, validate_custom_token, validate_port

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "MAX_BODY_BYTES",
    "MAX_CONNECTIONS",
    "MAX_HEAD_BYTES",
    "MAX_NAME_LENGTH",
    "REQUEST_TIMEOUT",
    "ExposureController",
    "LocalAPI",
    "start_local_api",
]

log = logging.getLogger(__name__)

# Loopback only: anything that can reach this API can publish sandbox ports to the internet.
DEFAULT_HOST: Final = "127.0.0.1"
# Cloudflare's sandbox control-plane port; protocol.hostnames refuses to expose it for that reason.
DEFAULT_PORT: Final = 3000
# Request head limit: h11's default, a little above nginx's 8 KiB large_client_header_buffers and
# node's 16 KiB --max-http-header-size. Our requests carry a handful of short headers.
MAX_HEAD_BYTES: Final = 16 * 1024
# The biggest legitimate body is one small JSON object; 64 KiB leaves room for sloppy clients.
MAX_BODY_BYTES: Final = 64 * 1024
# Seconds to receive one whole request, and how long an idle keep-alive connection is kept.
REQUEST_TIMEOUT: Final = 10.0
# Clients are a few local tools; more concurrent connections than this is a leak or an attack.
MAX_CONNECTIONS: Final = 64
# Same limit as the control protocol's exposure name, so whatever we accept the edge accepts.
MAX_NAME_LENGTH: Final = 256
_READ_CHUNK: Final = 16 * 1024
# After an early error response (413, 408) keep reading and discarding for a moment before the
# close, so the client gets to read our answer instead of a connection reset ("lingering close").
_LINGER_SECONDS: Final = 1.0
_LINGER_MAX_BYTES: Final = 1024 * 1024
# Longest rendering of client input (a path, a port) echoed in an error message.
_MAX_SHOWN: Final = 64
_JSON_HEADERS: Final = (("content-type", "application/json"), ("cache-control", "no-store"))


class ExposureController(Protocol):
    """What the local API needs from the agent core. Methods raise :class:`AgentError`."""

    @property
    def connected(self) -> bool: ...

    @property
    def sandbox_id(self) -> str: ...

    async def expose(
        self, port: int, name: str | None = None, token: str | None = None
    ) -> Exposure: ...

    async def unexpose(self, port: int) -> None: ...

    async def list_exposures(self) -> list[Exposure]: ...


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    path: str
    query: str
    body: bytes
    host: str  # the Host header's name part, lowercased ("" if absent)
    from_browser: bool  # an Origin header was sent
    forwarded: bool  # a proxy header was sent (X-Forwarded-*, Forwarded): it came through a proxy
    peer: tuple[str, int] | None  # the client's address and port


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    body: bytes = b""
    headers: Sequence[tuple[str, str]] = ()


class _HTTPError(Exception):
    """A refused request; rendered in the native or the legacy error shape by the dispatcher."""

    def __init__(
        self, code: str, message: str, status: int | None = None, context: Any = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status_for(code) if status is None else status
        self.context = context


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


_Handler = Callable[[_Request, "re.Match[str]"], Awaitable[_Response]]
# ``is_tunnel_peer(("127.0.0.1", 51234))``: is that address one of the agent's own dialled sockets?
TunnelPeerCheck = Callable[[tuple[str, int]], bool]


def _is_proxy_header(name: bytes) -> bool:
    # "_" too: WSGI/CGI-style stacks read X_Forwarded_For as X-Forwarded-For.
    name = name.replace(b"_", b"-")
    return name == b"forwarded" or name.startswith(b"x-forwarded-")


def _address(value: object) -> tuple[str, int] | None:
    if isinstance(value, tuple) and len(value) >= 2:
        return (str(value[0]), int(value[1]))
    return None


def _shown(value: str) -> str:
    return value if len(value) <= _MAX_SHOWN else value[:_MAX_SHOWN] + "..."


def _host_name(value: str) -> str:
    """``"[::1]:3000"`` -> ``"::1"``, ``"LocalHost:3000"`` -> ``"localhost"``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.partition(":")[0]


def _timestamp() -> str:
    """Now in JavaScript's ``Date.toISOString()`` form, as the legacy container sent it."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json(status: int, obj: object, headers: Sequence[tuple[str, str]] = ()) -> _Response:
    return _Response(status, orjson.dumps(obj), tuple(headers))


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _HTTPError("INVALID_JSON", "Request body is not valid JSON.") from None
    if not isinstance(obj, dict):
        raise _HTTPError("INVALID_REQUEST", "Request body must be a JSON object.")
    return obj


def _body_port(obj: Mapping[str, Any]) -> int:
    if "port" not in obj:
        raise _HTTPError("INVALID_PORT", "Missing required field: port.")
    return validate_port(obj["port"])


def _path_value(text: str) -> int | str:
    # "8000" -> 8000; anything else stays a string, so validate_port's message shows it as sent.
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 6 else text


def _path_port(text: str) -> int:
    return validate_port(_path_value(text))


def _optional_name(obj: Mapping[str, Any]) -> str | None:
    name = obj.get("name")
    if name is None:
        return None
    if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH:
        raise _HTTPError(
            "INVALID_NAME", f"Name must be a string of at most {MAX_NAME_LENGTH} characters."
        )
    return name


def _optional_token(obj: Mapping[str, Any]) -> str | None:
    token = obj.get("token")
    return None if token is None else validate_custom_token(token)


def _port_context(value: object) -> dict[str, Any]:
    if isinstance(value, str):
        value = _shown(value)
    elif not isinstance(value, int | float | bool) or (isinstance(value, int) and value > 2**53):
        value = None
    return {"port": value}


@contextlib.contextmanager
def _legacy_port_context(port: object) -> Iterator[None]:
    """Attach ``{"port": ...}`` to any refusal, as the legacy container's error context did."""
    try:
        yield
    except _HTTPError as exc:
        exc.context = _port_context(port)
        raise
    except (AgentError, ValidationError) as exc:
        raise _HTTPError(exc.code, exc.message, exc.status, _port_context(port)) from exc


def _exposure_json(exposure: Exposure) -> dict[str, Any]:
    return {"port": exposure.port, "exposedAt": exposure.url, "name": exposure.name}


# The legacy container answered with its own codes for the same conditions.
_LEGACY_CODES: Final[Mapping[str, str]] = {"INVALID_PORT": "INVALID_PORT_NUMBER"}


def _error_response(
    exc: _HTTPError, legacy: bool, headers: Sequence[tuple[str, str]] = ()
) -> _Response:
    if legacy:
        body: dict[str, Any] = {
            "code": _LEGACY_CODES.get(exc.code, exc.code),
            "message": exc.message,
            "context": exc.context if exc.context is not None else {},
            "httpStatus": exc.status,
            "timestamp": _timestamp(),
        }
    else:
        body = {"error": exc.message, "code": exc.code}
    return _json(exc.status, body, headers)


class LocalAPI:
    """The local control API server. ``await start()``, read ``.port``, ``await close()``.

    Also an async context manager. ``port=0`` picks a free port (tests).
    """

    def __init__(
        self,
        controller: ExposureController,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        request_timeout: float = REQUEST_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        is_tunnel_peer: TunnelPeerCheck | None = None,
    ) -> None:
        self._controller = controller
        self._is_tunnel_peer = is_tunnel_peer
        self._host = host
        self._requested_port = port
        # Host names a legitimate client may send; a wildcard bind cannot know its own names.
        self._allowed_hosts = frozenset({"localhost", "127.0.0.1", "::1", host.lower()})
        self._check_host = host not in ("", "0.0.0.0", "::")
        self._request_timeout = request_timeout
        self._max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        # path pattern -> {method: handler}; legacy routes render errors in the legacy shape.
        self._routes: tuple[tuple[re.Pattern[str], Mapping[str, _Handler], bool], ...] = (
            (re.compile(r"/v1/ports"), {"GET": self._list, "POST": self._expose}, False),
            (re.compile(r"/v1/ports/([^/]+)"), {"DELETE": self._unexpose}, False),
            (re.compile(r"/v1/status"), {"GET": self._status}, False),
            (re.compile(r"/api/expose-port"), {"POST": self._legacy_expose}, True),
            (re.compile(r"/api/exposed-ports"), {"GET": self._legacy_list}, True),
            (re.compile(r"/api/exposed-ports/([^/]+)"), {"DELETE": self._legacy_unexpose}, True),
        )

    @property
    def port(self) -> int:
        """The bound port (the real one when started with ``port=0``)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the local API is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def host(self) -> str:
        return self._host

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._on_connection, self._host, self._requested_port, limit=_READ_CHUNK
        )
        log.info("local control API listening on http://%s:%d", self._host, self.port)

    async def close(self) -> None:
        """Stop listening and drop every connection (idle keep-alives included)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    async def __aenter__(self) -> LocalAPI:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- connections -------------------------------------------------------------------------

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self._max_connections:
            conn = h11.Connection(h11.SERVER)
            err = _HTTPError("TOO_MANY_CONNECTIONS", "Too many connections to the local API.")
            with contextlib.suppress(Exception):
                writer.write(self._serialize(conn, _error_response(err, False), close=True))
                await writer.drain()
            await self._close_writer(writer)
            return
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, _ClientGone):
            pass
        except asyncio.CancelledError:
            # close() cancels us. End normally: asyncio's stream callback calls task.exception(),
            # which raises (and logs an error) for a cancelled task.
            pass
        except Exception:
            log.exception("local API connection failed")
        finally:
            self._connections.discard(task)
            await self._close_writer(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        while True:
            try:
                async with asyncio.timeout(self._request_timeout):
                    request = await self._receive_request(conn, reader, writer)
            except TimeoutError:
                if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
                    return  # an idle keep-alive connection: just close it
                err = _HTTPError("REQUEST_TIMEOUT", "Request not received in time.")
                await self._fail(conn, reader, writer, err)
                return
            except h11.RemoteProtocolError as exc:
                if exc.error_status_hint == 431:
                    err = _HTTPError("HEADERS_TOO_LARGE", "Request head is too large.")
                else:
                    err = _HTTPError("INVALID_REQUEST", f"Malformed HTTP request: {exc}.", 400)
                await self._fail(conn, reader, writer, err)
                return
            except _BodyTooLarge:
                err = _HTTPError(
                    "PAYLOAD_TOO_LARGE", f"Request body exceeds {MAX_BODY_BYTES} bytes."
                )
                await self._fail(conn, reader, writer, err)
                return

            response = await self._dispatch(request)
            writer.write(self._serialize(conn, response, head=request.method == "HEAD"))
            await writer.drain()
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # Connection: close, HTTP/1.0, ...
            conn.start_next_cycle()

    async def _receive_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> _Request:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                size = _READ_CHUNK
                if conn.their_state is h11.IDLE:
                    # h11 only bounds an *incomplete* head; read no further than the limit so a
                    # complete one cannot slip past it either.
                    size = min(size, MAX_HEAD_BYTES - len(conn.trailing_data[0]))
                    if size <= 0:
                        raise h11.RemoteProtocolError("Request head too large", 431)
                if conn.they_are_waiting_for_100_continue:
                    writer.write(
                        conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                    )
                conn.receive_data(await reader.read(size))
            elif isinstance(event, h11.Request):
                head = event
                for name, value in event.headers:
                    if name == b"content-length" and int(value) > MAX_BODY_BYTES:
                        raise _BodyTooLarge
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY_BYTES:
                    raise _BodyTooLarge
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                target = head.target.decode("ascii", "replace")
                path, _, query = target.partition("?")
                host, from_browser, forwarded = "", False, False
                for name, value in head.headers:
                    if name == b"host":
                        host = _host_name(value.decode("ascii", "replace"))
                    elif name == b"origin":
                        from_browser = True
                    elif _is_proxy_header(name):
                        forwarded = True
                method = head.method.decode("ascii", "replace")
                peer = _address(writer.get_extra_info("peername"))
                return _Request(
                    method, path, query, bytes(body), host, from_browser, forwarded, peer
                )
            else:  # ConnectionClosed before a new request: the client is done with us
                raise _ClientGone

    @staticmethod
    def _serialize(
        conn: h11.Connection, response: _Response, *, head: bool = False, close: bool = False
    ) -> bytes:
        headers: list[tuple[str, str]] = []
        body = response.body
        if response.status != 204:
            headers.extend(_JSON_HEADERS)
            headers.append(("content-length", str(len(body))))
        headers.extend(response.headers)
        if close:
            headers.append(("connection", "close"))
        if head:
            body = b""
        reason = HTTPStatus(response.status).phrase.encode()
        out = bytearray(
            conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
            or b""
        )
        if body:
            out += conn.send(h11.Data(data=body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        return bytes(out)

    async def _fail(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        err: _HTTPError,
    ) -> None:
        """Answer a request we cannot read, then close after a short lingering drain."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        writer.write(self._serialize(conn, _error_response(err, False), close=True))
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        drained = 0
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(_LINGER_SECONDS):
                while drained < _LINGER_MAX_BYTES:
                    chunk = await reader.read(_READ_CHUNK)
                    if not chunk:
                        break
                    drained += len(chunk)

    @staticmethod
    async def _close_writer(writer: asyncio.StreamWriter) -> None:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    # -- routing ----------------------------------------------------------------------------

    def _refusal(self, request: _Request) -> _HTTPError | None:
        """Refuse web pages. A page in a browser on this machine can send a "simple" cross-origin
        POST here without any preflight, and a DNS-rebinding page can even read the answers;
        either would let any website publish sandbox ports. Browsers always send ``Origin`` on
        such requests (our clients never do) and a rebinding page's ``Host`` is its own name.

        Refuse the tunnel too: a request relayed by the edge (or any proxy) carries
        ``X-Forwarded-*``/``Forwarded``, and a stream the agent dialled to this port comes from one
        of the agent's own sockets. The agent never dials this port; this is the second lock."""
        if request.forwarded or (
            self._is_tunnel_peer is not None
            and request.peer is not None
            and self._is_tunnel_peer(request.peer)
        ):
            return _HTTPError(
                "FORBIDDEN", "Requests through the tunnel are not accepted by the local API."
            )
        if request.from_browser:
            return _HTTPError("FORBIDDEN", "Browser requests are not accepted by the local API.")
        host = request.host
        if self._check_host and not (host in self._allowed_hosts or host.endswith(".localhost")):
            return _HTTPError("FORBIDDEN", f"Host {_shown(host)!r} is not allowed.")
        return None

    async def _dispatch(self, request: _Request) -> _Response:
        refusal = self._refusal(request)
        if refusal is not None:
            return _error_response(refusal, request.path.startswith("/api/"))
        for pattern, handlers, legacy in self._routes:
            match = pattern.fullmatch(request.path)
            if match is None:
                continue
            handler = handlers.get(request.method)
            if handler is None:
                allow = ", ".join(handlers)
                err = _HTTPError(
                    "METHOD_NOT_ALLOWED",
                    f"Method {_shown(request.method)} is not allowed here; use {allow}.",
                )
                return _error_response(err, legacy, [("allow", allow)])
            try:
                return await handler(request, match)
            except _HTTPError as exc:
                return _error_response(exc, legacy)
            except (AgentError, ValidationError) as exc:
                return _error_response(_HTTPError(exc.code, exc.message, exc.status), legacy)
            except Exception:
                log.exception("local API %s %s failed", request.method, _shown(request.path))
                err = _HTTPError("INTERNAL_ERROR", "Internal error in the tunnel agent.")
                return _error_response(err, legacy)
        err = _HTTPError("NOT_FOUND", f"No such endpoint: {_shown(request.path)}.")
        return _error_response(err, request.path.startswith("/api/"))

    def _exposable_port(self, obj: Mapping[str, Any]) -> int:
        port = _body_port(obj)
        server = self._server
        if server is not None and server.sockets and port == self.port:
            raise api_port_error(port)  # a preview URL of this API would hand it to anyone
        return port

    # -- native endpoints -------------------------------------------------------------------

    async def _expose(self, request: _Request, match: re.Match[str]) -> _Response:
        obj = _json_object(request.body)
        port = self._exposable_port(obj)
        name = _optional_name(obj)
        token = _optional_token(obj)
        exposure = await self._controller.expose(port, name=name, token=token)
        return _json(200, _exposure_json(exposure))

    async def _unexpose(self, request: _Request, match: re.Match[str]) -> _Response:
        await self._controller.unexpose(_path_port(match[1]))
        return _Response(204)

    async def _list(self, request: _Request, match: re.Match[str]) -> _Response:
        exposures = sorted(await self._controller.list_exposures(), key=lambda e: e.port)
        return _json(200, {"ports": [_exposure_json(e) for e in exposures]})

    async def _status(self, request: _Request, match: re.Match[str]) -> _Response:
        controller = self._controller
        return _json(200, {"sandboxId": controller.sandbox_id, "connected": controller.connected})

    # -- legacy Cloudflare container endpoints ----------------------------------------------

    async def _legacy_expose(self, request: _Request, match: re.Match[str]) -> _Response:
        obj = _json_object(request.body)
        with _legacy_port_context(obj.get("port")):
            port = self._exposable_port(obj)
            name = _optional_name(obj)
            exposure = await self._controller.expose(port, name=name)
        return _json(
            200,
            {
                "success": True,
                "port": exposure.port,
                "url": exposure.url,
                "name": exposure.name,
                "timestamp": _timestamp(),
            },
        )

    async def _legacy_list(self, request: _Request, match: re.Match[str]) -> _Response:
        exposures = sorted(await self._controller.list_exposures(), key=lambda e: e.port)
        ports = [{"port": e.port, "url": e.url, "status": "active"} for e in exposures]
        return _json(200, {"success": True, "ports": ports, "timestamp": _timestamp()})

    async def _legacy_unexpose(self, request: _Request, match: re.Match[str]) -> _Response:
        with _legacy_port_context(_path_value(match[1])):
            port = _path_port(match[1])
            await self._controller.unexpose(port)
        return _json(200, {"success": True, "port": port, "timestamp": _timestamp()})


async def start_local_api(
    controller: ExposureController,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    **options: Any,
) -> LocalAPI:
    """Start the local control API and return it (read ``.port``; ``await .close()`` to stop).

    ``options`` go to :class:`LocalAPI` (``request_timeout``, ``max_connections``,
    ``is_tunnel_peer``).
    """
    api = LocalAPI(controller, host, port, **options)
    await api.start()
    return api
