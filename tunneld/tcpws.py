"""Raw TCP to a sandbox port as a WebSocket binary stream (admin API, issue 11).

Theory of operation
-------------------
``GET /v1/sandboxes/{id}/ports/{port}/tcp`` with ``Upgrade: websocket`` is the raw-TCP endpoint
of tunneld/admin.py for clients that cannot make a custom upgrade (browsers, most WebSocket
libraries). The route, the ``direct`` stream, the wait for the agent's ACK before the ``101`` and
the JSON pages before it are tunneld/direct.py's (``DirectEndpoint``); this module adds the RFC 6455
handshake and terminates the WebSocket at the edge with wsproto (sans-IO), so the sandbox's
service sees plain TCP:

* client -> service: each binary message's payload is relayed as it arrives, frame by frame
  (wsproto hands out partial messages; a message is never assembled, so any size works in
  bounded memory). The socket is read only while the stream has credit (the base class pauses
  it), so a fast client is held back by the service's pace. An **empty binary message** is the
  client's half-close: the service reads EOF and may still answer (a WebSocket has no
  half-close of its own).
* service -> client: each chunk of tunnel data goes out as one binary message (at most one
  tunnel frame, 64 KiB); credit goes back only while the client's socket is below its
  high-water mark, so a slow reader holds the stream window and nothing more.
* ends: the service's FIN, after its data, is a Close 1000; a reset of the stream is a Close
  1011, never 1000; a text message is a Close 1003 and a reset towards the service, as is a
  WebSocket protocol error (its own code). A client's Close is its end (FIN to the service);
  the edge answers it once the service has ended too, or resets the stream when the service
  still sends (its bytes could no longer be delivered). A TCP end without a Close resets the
  stream. A close handshake the other side does not finish within ``CLOSE_TIMEOUT`` ends the
  connection anyway.
* pings are answered with pongs; while the client does not read, only the latest ping's pong
  is kept (RFC 6455 5.5.3), so pings cannot grow a buffer either.

Authentication: ``Authorization: Bearer <token>`` as every admin request, or, for browsers
(which cannot set headers on a WebSocket), the subprotocol ``tunneld.bearer.<token as base64url
without padding>`` offered next to ``tunneld.tcp``; it is compared in constant time, accepted on
this endpoint only, and never echoed (the ``101`` selects ``tunneld.tcp``).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
from typing import TYPE_CHECKING, Final

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.utilities import generate_accept_token

from protocol.errors import ResetCode
from relay.httpapi import ApiError
from relay.mux import StreamEndpoint

from .direct import DirectEndpoint

if TYPE_CHECKING:
    from relay.httpapi import Request
    from relay.mux import MuxProtocol

__all__ = [
    "BEARER_PREFIX",
    "CLOSE_TIMEOUT",
    "SUBPROTOCOL",
    "WebSocketTcpEndpoint",
    "accept_response",
    "split_subprotocols",
    "verify_subprotocol_bearer",
    "without_bearer",
]

log = logging.getLogger("tunneld.admin")

SUBPROTOCOL: Final = "tunneld.tcp"
BEARER_PREFIX: Final = "tunneld.bearer."
_SUBPROTOCOL: Final = SUBPROTOCOL.encode()
_BEARER: Final = BEARER_PREFIX.encode()
# How long the edge waits for the other side to finish a close handshake it started (the
# client's Close reply, or the service's end after the client's Close): websockets' default.
CLOSE_TIMEOUT: Final = 10.0

# RFC 6455 7.4.1 close codes
NORMAL: Final = 1000
GOING_AWAY: Final = 1001
PROTOCOL_ERROR: Final = 1002
UNSUPPORTED_DATA: Final = 1003
NO_STATUS: Final = 1005
INTERNAL_ERROR: Final = 1011
# A client Close with one of these ends its side normally (FIN); any other code is an abort.
_NORMAL_CLOSES: Final = frozenset({NORMAL, GOING_AWAY, NO_STATUS})


def split_subprotocols(value: bytes) -> list[bytes]:
    """The items of one ``Sec-WebSocket-Protocol`` line, a comma list (RFC 9110 5.6.1): split at
    ``,``, optional whitespace (SP, HTAB) stripped, empty items left out. Both readers of the
    header use it: the edge's own (:func:`verify_subprotocol_bearer`, :func:`accept_response`)
    and the wsConnect relay's (:func:`without_bearer`)."""
    return [item for item in (raw.strip(b" \t") for raw in value.split(b",")) if item]


def _offered(request: Request) -> list[bytes]:
    """The subprotocols the client offered (every ``Sec-WebSocket-Protocol`` line)."""
    out: list[bytes] = []
    for name, value in request.headers:
        if name == b"sec-websocket-protocol":
            out += split_subprotocols(value)
    return out


