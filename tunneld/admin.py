"""Admin API (HTTP/1.1 on h11, JSON on orjson, Bearer token): what orchestrators and the SDK call.

    GET    /healthz                                   liveness, no auth
    GET    /metrics                                   Prometheus text
    GET    /v1/sandboxes                              sandboxes with their session state and ports
    GET    /v1/sandboxes/{id}/ports                   {"ports": [{port, exposedAt, name}]}
    POST   /v1/sandboxes/{id}/ports                   {"port": 8000, "name"?: "api", "token"?: "t"}
    DELETE /v1/sandboxes/{id}/ports/{port}            204, idempotent
    GET    /v1/sandboxes/{id}/ports/{port}/ws?path=/  WebSocket handshake relayed to the sandbox

Not a hot path: plain asyncio streams and h11 for clarity, every read bounded in size and time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final, cast
from urllib.parse import parse_qs, unquote, urlsplit

import h11
import orjson

from protocol.errors import LocalProtocolError
from protocol.hostnames import ValidationError, validate_port, validate_sandbox_id
from relay.mux import StreamEndpoint

from .auth import verify_bearer
from .httphead import H11HeadParser, HeadError
from .public import forward_head

if TYPE_CHECKING:
    from .edge import EdgeServer

log = logging.getLogger("tunneld.admin")

_STATUSES: Final = frozenset(s.value for s in HTTPStatus)
MAX_BODY: Final = 64 * 1024  # expose requests are tiny JSON objects
READ_TIMEOUT: Final = 10.0
IDLE_TIMEOUT: Final = 60.0


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: list[tuple[str, str]] | None = None
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or []


class _Switch(Exception):
    """The connection became a raw relay (WebSocket connect); stop serving HTTP on it."""


def _json(status: int, payload: Any) -> tuple[int, list[tuple[str, str]], bytes]:
    return status, [("content-type", "application/json")], orjson.dumps(payload)


class AdminServer:
    def __init__(self, edge: EdgeServer) -> None:
        self.edge = edge
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> asyncio.Server:
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_BODY * 2)
        return self._server

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except BaseException:
                pass

    # -- connection loop -------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_BODY)
        switched = False
        try:
            while True:
                try:
                    request, body = await self._read_request(conn, reader)
                except ApiError as exc:
                    await self._send(
                        conn,
                        writer,
                        *_json(exc.status, {"error": exc.message, "code": exc.code}),
                        close=True,
                    )
                    return
                if request is None:
                    return
                try:
                    status, headers, payload = await self._dispatch(
                        request, body, conn, reader, writer
                    )
                except _Switch:
                    switched = True
                    return
                except ApiError as exc:
                    status, headers, payload = _json(
                        exc.status, {"error": exc.message, "code": exc.code}
                    )
                    headers += exc.headers
                except ValidationError as exc:
                    status, headers, payload = _json(
                        exc.status, {"error": exc.message, "code": exc.code}
                    )
                except Exception:
                    log.exception(
                        "admin API: unexpected error on %s %s", request.method, request.target
                    )
                    status, headers, payload = _json(
                        500,
                        {"error": "Internal error; see the tunneld log.", "code": "INTERNAL_ERROR"},
                    )
                await self._send(conn, writer, status, headers, payload)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, h11.LocalProtocolError):
            return
        except asyncio.CancelledError:
            return
        finally:
            self._tasks.discard(task)
            if not switched and not writer.transport.is_closing():
                writer.close()

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> tuple[h11.Request | None, bytes]:
        request: h11.Request | None = None
        body = bytearray()
        deadline = None
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                raise ApiError(
                    status,
                    "BAD_REQUEST" if status != 431 else "HEADERS_TOO_LARGE",
                    f"Malformed request: {exc}.",
                ) from None
            if event is h11.NEED_DATA:
                timeout = (
                    IDLE_TIMEOUT if request is None and not conn.trailing_data[0] else READ_TIMEOUT
                )
                if deadline is None or request is None:
                    deadline = asyncio.get_running_loop().time() + timeout
                remaining = deadline - asyncio.get_running_loop().time()
                try:
                    data = await asyncio.wait_for(reader.read(65536), max(remaining, 0.001))
                except TimeoutError:
                    if request is None and not conn.trailing_data[0]:
                        return None, b""  # idle keep-alive connection: just close
                    raise ApiError(
                        408, "REQUEST_TIMEOUT", "The request did not arrive in time."
                    ) from None
                conn.receive_data(data)
                if not data and request is None and not conn.trailing_data[0]:
                    return None, b""
                continue
            if isinstance(event, h11.Request):
                request = event
                if self._is_upgrade(request):
                    return request, b""
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise ApiError(
                        413, "BODY_TOO_LARGE", f"Request body larger than {MAX_BODY} bytes."
                    )
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None, b""

    @staticmethod
    def _is_upgrade(request: h11.Request) -> bool:
        return any(n == b"upgrade" and v.lower() == b"websocket" for n, v in request.headers)

    async def _send(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        status: int,
        headers: list[tuple[str, str]],
        payload: bytes,
        close: bool = False,
    ) -> None:
        headers = [*headers, ("content-length", str(len(payload))), ("cache-control", "no-store")]
        if close:
            headers.append(("connection", "close"))
        try:
            reason = HTTPStatus(status).phrase if status in _STATUSES else ""
            data = conn.send(h11.Response(status_code=status, headers=headers, reason=reason))
            if payload:
                data = (data or b"") + (conn.send(h11.Data(data=payload)) or b"")
            data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError:
            writer.close()
            return
        writer.write(data)
        await asyncio.wait_for(writer.drain(), READ_TIMEOUT)

    # -- routing ---------------------------------------------------------------------------------
    async def _dispatch(
        self,
        request: h11.Request,
        body: bytes,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        method = request.method.decode()
        url = urlsplit(request.target.decode("latin-1"))
        parts = [unquote(p) for p in url.path.split("/") if p]
        if parts == ["healthz"]:
            self._allow(method, "GET")
            return _json(200, {"status": "ok"})
        auth = next(
            (v for n, v in request.headers.raw_items() if n.lower() == b"authorization"), None
        )
        if not verify_bearer(self.edge.config.admin_token, auth):
            raise ApiError(
                401,
                "UNAUTHORIZED",
                "Missing or invalid admin token (Authorization: Bearer <token>).",
                [("www-authenticate", 'Bearer realm="tunneld"')],
            )
        edge = self.edge
        if parts == ["metrics"]:
            self._allow(method, "GET")
            return 200, [("content-type", "text/plain; version=0.0.4")], edge.metrics.render()
        if parts == ["v1", "sandboxes"]:
            self._allow(method, "GET")
            return _json(
                200,
                {
                    "sandboxes": [
                        self._sandbox_json(s.sandbox_id) for s in edge.registry.sandboxes()
                    ]
                },
            )
        if len(parts) >= 4 and parts[:2] == ["v1", "sandboxes"] and parts[3] == "ports":
            sandbox_id = validate_sandbox_id(parts[2])
            if len(parts) == 4:
                if method == "GET":
                    return _json(200, {"ports": self._ports_json(sandbox_id)})
                self._allow(method, "GET", "POST")
                payload = self._json_body(body)
                unknown = set(payload) - {"port", "name", "token"}
                if unknown:
                    raise ApiError(
                        400, "INVALID_REQUEST", f"Unknown field(s): {', '.join(sorted(unknown))}."
                    )
                if "port" not in payload:
                    raise ApiError(400, "INVALID_REQUEST", "Missing field: port.")
                exposure = await edge.expose(
                    sandbox_id, payload["port"], payload.get("name"), payload.get("token")
                )
                return _json(
                    200, {"port": exposure.port, "exposedAt": exposure.url, "name": exposure.name}
                )
            port = _path_port(parts[4])
            if len(parts) == 5:
                self._allow(method, "DELETE")
                await edge.unexpose(sandbox_id, port)
                return 204, [], b""
            if len(parts) == 6 and parts[5] == "ws":
                self._allow(method, "GET")
                target = parse_qs(url.query).get("path", ["/"])[0]
                self._ws_connect(
                    sandbox_id, validate_port(port), target, request, conn, reader, writer
                )
        raise ApiError(404, "NOT_FOUND", f"No such endpoint: {method} {url.path}")

    @staticmethod
    def _allow(method: str, *allowed: str) -> None:
        if method not in allowed:
            raise ApiError(
                405,
                "METHOD_NOT_ALLOWED",
                f"Method {method} not allowed here.",
                [("allow", ", ".join(allowed))],
            )

    @staticmethod
    def _json_body(body: bytes) -> dict[str, Any]:
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ApiError(400, "INVALID_JSON", "The request body is not valid JSON.") from None
        if not isinstance(payload, dict):
            raise ApiError(400, "INVALID_JSON", "The request body must be a JSON object.")
        return payload

    def _ports_json(self, sandbox_id: str) -> list[dict[str, Any]]:
        return [
            {"port": e.port, "exposedAt": e.url, "name": e.name}
            for e in self.edge.exposure_messages(sandbox_id)
        ]

    def _sandbox_json(self, sandbox_id: str) -> dict[str, Any]:
        state = self.edge.registry.get(sandbox_id)
        session = state.session if state is not None else None
        out: dict[str, Any] = {
            "id": sandbox_id,
            "connected": session is not None,
            "ports": self._ports_json(sandbox_id),
        }
        if session is not None:
            out["session"] = session.session_id
            out["peer"] = session.peer
            out["streams"] = len(session.streams)
            connected_at = state.connected_at if state is not None else None
            if connected_at is not None:
                out["connectedAt"] = time.time() - (self.edge.loop.time() - connected_at)
            if session.rtt is not None:
                out["rttMs"] = round(session.rtt * 1000, 3)
        return out

    # -- wsConnect -------------------------------------------------------------------------------
    def _ws_connect(
        self,
        sandbox_id: str,
        port: int,
        target: str,
        request: h11.Request,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        if not target.startswith("/") or any(c in target for c in "\r\n "):
            raise ApiError(400, "INVALID_PATH", "path must be an absolute path, e.g. /ws.")
        state = self.edge.registry.get(sandbox_id)
        if state is None:
            raise ApiError(404, "SANDBOX_NOT_FOUND", f"Sandbox {sandbox_id} is unknown.")
        session = state.session
        if session is None or not session.can_open_streams():
            raise ApiError(503, "SANDBOX_NOT_CONNECTED", f"Sandbox {sandbox_id} is not connected.")
        # Rebuild the handshake for the sandbox's server: its path, no admin credentials.
        raw = b"GET " + target.encode() + b" HTTP/1.1\r\n"
        for name, value in request.headers.raw_items():
            if name.lower() != b"authorization":
                raw += bytes(name) + b": " + bytes(value) + b"\r\n"
        raw += b"\r\n"
        try:
            head = H11HeadParser().parse(raw)
        except HeadError as exc:
            raise ApiError(exc.status, exc.code, exc.message) from None
        peer = writer.get_extra_info("peername")
        client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ""
        trailer = (
            b"x-forwarded-for: "
            + client.rsplit(":", 1)[0].encode()
            + b"\r\nx-sandbox-name: "
            + sandbox_id.encode()
            + b"\r\n\r\n"
        )
        endpoint = _DirectEndpoint(session, 0)
        # asyncio's StreamWriter closes its transport when garbage-collected (3.11.5+): the
        # endpoint keeps it alive for as long as the relay uses that transport.
        endpoint.writer = writer
        try:
            endpoint.stream_id = session.session.open_stream(port, "direct", client)
        except LocalProtocolError:
            raise ApiError(
                503, "SANDBOX_BUSY", f"Sandbox {sandbox_id} cannot take more connections right now."
            ) from None
        session.add_stream(endpoint)
        transport = cast(asyncio.Transport, writer.transport)
        leftover = conn.trailing_data[0]
        transport.set_protocol(endpoint)
        endpoint.connection_made(transport)
        endpoint.forward(forward_head(head, b"host: localhost:%d\r\n" % port, trailer))
        if leftover:
            endpoint.forward(bytes(leftover))
        if not transport.is_reading():
            transport.resume_reading()
        log.info("sandbox %s: admin WebSocket connect to port %d%s", sandbox_id, port, target)
        raise _Switch


class _DirectEndpoint(StreamEndpoint):
    """The admin client's connection after the switch to a raw relay."""

    __slots__ = ("_responded", "writer")

    def __init__(self, mux: Any, stream_id: int) -> None:
        super().__init__(mux, stream_id)
        self._responded = False
        self.writer: asyncio.StreamWriter | None = None

    def receive_from_peer(self, data: bytes) -> None:
        self._responded = True
        super().receive_from_peer(data)

    def peer_reset(self, code: Any) -> None:
        from protocol.errors import ResetCode

        from .public import error_response

        if (
            not self._responded
            and self.transport is not None
            and code
            in (
                ResetCode.CONNECT_REFUSED,
                ResetCode.CONNECT_FAILED,
            )
        ):
            self._responded = True
            self.transport.write(
                error_response(
                    502,
                    "UPSTREAM_CONNECT_FAILED",
                    "Nothing is listening on that port in the sandbox.",
                )
            )
            self.transport.close()
            self._closed = True
            return
        super().peer_reset(code)


def _path_port(text: str) -> object:
    """A port from a path segment: ASCII digits only (``str.isdigit()`` also accepts ``²``,
    which ``int()`` rejects, and full-width digits, which it parses); anything else is returned
    as is for ``validate_port`` to refuse with 400 INVALID_PORT."""
    return int(text) if text.isascii() and text.isdigit() and len(text) < 7 else text
