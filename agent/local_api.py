"""The agent's local control API: HTTP/1.1 on 127.0.0.1:3000, for processes inside the sandbox.

Theory of operation
-------------------
The connection loop, the limits (head <= 16 KiB, body <= 64 KiB, all of it within 10 s, at most 64
connections, ``100 Continue``, lingering close) and the JSON error rendering are the shared server's
(:mod:`relay.httpapi`, also behind the edge's admin API). This module owns the routes: refuse a
request a browser or the tunnel sent, route it through the ``LocalAPI._routes`` table, answer JSON.

Two API families share the routing table:

* native ``/v1/...``: errors are :class:`relay.httpapi.ApiError` (``AgentError`` is one), rendered
  ``{"error": <sentence>, "code": <CODE>}`` with the status from :mod:`agent.errors`;
* Cloudflare's legacy container endpoints ``/api/...`` (sandbox-sdk <= 0.10.3), so existing tooling
  keeps working: success bodies carry ``"success": true`` and a ``timestamp``, errors use the legacy
  ``{code, message, context, httpStatus, timestamp}`` shape. Unlike the legacy container, expose is
  idempotent and unexposing an unknown port succeeds (as Cloudflare >= 0.8.13 does).

The controller (the agent core) does the work; this module only validates input, translates, and
never lets a traceback reach a client.

``POST /api/port-watch`` (Cloudflare's current container endpoint) answers a Server-Sent Events
stream instead of JSON: the handler validates the body, takes a watch slot (429 past
:data:`agent.portwatch.MAX_WATCHES`), then takes the connection over from the shared server
(``Exchange.detach``) and hands it to a task that writes ``watching``, probes
(:mod:`agent.portwatch`), writes ``ready`` or ``error`` and closes. The connection's protocol is
swapped for :class:`_WatchStream`, which cancels that task when the client closes its side: a
client that leaves stops its watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Protocol

import orjson

from agent.errors import api_port_error, status_for
from agent.portwatch import PortWatches, TooManyWatches, WatchSpec, spec_from_json, watch_port
from protocol.control import Exposure
from protocol.hostnames import (
    DEFAULT_OPTIONS,
    ExposureOptions,
    ValidationError,
    validate_custom_token,
    validate_exposure_options,
    validate_port,
    validate_port_name,
)
from relay.httpapi import (
    MAX_BODY_BYTES,
    MAX_HEAD_BYTES,
    ApiError,
    ApiServer,
    Exchange,
    Limits,
    Request,
    Response,
    json_response,
    shown,
)

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "MAX_BODY_BYTES",
    "MAX_CONNECTIONS",
    "MAX_HEAD_BYTES",
    "REQUEST_TIMEOUT",
    "ExposureController",
    "HostCheck",
    "LocalAPI",
    "start_local_api",
]

log = logging.getLogger(__name__)

# Loopback only: anything that can reach this API can publish sandbox ports to the internet.
DEFAULT_HOST: Final = "127.0.0.1"
# Cloudflare's sandbox control-plane port; protocol.hostnames refuses to expose it for that reason.
DEFAULT_PORT: Final = 3000
# Head and body limits (MAX_HEAD_BYTES 16 KiB, MAX_BODY_BYTES 64 KiB) are relay.httpapi's defaults.
# Seconds to receive one whole request, and how long an idle keep-alive connection is kept.
REQUEST_TIMEOUT: Final = 10.0
# Clients are a few local tools; more concurrent connections than this is a leak or an attack.
MAX_CONNECTIONS: Final = 64


class ExposureController(Protocol):
    """What the local API needs from the agent core. Methods raise ``AgentError``."""

    @property
    def connected(self) -> bool: ...

    @property
    def sandbox_id(self) -> str: ...

    async def expose(
        self,
        port: int,
        name: str | None = None,
        token: str | None = None,
        options: ExposureOptions = DEFAULT_OPTIONS,
    ) -> Exposure: ...

    async def unexpose(self, port: int) -> None: ...

    async def list_exposures(self) -> list[Exposure]: ...


class _HTTPError(ApiError):
    """A refusal of this API: the status comes from :func:`agent.errors.status_for` unless given;
    ``context`` is shown by the legacy error shape only."""

    def __init__(
        self,
        code: str,
        message: str,
        status: int | None = None,
        context: Any = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(status_for(code) if status is None else status, code, message, headers)
        self.context = context


_Handler = Callable[[Request, "re.Match[str]", Exchange], Awaitable[Response | None]]
# ``is_tunnel_peer(("127.0.0.1", 51234), 3000)``: is that address one of the agent's own dialled
# sockets, connected to that port (this API's)?
TunnelPeerCheck = Callable[[tuple[str, int], int], bool]


def _is_proxy_header(name: bytes) -> bool:
    # "_" too: WSGI/CGI-style stacks read X_Forwarded_For as X-Forwarded-For.
    name = name.replace(b"_", b"-")
    return name == b"forwarded" or name.startswith(b"x-forwarded-")


def _host_name(value: str) -> str:
    """``"[::1]:3000"`` -> ``"::1"``, ``"LocalHost:3000"`` -> ``"localhost"``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.partition(":")[0]