def without_bearer(value: bytes) -> bytes:
    """One ``Sec-WebSocket-Protocol`` line for a sandbox's server (wsConnect): without any item
    that holds ``tunneld.bearer.`` in any case, anywhere in it (``TUNNELD.BEARER.x``,
    ``"tunneld.bearer.x"``, ``chat tunneld.bearer.x``, after a no-break space...); ``b""`` when
    nothing is left, and the line unchanged when it holds none.

    Deliberately looser than what authenticates: subprotocol names are tokens (RFC 6455 4.1,
    ``1#token``) that the edge, as browsers, compares exactly, so only
    ``tunneld.bearer.<token>`` spelled so is a bearer offer (:func:`verify_subprotocol_bearer`);
    but some servers fold case, the admin token in any spelling is no business of a sandbox's
    service, and no real subprotocol is named so."""
    if _BEARER not in value.lower():
        return value
    return b", ".join(item for item in split_subprotocols(value) if _BEARER not in item.lower())


def is_websocket(request: Request) -> bool:
    return (request.header(b"upgrade") or b"").strip().lower() == b"websocket"


def verify_subprotocol_bearer(expected: str, request: Request) -> bool:
    """Constant-time check of a ``tunneld.bearer.<base64url token>`` subprotocol (browsers)."""
    if not expected or not is_websocket(request):
        return False
    want = _BEARER + base64.urlsafe_b64encode(expected.encode()).rstrip(b"=")
    ok = False
    for offered in _offered(request):
        if offered.startswith(_BEARER):  # case-sensitive: a subprotocol name is a token
            ok |= hmac.compare_digest(offered, want)
    return ok


def accept_response(request: Request) -> bytes:
    """The ``101`` for a valid RFC 6455 opening handshake (sent once the agent connected), or
    ``ApiError`` before any stream is opened."""
    tokens = {t.strip() for t in (request.header(b"connection") or b"").lower().split(b",")}
    if b"upgrade" not in tokens:
        raise ApiError(400, "INVALID_HANDSHAKE", "A WebSocket handshake needs Connection: Upgrade.")
    if (request.header(b"sec-websocket-version") or b"").strip() != b"13":
        raise ApiError(
            426,
            "UNSUPPORTED_WEBSOCKET_VERSION",
            "Only WebSocket version 13 (RFC 6455) is supported.",
            [("sec-websocket-version", "13")],
        )
    key = (request.header(b"sec-websocket-key") or b"").strip()
    try:
        valid = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid = False
    if not valid:
        raise ApiError(400, "INVALID_HANDSHAKE", "Sec-WebSocket-Key must be 16 bytes in base64.")
    head = (
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        b"sec-websocket-accept: " + generate_accept_token(key) + b"\r\n"
    )
    if _SUBPROTOCOL in _offered(request):
        head += b"sec-websocket-protocol: " + _SUBPROTOCOL + b"\r\n"
    return head + b"\r\n"


