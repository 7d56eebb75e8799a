"""The public listener: preview-URL traffic from browsers and curl.

Theory of operation
-------------------
Each client TCP connection becomes one stream to the sandbox's agent, which opens one TCP
connection to the service, so HTTP keep-alive and pipelining map one to one and response bytes are
relayed raw, unparsed and unbuffered (SSE, chunked, multi-GB downloads).

The client -> service direction is parsed, because every request on a keep-alive connection must be
checked: the connection is in one of four states.

``HEAD``     collecting a request head (bounded by ``MAX_HEAD_SIZE`` and ``head_timeout``).
             The first head routes the connection: Host -> (port, sandbox, token) ->
             registry -> session -> new stream. Later heads must name the same route.
``LENGTH``   relaying ``remaining`` bytes of a Content-Length body, zero-copy.
``CHUNKED``  relaying a chunked body while ``ChunkedScanner`` finds its end.
``TUNNEL``   after ``Upgrade: websocket``: a raw two-way relay, nothing parsed any more.

Every forwarded head is rebuilt: ``Host: localhost:{port}`` (dev servers refuse foreign hosts),
``X-Forwarded-For/-Host/-Proto`` and ``X-Sandbox-Name`` set by us, and every client-sent header of
the internal families (``X-Tunnel-*``, ``X-Sandbox-*``, ``X-Forwarded-*``, ``Forwarded``,
``X-Real-IP``) dropped, so nothing from a client can spoof them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final

import orjson

from protocol.errors import LocalProtocolError, ResetCode
from protocol.hostnames import parse_preview_host
from relay.buffers import SHARED
from relay.mux import StreamEndpoint

from .httphead import MAX_HEAD_SIZE, ChunkedScanner, HeadError, HeadParser, RequestHead

if TYPE_CHECKING:
    from .edge import EdgeServer, EdgeSession

log = logging.getLogger("tunneld.public")

_HEAD, _LENGTH, _CHUNKED, _TUNNEL, _DONE = range(5)

_REASONS: Final = {
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    421: "Misdirected Request",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}

_DROPPED_PREFIXES: Final = (b"x-tunnel-", b"x-sandbox-", b"x-forwarded-")
_DROPPED_NAMES: Final = frozenset({b"host", b"forwarded", b"x-real-ip"})


def error_response(status: int, code: str, message: str) -> bytes:
    """A small JSON error page; the connection closes after it."""
    body = orjson.dumps({"error": message, "code": code})
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\ncache-control: no-store\r\n\r\n"
        % (status, _REASONS.get(status, "Error").encode(), len(body))
    ) + body


def forward_head(head: RequestHead, host_line: bytes, trailer: bytes) -> bytes:
    """Rebuild ``head`` for the service: our Host and forwarding headers, internal ones dropped."""
    out = [head.method, b" ", head.target, b" HTTP/", head.version, b"\r\n", host_line]
    for name, value in head.headers:
        if name in _DROPPED_NAMES or name.startswith(_DROPPED_PREFIXES):
            continue
        out += (name, b": ", value, b"\r\n")
    out.append(trailer)
    return b"".join(out)


class PublicConnection(StreamEndpoint):
    """One client connection on the public listener (see the module docstring)."""

    __slots__ = (
        "_head_buf",
        "_host_line",
        "_misdirected",
        "_peer",
        "_remaining",
        "_responded",
        "_route",
        "_scanner",
        "_seen_activity",
        "_state",
        "_timer",
        "_trailer",
        "activity",
        "parser",
        "port",
        "sandbox_id",
        "server",
    )

    def __init__(self, server: EdgeServer, parser: HeadParser) -> None:
        super().__init__(None, 0)  # type: ignore[arg-type]  # bound to a session on the first head
        self.server = server
        self.parser = parser
        self._state = _HEAD
        self._head_buf = bytearray()
        self._remaining = 0
        self._scanner: ChunkedScanner | None = None
        self._route: tuple[int, str, str | None] | None = None
        self._host_line = b""
        self._trailer = b""
        self._responded = False  # response bytes reached the client
        self._misdirected: bytes | None = None  # error to send once the service finishes
        self._timer: asyncio.TimerHandle | None = None
        self._peer = "unknown"
        self.port = 0
        self.sandbox_id = ""
        # Bumped on every read and every response chunk; the edge's idle sweep compares it
        # between two sweeps (cheaper than reading the clock per chunk).
        self.activity = 0
        self._seen_activity = -1

    # -- connection ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self._peer = f"{peer[0]}:{peer[1]}" if ":" not in peer[0] else f"[{peer[0]}]:{peer[1]}"
        self.server.public_connections.add(self)
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self._timer is None:
            self._timer = self.server.loop.call_later(
                self.server.config.head_timeout, self._on_head_timeout
            )

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_head_timeout(self) -> None:
        self._timer = None
        if self._state == _HEAD and self.mux is None:
            self.fail(408, "REQUEST_TIMEOUT", "The request head did not arrive in time.")
        elif self._state == _HEAD and self.transport is not None:
            # Idle between requests or a slow head on a live stream: end our side cleanly.
            self._stop_upstream()

    def buffer_updated(self, nbytes: int) -> None:
        self.activity += 1
        state = self._state
        if state == _TUNNEL:
            self.forward(SHARED.view[:nbytes])
        elif state == _LENGTH and self._remaining > nbytes:
            self._remaining -= nbytes
            self.forward(SHARED.view[:nbytes])
        else:
            self._feed(SHARED.view[:nbytes])

    def _feed(self, data: memoryview | bytes) -> None:
        pos = 0
        end = len(data)
        while pos < end:
            state = self._state
            if state == _HEAD:
                self._head_buf += data[pos:]
                pos = end
                if not self._take_head():
                    return
                rest, self._head_buf = bytes(self._head_buf), bytearray()
                data, pos, end = rest, 0, len(rest)
            elif state == _LENGTH:
                take = min(self._remaining, end - pos)
                self.forward(data[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _HEAD
            elif state == _CHUNKED:
                assert self._scanner is not None
                try:
                    take = self._scanner.feed(data[pos:])
                except HeadError as exc:
                    self._client_error(exc)
                    return
                self.forward(data[pos : pos + take])
                pos += take
                if self._scanner.done:
                    self._scanner = None
                    self._state = _HEAD
            elif state == _TUNNEL:
                self.forward(data[pos:])
                return
            else:  # _DONE: the connection is finishing; nothing more is relayed
                return

    def _take_head(self) -> bool:
        """Try to complete the head in ``_head_buf``; on success leave the rest in the buffer."""
        buf = self._head_buf
        # RFC 9112 2.2: ignore empty lines before a request line (some clients add CRLF to bodies)
        while buf[:2] == b"\r\n":
            del buf[:2]
        if not buf:
            return False
        self._arm_head_timer()
        idx = buf.find(b"\r\n\r\n")
        if idx < 0:
            if len(buf) > MAX_HEAD_SIZE:
                self._client_error(HeadError(431, "HEADERS_TOO_LARGE", "Request head too large."))
            return False
        if idx + 4 > MAX_HEAD_SIZE:
            self._client_error(HeadError(431, "HEADERS_TOO_LARGE", "Request head too large."))
            return False
        raw = bytes(buf[: idx + 4])
        del buf[: idx + 4]
        self._cancel_timer()
        try:
            head = self.parser.parse(raw)
        except HeadError as exc:
            self._client_error(exc)
            return False
        return self._on_head(head)

    def _on_head(self, head: RequestHead) -> bool:
        server = self.server
        config = server.config
        host = head.host.decode("latin-1")
        route = parse_preview_host(host, config.domain, tokens=config.tokens)
        if self._route is not None:
            if route is None or (route.port, route.sandbox_id, route.token) != self._route:
                self._misdirect()
                return False
        else:
            if route is None:
                self.fail(404, "UNKNOWN_HOST", f"No preview URL matches host {host!r}.")
                return False
            state = server.registry.match(route.sandbox_id, route.port, route.token)
            if state is None:
                server.metrics.preview_denied.inc()
                self.fail(404, "INVALID_TOKEN", "Access denied: Invalid token or port not exposed")
                return False
            session: EdgeSession | None = state.session
            if session is None or not session.can_open_streams():
                self.fail(
                    503,
                    "SANDBOX_NOT_CONNECTED",
                    f"Sandbox {route.sandbox_id} is not connected; its agent is offline.",
                )
                return False
            self._route = (route.port, route.sandbox_id, route.token)
            self.port = route.port
            self.sandbox_id = route.sandbox_id
            self._host_line = b"host: localhost:%d\r\n" % route.port
            peer_ip = self._peer.rsplit(":", 1)[0].strip("[]")
            self._trailer = b"".join(
                (
                    b"x-forwarded-for: ", peer_ip.encode(), b"\r\n",
                    b"x-forwarded-host: ", head.host, b"\r\n",
                    b"x-forwarded-proto: ", config.scheme.encode(), b"\r\n",
                    b"x-sandbox-name: ", route.sandbox_id.encode(), b"\r\n\r\n",
                )
            )  # fmt: skip
            try:
                session.open_public_stream(self, route.port, self._peer)
            except LocalProtocolError:
                # the session's stream limit (max_streams) or it started going away meanwhile
                self.fail(
                    503,
                    "SANDBOX_BUSY",
                    f"Sandbox {route.sandbox_id} cannot take more connections right now.",
                )
                return False
            self.mux = session
        if head.upgrade is not None:
            self._state = _TUNNEL
        elif head.chunked:
            self._state = _CHUNKED
            self._scanner = ChunkedScanner()
        elif head.content_length:
            self._state = _LENGTH
            self._remaining = head.content_length
        else:
            self._state = _HEAD
        if config.access_log:
            log.info(
                "%s %s %s -> %s:%d",
                self._peer,
                head.method.decode("latin-1"),
                head.target.decode("latin-1"),
                self.sandbox_id,
                self.port,
            )
        self.forward(forward_head(head, self._host_line, self._trailer))
        return True

    # -- errors ----------------------------------------------------------------------------------
    def _client_error(self, exc: HeadError) -> None:
        if self.mux is None or not self._responded:
            self.fail(exc.status, exc.code, exc.message)
        else:
            self._misdirected = error_response(exc.status, exc.code, exc.message)
            self._stop_upstream()

    def _misdirect(self) -> None:
        self._misdirected = error_response(
            421,
            "MISDIRECTED_REQUEST",
            "This connection serves another preview URL; open a new one.",
        )
        self._stop_upstream()

    def _stop_upstream(self) -> None:
        """Stop relaying client bytes; the service finishes its responses and then we close."""
        self._state = _DONE
        if self.transport is not None:
            self.transport.pause_reading()
        mux = self.mux
        if mux is not None and not self._local_eof and not mux.session.closed and not self._closed:
            self._local_eof = True
            mux.session.end_stream(self.stream_id)
            mux.flush()
        elif mux is None:
            self._finish_error()

    def _finish_error(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if self._misdirected is not None:
                transport.write(self._misdirected)
            transport.close()

    def fail(self, status: int, code: str, message: str) -> None:
        """Answer with a JSON error (only before any response byte) and close."""
        self._state = _DONE
        self._cancel_timer()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if not self._responded:
                self._responded = True
                transport.write(error_response(status, code, message))
            transport.close()

    # -- stream events ---------------------------------------------------------------------------
    def receive_from_peer(self, data: bytes) -> None:
        self._responded = True
        self.activity += 1
        super().receive_from_peer(data)

    def idle_check(self) -> bool:
        """True when nothing moved either way since the previous check (the sweep closes it)."""
        idle = self.activity == self._seen_activity
        self._seen_activity = self.activity
        return idle

    def peer_ended(self) -> None:
        self._peer_eof = True
        transport = self.transport
        if transport is None:
            return
        if self._state == _TUNNEL and not self._local_eof:
            if transport.can_write_eof():
                transport.write_eof()  # WebSocket/raw tunnel: keep TCP half-close semantics
            return
        # HTTP: the service closed its side, so this connection is over.
        self._finish_error()

    def peer_reset(self, code: ResetCode) -> None:
        if not self._responded and code in (ResetCode.CONNECT_REFUSED, ResetCode.CONNECT_FAILED):
            self.fail(
                502,
                "UPSTREAM_CONNECT_FAILED",
                f"Nothing is listening on port {self.port} in sandbox {self.sandbox_id}.",
            )
            self._closed = True
            return
        if not self._responded and code == ResetCode.REFUSED_STREAM:
            self.fail(503, "SANDBOX_BUSY", f"Sandbox {self.sandbox_id} refused a new connection.")
            self._closed = True
            return
        super().peer_reset(code)

    def eof_received(self) -> bool:
        if self.mux is None:
            return False  # nothing routed yet: just close
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self.server.public_connections.discard(self)
        if self.mux is None:
            self._closed = True
            return
        super().connection_lost(exc)