def _is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostCheck:
    """Which ``Host`` header names the local API answers, decided from the address it binds.

    Always: ``localhost``, ``*.localhost``, ``127.0.0.1``, ``::1`` and the bind address itself.
    A wildcard bind (``0.0.0.0``, ``::``, ``""``) answers on every address of the machine and
    cannot list them, so it also takes **any IP address**, but still no other name: a
    DNS-rebinding page (a name of the attacker's that now resolves to this machine) sends its
    own name, and a same-origin ``GET`` of that page carries no ``Origin`` to refuse it by, so
    without this check it could read ``GET /v1/ports`` (every preview URL with its token). A
    browser sends an IP address as the ``Host`` only for a page loaded from that address, which
    is this API itself. Other names are refused on every bind, except the ones an operator
    names (``allowed``, ``tunnel-agent run --api-allow-host``: a container or service name
    that clients in the sandbox's network use to reach a wildcard-bound API)."""

    def __init__(self, bind_host: str, allowed: Iterable[str] = ()) -> None:
        bind = bind_host.strip().lower().removeprefix("[").removesuffix("]")  # no port here
        self.wildcard = bind == "" or (
            _is_ip_address(bind) and ipaddress.ip_address(bind).is_unspecified
        )
        names = {"localhost", "127.0.0.1", "::1"} | {_host_name(name) for name in allowed}
        if not self.wildcard:
            names.add(bind)
        self._names = frozenset(names)

    def allows(self, host: str) -> bool:
        """``host``: a ``Host`` header's value (``"[::1]:3000"``, ``"LocalHost"``)."""
        name = _host_name(host)
        if name in self._names or name.endswith(".localhost"):
            return True
        return self.wildcard and _is_ip_address(name)