class WebSocketTcpEndpoint(DirectEndpoint):
    """The admin client's WebSocket after the ``101``, relayed as raw bytes to the stream (see
    the module docstring)."""

    __slots__ = ("_close_code", "_message_size", "_open", "_pong", "_ws")

    def __init__(self, mux: MuxProtocol, stream_id: int, accept: bytes) -> None:
        super().__init__(mux, stream_id, upgrade=accept)
        self._ws = Connection(ConnectionType.SERVER)
        self._open = False  # the 101 went out: from here the connection speaks WebSocket
        self._message_size = 0  # payload bytes of the binary message being received
        self._pong: bytes | None = None  # the pong owed while the socket is above its mark
        self._close_code = NORMAL  # the client's Close code, echoed in the reply

    # -- the agent connected: 101 ----------------------------------------------------------------
    def peer_accepted(self) -> None:
        pending = self.upgrade is not None and not self._responded
        super().peer_accepted()
        if pending and self._responded and not self._closed:
            self._open = True

    # -- client -> service -----------------------------------------------------------------------
    def forward(self, data: memoryview | bytes) -> None:
        ws = self._ws
        if ws.state is ConnectionState.CLOSED or self.transport is None:
            return
        ws.receive_data(bytes(data))
        for event in ws.events():
            if isinstance(event, BytesMessage):
                if self._closed:
                    continue  # the stream is gone: wait for the client's Close
                self._message_size += len(event.data)
                if event.data:
                    if self._local_eof:
                        self._fail(PROTOCOL_ERROR, "data after the half-close (an empty message)")
                        continue
                    StreamEndpoint.forward(self, bytes(event.data))
                if event.message_finished:
                    if self._message_size == 0:
                        self._half_close()
                    self._message_size = 0
            elif isinstance(event, TextMessage):
                self._fail(UNSUPPORTED_DATA, "text messages are not relayed; send binary")
            elif isinstance(event, Ping):
                self._send_pong(bytes(event.payload))
            elif isinstance(event, CloseConnection):
                if ws.state is ConnectionState.OPEN:  # wsproto's verdict on a protocol error
                    self._fail(event.code, event.reason or "")
                else:
                    self._client_closed(event)

    def _half_close(self) -> None:
        if not self._local_eof and not self._closed:
            self._local_eof = True
            mux = self.mux
            if not mux.session.closed:
                mux.session.end_stream(self.stream_id)
                mux.flush()

    def _client_closed(self, event: CloseConnection) -> None:
        ws = self._ws
        if ws.state is ConnectionState.CLOSED:  # the reply to our Close: the handshake is done
            self._half_close()
            self._close_socket()
            return
        # The client ends the connection; wsproto cannot send data any more (REMOTE_CLOSING).
        self._close_code = event.code if event.code in _NORMAL_CLOSES else NORMAL
        if event.code not in _NORMAL_CLOSES:
            self._reset_stream()  # the client aborted: the service sees a reset, not an end
        else:
            self._half_close()
        if self._closed or self._peer_eof:
            self._reply_close(event.code)
        else:  # the service may still be flushing what it has: wait for its FIN
            self._arm_close_timer()

    def _reply_close(self, code: int) -> None:
        if self._ws.state is ConnectionState.REMOTE_CLOSING and self.transport is not None:
            if code == NO_STATUS:
                code = NORMAL
            self.transport.write(self._ws.send(CloseConnection(code=code)))
        self._close_socket()

    # -- service -> client -----------------------------------------------------------------------
    def receive_from_peer(self, data: bytes) -> None:
        self._responded = True
        transport = self.transport
        if transport is None or self._closed:
            return
        if self._ws.state is not ConnectionState.OPEN:
            # The client closed: these bytes can no longer reach it, so the service must not
            # take its output for delivered.
            self._reset_stream()
            self._reply_close(self._close_code)
            return
        transport.write(self._ws.send(BytesMessage(data=data)))
        if self._write_paused:
            self._held_credit += len(data)
        else:
            self.mux.session.acknowledge(self.stream_id, len(data))

    def peer_ended(self) -> None:
        if not self._open:
            super().peer_ended()
            return
        self._peer_eof = True
        if self._ws.state is ConnectionState.REMOTE_CLOSING:
            self._reply_close(self._close_code)
        else:
            self._send_close(NORMAL, "")

    def peer_reset(self, code: ResetCode) -> None:
        if not self._open:
            super().peer_reset(code)  # before the 101: the JSON page
            return
        self._closed = True  # the mux forgot the stream
        self._cancel_timer()
        log.info("admin raw TCP (WebSocket): stream reset (%s)", code.name)
        if self._ws.state is ConnectionState.REMOTE_CLOSING:
            self._reply_close(INTERNAL_ERROR)
        else:
            self._send_close(INTERNAL_ERROR, f"the connection was reset ({code.name})")

    def eof_received(self) -> bool:
        if not self._open:
            return super().eof_received()
        return False  # a TCP end without a close handshake: connection_lost resets the stream

    def resume_writing(self) -> None:
        pong, self._pong = self._pong, None
        if pong is not None:
            self._send_pong(pong)
        super().resume_writing()

    # -- helpers ---------------------------------------------------------------------------------
    def _send_pong(self, payload: bytes) -> None:
        if self._write_paused:
            self._pong = payload  # only the latest (RFC 6455 5.5.3)
        elif self.transport is not None and self._ws.state is ConnectionState.OPEN:
            self.transport.write(self._ws.send(Pong(payload=payload)))

    def _send_close(self, code: int, reason: str) -> None:
        """Start the close handshake; the client's reply (or the timeout) closes the socket."""
        if self._ws.state is not ConnectionState.OPEN or self.transport is None:
            return
        self.transport.write(self._ws.send(CloseConnection(code=code, reason=reason or None)))
        self._arm_close_timer()
        if self._closed:
            # nothing goes to the stream any more: read on, so that the client's Close arrives
            self.transport.resume_reading()

    def _fail(self, code: int, reason: str) -> None:
        """The client broke the stream's rules: reset towards the service, Close ``code``."""
        self._reset_stream()
        self._send_close(code, reason)

    def _reset_stream(self) -> None:
        if self._closed:
            return
        self._closed = True
        mux = self.mux
        if mux.streams.pop(self.stream_id, None) is not None and not mux.session.closed:
            mux.session.reset_stream(self.stream_id, ResetCode.CANCEL)
            mux.flush()

    def _arm_close_timer(self) -> None:
        self._cancel_timer()
        self._timer = self.mux.loop.call_later(CLOSE_TIMEOUT, self._close_timed_out)

    def _close_timed_out(self) -> None:
        self._timer = None
        self._close_socket()  # connection_lost resets a stream that did not end both ways

    def _close_socket(self) -> None:
        self._cancel_timer()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