def _timestamp() -> str:
    """Now in JavaScript's ``Date.toISOString()`` form, as the legacy container sent it."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
    try:
        return validate_port_name(obj.get("name"))
    except ValidationError as exc:
        raise _HTTPError(exc.code, exc.message) from None


def _optional_token(obj: Mapping[str, Any]) -> str | None:
    token = obj.get("token")
    return None if token is None else validate_custom_token(token)


def _port_context(value: object) -> dict[str, Any]:
    if isinstance(value, str):
        value = shown(value)
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
    except (ApiError, ValidationError) as exc:
        raise _HTTPError(exc.code, exc.message, exc.status, _port_context(port)) from exc


def _exposurejson_response(exposure: Exposure) -> dict[str, Any]:
    return {"port": exposure.port, "exposedAt": exposure.url, "name": exposure.name}


# The legacy container (sandbox-sdk <= 0.10.3) answered its expose and unexpose endpoints with
# its own codes for the same conditions. Only those: ``/api/port-watch`` is Cloudflare's current
# endpoint, which never refuses a port (so has no code of its own for one); a refused port there
# is ``INVALID_PORT``, as ``tunnel-agent expose`` and the edge's admin API say it (Cloudflare's
# client reads either code as its ``InvalidPortError``).
_LEGACY_CODES: Final[Mapping[str, str]] = {"INVALID_PORT": "INVALID_PORT_NUMBER"}
_LEGACY_CODE_PATHS: Final = re.compile(r"/api/(?:expose-port|exposed-ports(?:/.*)?)")


def _legacy_error(exc: _HTTPError, path: str) -> Response:
    codes = _LEGACY_CODES if _LEGACY_CODE_PATHS.fullmatch(path) else {}
    body = {
        "code": codes.get(exc.code, exc.code),
        "message": exc.message,
        "context": exc.context if exc.context is not None else {},
        "httpStatus": exc.status,
        "timestamp": _timestamp(),
    }
    return json_response(exc.status, body, exc.headers)


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
        watches: PortWatches | None = None,
        host_check: HostCheck | None = None,
    ) -> None:
        self._controller = controller
        # The agent's watch counter (shared with the edge's watch_port requests), else our own.
        self.watches = watches if watches is not None else PortWatches()
        self._watch_tasks: set[asyncio.Task[None]] = set()
        self._is_tunnel_peer = is_tunnel_peer
        self._host = host
        self._requested_port = port
        # The Host names a legitimate client may send, from the bind address (``host_check``
        # only to test a wildcard bind's rule on loopback).
        self.host_check = host_check if host_check is not None else HostCheck(host)
        limits = Limits(
            max_head_bytes=MAX_HEAD_BYTES,
            max_body_bytes=MAX_BODY_BYTES,
            idle_timeout=request_timeout,
            request_timeout=request_timeout,
            max_connections=max_connections,
        )
        self.http = ApiServer(
            self._handle,
            name="local API",
            limits=limits,
            internal_error="Internal error in the tunnel agent.",
            logger=log,
        )
        # path pattern -> {method: handler}; routes under /api/ answer in the legacy shape.
        self._routes: tuple[tuple[re.Pattern[str], Mapping[str, _Handler]], ...] = (
            (re.compile(r"/v1/ports"), {"GET": self._list, "POST": self._expose}),
            (re.compile(r"/v1/ports/([^/]+)"), {"DELETE": self._unexpose}),
            (re.compile(r"/v1/status"), {"GET": self._status}),
            (re.compile(r"/api/expose-port"), {"POST": self._legacy_expose}),
            (re.compile(r"/api/exposed-ports"), {"GET": self._legacy_list}),
            (re.compile(r"/api/exposed-ports/([^/]+)"), {"DELETE": self._legacy_unexpose}),
            (re.compile(r"/api/port-watch"), {"POST": self._port_watch}),
        )

    @property
    def port(self) -> int:
        """The bound port (the real one when started with ``port=0``)."""
        server = self.http.server
        if server is None or not server.sockets:
            raise RuntimeError("the local API is not started")
        return int(server.sockets[0].getsockname()[1])

    @property
    def host(self) -> str:
        return self._host

    async def start(self) -> None:
        await self.http.start(self._host, self._requested_port)
        log.info("local control API listening on http://%s:%d", self._host, self.port)

    async def close(self) -> None:
        """Stop listening and drop every connection (idle keep-alives included), port watches
        too. Idempotent."""
        await self.http.close()
        tasks = list(self._watch_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> LocalAPI:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- routing ----------------------------------------------------------------------------

    def _refusal(self, request: Request) -> _HTTPError | None:
        """Refuse web pages. A page in a browser on this machine can send a "simple" cross-origin
        POST here without any preflight, and a DNS-rebinding page can even read the answers;
        either would let any website publish sandbox ports. Browsers always send ``Origin`` on
        such requests (our clients never do) and a rebinding page's ``Host`` is its own name.

        Refuse the tunnel too: a request relayed by the edge (or any proxy) carries
        ``X-Forwarded-*``/``Forwarded``, and a stream the agent dialled to this port comes from one
        of the agent's own sockets, connected to this port (a client of the API may have the same
        local address as a socket the agent dialled elsewhere: Linux shares an ephemeral port
        between connections to different destinations). The agent never dials this port; this is
        the second lock."""
        if any(_is_proxy_header(name) for name, _ in request.headers) or (
            self._is_tunnel_peer is not None
            and request.peer is not None
            and self._is_tunnel_peer(request.peer, self.port)
        ):
            return _HTTPError(
                "FORBIDDEN", "Requests through the tunnel are not accepted by the local API."
            )
        if request.header(b"origin") is not None:
            return _HTTPError("FORBIDDEN", "Browser requests are not accepted by the local API.")
        host = (request.header(b"host") or b"").decode("ascii", "replace")
        if not self.host_check.allows(host):
            return _HTTPError("FORBIDDEN", f"Host {shown(_host_name(host))!r} is not allowed.")
        return None

    async def _handle(self, request: Request, exchange: Exchange) -> Response | None:
        """Native routes raise their refusals to the shared server, which renders them;
        legacy routes (under ``/api/``) answer every refusal in the legacy shape."""
        legacy = request.path.startswith("/api/")
        try:
            return await self._route(request, exchange)
        except _HTTPError as exc:
            err = exc
        except ValidationError as exc:
            err = _HTTPError(exc.code, exc.message, exc.status)
        except ApiError as exc:
            if not legacy:
                raise
            err = _HTTPError(exc.code, exc.message, exc.status, headers=exc.headers)
        except Exception:
            if not legacy:
                raise
            log.exception("local API %s %s failed", shown(request.method), shown(request.path))
            err = _HTTPError("INTERNAL_ERROR", "Internal error in the tunnel agent.")
        if legacy:
            return _legacy_error(err, request.path)
        raise err

    async def _route(self, request: Request, exchange: Exchange) -> Response | None:
        refusal = self._refusal(request)
        if refusal is not None:
            raise refusal
        for pattern, handlers in self._routes:
            match = pattern.fullmatch(request.path)
            if match is None:
                continue
            handler = handlers.get(request.method)
            if handler is None:
                allow = ", ".join(handlers)
                raise _HTTPError(
                    "METHOD_NOT_ALLOWED",
                    f"Method {shown(request.method)} is not allowed here; use {allow}.",
                    headers=[("allow", allow)],
                )
            return await handler(request, match, exchange)
        raise _HTTPError("NOT_FOUND", f"No such endpoint: {shown(request.path)}.")

    def _exposable_port(self, obj: Mapping[str, Any]) -> int:
        port = _body_port(obj)
        server = self.http.server
        if server is not None and server.sockets and port == self.port:
            raise api_port_error(port)  # a preview URL of this API would hand it to anyone
        return port

    # -- native endpoints -------------------------------------------------------------------

    async def _expose(self, request: Request, match: re.Match[str], exchange: Exchange) -> Response:
        obj = _json_object(request.body)
        port = self._exposable_port(obj)
        name = _optional_name(obj)
        token = _optional_token(obj)
        options = validate_exposure_options(
            obj.get("protocol"), obj.get("proxyProtocol"), obj.get("inspect")
        )
        exposure = await self._controller.expose(port, name=name, token=token, options=options)
        return json_response(200, _exposurejson_response(exposure))

    async def _unexpose(
        self, request: Request, match: re.Match[str], exchange: Exchange
    ) -> Response:
        await self._controller.unexpose(_path_port(match[1]))
        return Response(204)

    async def _list(self, request: Request, match: re.Match[str], exchange: Exchange) -> Response:
        exposures = sorted(await self._controller.list_exposures(), key=lambda e: e.port)
        return json_response(200, {"ports": [_exposurejson_response(e) for e in exposures]})

    async def _status(self, request: Request, match: re.Match[str], exchange: Exchange) -> Response:
        controller = self._controller
        return json_response(
            200, {"sandboxId": controller.sandbox_id, "connected": controller.connected}
        )

    # -- legacy Cloudflare container endpoints ----------------------------------------------

    async def _legacy_expose(
        self, request: Request, match: re.Match[str], exchange: Exchange
    ) -> Response:
        obj = _json_object(request.body)
        with _legacy_port_context(obj.get("port")):
            port = self._exposable_port(obj)
            name = _optional_name(obj)
            exposure = await self._controller.expose(port, name=name)
        return json_response(
            200,
            {
                "success": True,
                "port": exposure.port,
                "url": exposure.url,
                "name": exposure.name,
                "timestamp": _timestamp(),
            },
        )

    async def _legacy_list(
        self, request: Request, match: re.Match[str], exchange: Exchange
    ) -> Response:
        exposures = sorted(await self._controller.list_exposures(), key=lambda e: e.port)
        ports = [{"port": e.port, "url": e.url, "status": "active"} for e in exposures]
        return json_response(200, {"success": True, "ports": ports, "timestamp": _timestamp()})

    async def _legacy_unexpose(
        self, request: Request, match: re.Match[str], exchange: Exchange
    ) -> Response:
        with _legacy_port_context(_path_value(match[1])):
            port = _path_port(match[1])
            await self._controller.unexpose(port)
        return json_response(200, {"success": True, "port": port, "timestamp": _timestamp()})

    # -- Cloudflare's port watch (Server-Sent Events) ---------------------------------------

    async def _port_watch(
        self, request: Request, match: re.Match[str], exchange: Exchange
    ) -> Response | None:
        spec = spec_from_json(_json_object(request.body))  # ValidationError -> 400
        if spec.port == self.port:
            raise api_port_error(spec.port)
        try:
            self.watches.acquire()
        except TooManyWatches as exc:
            raise _HTTPError("TOO_MANY_WATCHES", str(exc), 429) from None
        transport = exchange.writer.transport
        if transport.is_closing():
            self.watches.release()
            return None  # the client left already; the shared server closes the connection
        exchange.detach()  # anything the client sends from now on is ignored
        stream = _WatchStream(exchange.writer)
        transport.set_protocol(stream)
        stream.connection_made(transport)
        task = asyncio.get_running_loop().create_task(self._run_watch(spec, stream))
        stream.task = task
        self._watch_tasks.add(task)
        task.add_done_callback(self._watch_tasks.discard)
        log.info("watching port %d (%s %s)", spec.port, spec.mode, spec.path)
        return None

    async def _run_watch(self, spec: WatchSpec, stream: _WatchStream) -> None:
        try:
            stream.write(_SSE_HEAD)
            stream.event({"type": "watching", "port": spec.port})
            result = await watch_port(spec, self.watches.hosts)
            event: dict[str, Any]
            if result.ready:
                event = {"type": "ready", "port": spec.port}
                if result.last is not None and result.last.status is not None:
                    event["statusCode"] = result.last.status
            else:
                event = {"type": "error", "port": spec.port, "error": result.message(spec)}
                if result.last is not None and result.last.status is not None:
                    event["statusCode"] = result.last.status
            stream.event(event)
            stream.write(b"0\r\n\r\n")
            log.info("port %d %s after %.1f s", spec.port, event["type"], result.elapsed)
        except Exception:  # a bug: log it here, the client sees the stream end without a result
            log.exception("port watch of %d failed", spec.port)
        finally:
            self.watches.release()
            stream.close()


# A streamed answer: chunked, so the end of the stream is explicit, and then the connection closes
# (Cloudflare sends ``Connection: keep-alive``; nothing follows a watch, so we say close).
_SSE_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream\r\n"
    b"cache-control: no-cache\r\n"
    b"connection: close\r\n"
    b"transfer-encoding: chunked\r\n"
    b"\r\n"
)


class _WatchStream(asyncio.Protocol):
    """A port-watch connection after the switch from HTTP: writes SSE frames as HTTP chunks,
    ignores input, and cancels the watch when the client closes or half-closes its side."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        # asyncio closes a StreamWriter's transport when the writer is garbage-collected: keep it.
        self._writer = writer
        self.transport: asyncio.WriteTransport | None = None
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if isinstance(transport, asyncio.ReadTransport) and not transport.is_reading():
            transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        pass  # an SSE client has nothing more to say

    def eof_received(self) -> bool:
        self._gone()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()

    def _gone(self) -> None:
        task = self.task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def event(self, obj: Mapping[str, Any]) -> None:
        frame = b"data: " + orjson.dumps(obj) + b"\n\n"
        self.write(b"%x\r\n%s\r\n" % (len(frame), frame))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def start_local_api(
    controller: ExposureController,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    **options: Any,
) -> LocalAPI:
    """Start the local control API and return it (read ``.port``; ``await .close()`` to stop).

    ``options`` go to :class:`LocalAPI` (``request_timeout``, ``max_connections``,
    ``is_tunnel_peer``, ``watches``, ``host_check``).
    """
    api = LocalAPI(controller, host, port, **options)
    await api.start()
    return api
