"""HTTP/2 on the public HTTPS listener (ALPN ``h2``), served with the sans-IO ``h2`` library.

Theory of operation
-------------------
An HTTPS client that chose ``h2`` gets an ``H2PublicConnection`` instead of an HTTP/1.1
``PublicConnection``. Each HTTP/2 request stream becomes one tunnel stream that speaks HTTP/1.1
to the sandbox's service, as nginx does, and everything HTTP/1.1 decides is decided by the same
code: every request stream is an ``H2Stream``, a ``PublicConnection`` whose "socket" is the h2
stream (``_StreamTransport``). It is fed one HTTP/1.1 request built from the h2 request
(``request_head``: ``:method :path HTTP/1.1``, ``Host:`` from ``:authority``, the other fields,
``Connection: close``, the body as ``Content-Length`` or chunked), so routing by Host, the
404/421/429/503 pages, the per-sandbox stream budget and per-IP 404 budget, ``forward_head``'s
rebuild (``Host: localhost:{port}``, ``X-Forwarded-*``, ``X-Sandbox-Name``, internal and ``_``
names dropped), the access log, cluster forwarding and UNEXPOSED resets are those of HTTP/1.1.
What the service answers is parsed with h11 (client side) and sent as HEADERS and DATA
(connection-specific fields dropped, chunked decoded); error pages of the edge take the same path.

One request per tunnel stream: once the response is complete, END_STREAM goes to the client
and FIN to the service (which was told ``Connection: close``); the tunnel stream is reset if
the service has not closed within ``FINISH_GRACE``.

Flow control is tied to the tunnel's credit both ways, so nothing is buffered without bound:

* service -> client: DATA is sent only within the h2 stream and connection windows and while
  the TLS transport is below its high-water mark. What does not fit waits in the stream's
  queue; past ``STREAM_HIGH_WATER`` the stream endpoint is told ``pause_writing`` and holds the
  tunnel credit (exactly as for a slow HTTP/1.1 socket), so the agent stops sending. At most
  ``STREAM_HIGH_WATER`` plus one tunnel stream window is queued per stream.
* client -> service: DATA is handed to the tunnel stream while it takes it (``pause_reading``
  stops that); the h2 window is acknowledged (``acknowledge_received_data``) only for bytes the
  tunnel took, so a client can have at most ``STREAM_WINDOW`` per stream and ``CONNECTION_WINDOW``
  in total buffered here.
* ``MAX_CONCURRENT_STREAMS`` (``h2_max_streams``) and ``MAX_HEADER_LIST_SIZE`` (the HTTP/1.1 head
  limit) bound streams and heads; output a client provokes without reading (PING, SETTINGS
  acknowledgements) stops reading from it past ``OUTPUT_CAP``.

An abnormal end stays abnormal: a response cut short (the tunnel stream reset, the service gone
before the body's end) is RST_STREAM ``INTERNAL_ERROR``, never END_STREAM.

A malformed request is a stream error (RFC 9113 8.1.1), not a connection error: h2's header
checks run per request (``malformed``), and a request that fails them is answered ``400`` on its
stream (a body still coming is refused with ``RST_STREAM(PROTOCOL_ERROR)``) and never reaches the
service; malformed trailers cut their request (RST_STREAM, the tunnel stream reset before the
request's end), as do trailers without END_STREAM. The same goes for a ``content-length`` that is
no number (or not 0 on a request ended with its headers) and a ``:status`` (a 1xx too) in a
request, which h2 would make connection errors, as it would trailers without END_STREAM
(``_RequestStream``); DATA that contradicts the ``content-length`` (more bytes,
or END_STREAM short of it) is counted here, per stream: none past it reaches the service, and
the request is cut (RST_STREAM(PROTOCOL_ERROR), the tunnel stream reset), or answered 400 if it
has not gone to the service yet. Each cut takes from the budget of client resets (``resets``).
The other streams of the connection go on. What h2 itself raises stays a connection error
(GOAWAY, the close): a header block HPACK cannot decode (``COMPRESSION_ERROR``), one past
``MAX_HEADER_LIST_SIZE`` (``ENHANCE_YOUR_CALM``), framing and stream-state errors (a stream's
WINDOW_UPDATE of 0 and a stream depending on itself too, though the RFC says stream errors: h2
raises them from its frame parsing and handling). h2's own stream errors (DATA or HEADERS on a
stream the client ended, STREAM_CLOSED; a stream window past its limit) reset that stream
alone, and its tunnel stream with it, as a client's reset does.

WebSockets over HTTP/2 (RFC 8441): ``SETTINGS_ENABLE_CONNECT_PROTOCOL`` is sent, and an extended
CONNECT with ``:protocol websocket`` becomes an HTTP/1.1 upgrade request (``GET``, ``Upgrade:
websocket``, a fresh ``Sec-WebSocket-Key``); the service's ``101`` becomes ``:status 200`` and
from then on DATA frames are relayed raw both ways (END_STREAM <-> FIN).

The connection counts once against ``max_connections`` and ``max_connections_per_ip`` (its
``PublicTlsConnection`` is what the edge's set of public connections holds); a refused one is
answered 503 ``TOO_MANY_CONNECTIONS`` on its first stream, then GOAWAY. Each further stream open
at once counts against ``max_connections_per_ip`` too, as the HTTP/1.1 connection it stands for
would: what the edge may hold for one client IP (a stream window and a queue per stream) stays
what it is with HTTP/1.1, instead of ``h2_max_streams`` times that per connection. A stream past
the limit is refused with ``RST_STREAM(REFUSED_STREAM)``, which clients retry.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
from collections import deque
from typing import TYPE_CHECKING, Any, Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
import h2.utilities
import h11
import hpack

from relay.mux import DeferredFlush, StreamEndpoint, peer_hung_up

from .accesslog import ConnectionLog
from .budget import RequestBudget
from .httphead import MAX_HEAD_SIZE, HeadParser
from .public import PublicConnection, error_response, stalled_close_period
from .responses import MAX_RESPONSE_HEAD

if TYPE_CHECKING:
    from .edge import EdgeServer

__all__ = ["H2PublicConnection", "H2Stream", "PublicTlsConnection", "request_head"]

log = logging.getLogger("tunneld.h2")

STREAM_WINDOW: Final = 256 * 1024  # SETTINGS_INITIAL_WINDOW_SIZE (client -> edge, per stream)
CONNECTION_WINDOW: Final = 1024 * 1024  # the connection's receive window
STREAM_HIGH_WATER: Final = 64 * 1024  # response bytes queued per stream before credit is held
STREAM_LOW_WATER: Final = 16 * 1024
TLS_HIGH_WATER: Final = 256 * 1024  # the TLS transport: DATA stops above this
TLS_LOW_WATER: Final = 64 * 1024
OUTPUT_CAP: Final = 1024 * 1024  # unsent output past which the client is not read
FINISH_GRACE: Final = 2.0  # seconds the service has to close after a complete response
GOAWAY_LINGER: Final = 1.0  # seconds a connection stays open (reading, ignoring) after GOAWAY

_TOKEN: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TARGET: Final = re.compile(rb"/[\x21-\x7e\x80-\xff]*")
_AUTHORITY: Final = re.compile(rb"[\x21-\x7e]+")
# Response fields that mean something only to one HTTP/1.1 connection (RFC 9113 8.2.2).
_HOP_BY_HOP: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te"}
)
_WEBSOCKET_DROPPED: Final = _HOP_BY_HOP | {b"sec-websocket-accept"}


class BadRequest(Exception):
    """An h2 request that cannot be put into an HTTP/1.1 request line (answered 400)."""


class MalformedRequest(BadRequest):
    """A malformed h2 request (RFC 9113 8.1.1): answered 400, and a request body still coming
    is refused with ``RST_STREAM(PROTOCOL_ERROR)``; the connection serves on."""


_REQUEST_BLOCK: Final = h2.utilities.HeaderValidationFlags(
    is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False
)
_TRAILER_BLOCK: Final = _REQUEST_BLOCK._replace(is_trailer=True)


def malformed(headers: list[tuple[bytes, bytes]], trailer: bool = False) -> str | None:
    """Why a received header block is malformed (RFC 9113 8.2, 8.3), or None: h2's own checks
    (``h2.utilities.validate_headers``: upper-case or invalid names, CR/LF/NUL or surrounding
    whitespace in values, connection-specific fields, ``te`` other than ``trailers``, missing,
    duplicate, unknown or misplaced pseudo-fields, an empty ``:path``, ``host`` differing from
    ``:authority``, pseudo-fields in trailers). They run here, on the event, and not inside h2
    (``validate_inbound_headers`` is off): h2 turns each into a connection error, which would
    cut every other stream of the client's connection. A ``content-length`` must be a number
    (``content_length``), as h2 checks too (a connection error there as well)."""
    try:
        for _ in h2.utilities.validate_headers(
            headers, _TRAILER_BLOCK if trailer else _REQUEST_BLOCK
        ):
            pass
        content_length(headers)
    except (h2.exceptions.ProtocolError, ValueError) as exc:
        why = str(exc)
        return why if len(why) <= 200 else why[:200] + "..."
    return None


def content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """A header block's ``content-length`` (None: there is none). ``ValueError`` if one is no
    number (RFC 9110 8.6: ``1*DIGIT``), too long to be one, or two say different numbers: the
    request is malformed (RFC 9113 8.1.1). h2 would make that a connection error, and so this
    runs here, per request, and not inside h2 (``_RequestStream``)."""
    length: int | None = None
    for name, value in headers:
        if name == b"content-length":
            digits = value.lstrip(b"0") or b"0"
            if not value.isdigit() or len(digits) > 19:  # (ASCII digits; no int of 4000 digits)
                raise ValueError(f"Invalid content-length header: {value!r}")
            number = int(digits)
            if length is not None and number != length:
                raise ValueError(f"Conflicting content-length headers: {length} and {number}")
            length = number
    return length


def request_head(
    headers: list[tuple[bytes, bytes]], ended: bool
) -> tuple[bytes, bytes, bool, bool]:
    """The HTTP/1.1 request head for an h2 request: (head, method, chunked body, websocket).

    The fields are checked first as h2 would (``malformed``: RFC 9113 8.2/8.3, lower-case
    names, no connection-specific fields, no CR/LF/NUL, the pseudo-fields a request needs, a
    ``content-length`` that is a number and, for a request ended with its headers, 0;
    ``MalformedRequest`` otherwise). This adds what an HTTP/1.1 request line and Host need,
    and raises ``BadRequest`` otherwise."""
    why = malformed(headers)
    if why is None and ended and content_length(headers):
        why = "content-length is not 0, but the request ended with its headers"
    if why is not None:
        raise MalformedRequest(f"Malformed HTTP/2 request: {why}")
    pseudo: dict[bytes, bytes] = {}
    fields: list[tuple[bytes, bytes]] = []
    host = b""
    length = False
    for name, value in headers:
        if name[:1] == b":":
            pseudo[name] = value
        elif name == b"host":
            host = value
        else:
            if name == b"content-length":
                length = True
            fields.append((name, value))
    method = pseudo.get(b":method", b"")
    protocol = pseudo.get(b":protocol")
    websocket = False
    if method == b"CONNECT":
        if protocol is None:
            raise BadRequest("CONNECT is not supported on preview URLs.")
        if protocol.lower() != b"websocket":
            raise BadRequest(
                f"Extended CONNECT for {protocol.decode('latin-1')!r} is not supported."
            )
        websocket = True
        method = b"GET"
    authority = pseudo.get(b":authority") or host
    target = pseudo.get(b":path", b"")
    if not _TOKEN.fullmatch(method):
        raise BadRequest("Malformed :method.")
    if not _TARGET.fullmatch(target):
        raise BadRequest("Malformed :path.")
    if not _AUTHORITY.fullmatch(authority):
        raise BadRequest("Missing or malformed :authority.")
    out = [method, b" ", target, b" HTTP/1.1\r\nhost: ", authority, b"\r\n"]
    for name, value in fields:
        if websocket and name == b"sec-websocket-key":
            continue
        out += (name, b": ", value, b"\r\n")
    chunked = False
    if websocket:
        key = base64.b64encode(os.urandom(16))
        out.append(b"connection: upgrade\r\nupgrade: websocket\r\nsec-websocket-key: %s\r\n" % key)
    else:
        out.append(b"connection: close\r\n")
        if not ended and not length:
            chunked = True
            out.append(b"transfer-encoding: chunked\r\n")
    out.append(b"\r\n")
    return b"".join(out), method, chunked, websocket


class PublicTlsConnection(PublicConnection):
    """A public connection over TLS: HTTP/1.1 (``PublicConnection``), or HTTP/2 when ALPN chose
    ``h2``: then the transport's protocol becomes an ``H2PublicConnection`` and this object stays
    what the edge counts and sweeps (``public_connections``, per-IP counts, ``end()``)."""

    __slots__ = ("h2",)

    def __init__(self, server: EdgeServer, parser: HeadParser) -> None:
        super().__init__(server, parser)
        self.h2: H2PublicConnection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
            super().connection_made(transport)
            return
        handler = H2PublicConnection(self)
        self.h2 = handler
        transport.set_protocol(handler)
        handler.connection_made(transport)

    def admit_h2(self, transport: asyncio.Transport) -> bool:
        """The connection limits of HTTP/1.1; False: refused (``fail`` told the handler)."""
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self._peer_ip = str(peer[0])
            self._peer = f"{peer[0]}:{peer[1]}" if ":" not in peer[0] else f"[{peer[0]}]:{peer[1]}"
        if not self._admit():
            return False
        self.server.public_connections.add(self)
        return True

    def fail(self, status: int, code: str, message: str, retry_after: int = 0) -> None:
        if self.h2 is None:
            super().fail(status, code, message, retry_after)
            return
        self.server.metrics.public_refusals.labels(code).inc()
        self.h2.refused = error_response(status, code, message, retry_after)

    def end(self) -> None:
        if self.h2 is None:
            super().end()
        else:
            self.h2.end()

    def close_gracefully(self) -> None:
        if self.h2 is None:
            super().close_gracefully()
        else:
            self.h2.close()

    def close_idle(self) -> None:
        if self.h2 is None:
            super().close_idle()
        else:
            self.h2.close()  # each HTTP/2 stream ends explicitly: a GOAWAY cuts nothing silently

    def idle_check(self) -> bool:
        if self.h2 is None:
            return super().idle_check()
        return self.h2.idle_check()

    def h2_closed(self) -> None:
        """The h2 connection is gone: free its place in the limits."""
        PublicConnection.connection_lost(self, None)


class _ConnectionStateMachine(h2.connection.H2ConnectionStateMachine):
    """h2's, except that a GOAWAY received leaves the connection open."""

    _transitions = {
        **h2.connection.H2ConnectionStateMachine._transitions,
        (h2.connection.ConnectionState.SERVER_OPEN, h2.connection.ConnectionInputs.RECV_GOAWAY): (
            None,
            h2.connection.ConnectionState.SERVER_OPEN,
        ),
    }


class _CompressionError(h2.exceptions.ProtocolError):
    """A header block HPACK cannot decode: the connection's decoding state is lost with it, a
    connection error of type COMPRESSION_ERROR (RFC 9113 4.3); h2 says PROTOCOL_ERROR."""

    error_code = h2.errors.ErrorCodes.COMPRESSION_ERROR


class _Decoder(hpack.Decoder):
    """hpack's decoder, whose decoding errors (not a header list past its size, which h2 makes
    ENHANCE_YOUR_CALM) are ``_CompressionError``s, which h2 passes on as they are."""

    def decode(self, data: bytes, raw: bool = False) -> Any:
        try:
            return super().decode(data, raw)
        except hpack.OversizedHeaderListError:
            raise
        except (hpack.HPACKError, IndexError, TypeError, UnicodeDecodeError) as exc:
            raise _CompressionError(f"Error decoding header block: {exc}") from exc


# the states in which a client's HEADERS after its request's are trailers (h2's state machine)
_RECEIVING: Final = (h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_LOCAL)


class _RequestStream(h2.stream.H2Stream):
    """h2's stream, less three checks h2 turns into connection errors (GOAWAY: every other
    stream of the client's connection cut) where RFC 9113 8.1.1 says the request is malformed,
    a stream error. The edge makes them per stream instead:

    * ``content-length``: h2 raises on one that is no number (``_initialize_content_length``)
      and on DATA that contradicts it (``InvalidBodyLengthError``, from inside its frame
      handling: the connection is closed then, and the events of that read are lost). Here h2
      counts nothing (``_expected_content_length`` stays None); ``malformed`` checks the value
      and ``_StreamTransport`` counts the DATA (``client_data``, ``client_ended``).
    * a ``:status`` in a request: h2 takes a ``1xx`` for an informational response, which a
      server never receives (an invalid stream state, a connection error). h2 sees it with an
      empty value; the event gets the real one, and ``malformed`` answers it 400.
    * trailers without END_STREAM (RFC 9113 8.1: a HEADERS frame after the first one must end
      the stream): h2 raises (a ``ProtocolError`` from inside its frame handling). Here they
      are a ``TrailersReceived`` whose ``stream_ended`` is None, made without h2's state
      machine (which would trip on an assertion at a further HEADERS on the stream, still
      open), and so is each HEADERS the client sends on the stream after them, until the
      stream closes (``_on_trailers`` answers the first with RST_STREAM)."""

    def _initialize_content_length(self, headers: Any) -> None:
        self._expected_content_length = None

    def receive_headers(
        self, headers: Any, end_stream: bool, header_encoding: bool | str | None
    ) -> tuple[list[Any], list[Any]]:
        block = list(headers)
        machine = self.state_machine
        if (
            machine.headers_received
            and machine.state in _RECEIVING
            and (not end_stream or machine.trailers_received)
        ):
            # trailers without END_STREAM, or a HEADERS after them (h2: an assertion)
            machine.trailers_received = True
            trailers = h2.events.TrailersReceived(stream_id=self.stream_id)
            trailers.headers = block  # (stream_ended None: ``_on_trailers`` cuts the request)
            return [], [trailers]
        statuses = [value for name, value in block if name == b":status"]
        if not statuses:
            return super().receive_headers(block, end_stream, header_encoding)
        hidden = [(name, b"" if name == b":status" else value) for name, value in block]
        frames, events = super().receive_headers(hidden, end_stream, header_encoding)
        event = events[0]
        if isinstance(event, (h2.events.RequestReceived, h2.events.TrailersReceived)):
            values = iter(statuses)  # (h2 keeps the fields' order)
            event.headers = [
                (name, next(values) if name == b":status" else value)
                for name, value in event.headers
            ]
        return frames, events


class _H2Connection(h2.connection.H2Connection):
    """h2's connection, except that the client's GOAWAY stops only new streams (RFC 9113 6.8).
    h2 closes the connection on it (python-hyper/h2#1181): it drops the output not yet taken
    and refuses to send another frame, so the responses of the streams the client still has
    open would stop short, silently. HPACK errors end the connection with COMPRESSION_ERROR.

    It does not check received header blocks (``validate_inbound_headers``): h2 makes every
    malformed request a connection error (GOAWAY), where RFC 9113 8.1.1 says a stream error.
    ``malformed`` runs the same checks on each request and trailer block instead. Its streams
    are ``_RequestStream``s: no ``content-length``, ``:status`` or unended-trailers connection
    errors either."""

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config)
        self.state_machine = _ConnectionStateMachine()
        decoder = _Decoder(self.decoder.max_header_list_size)
        decoder.max_allowed_table_size = self.decoder.max_allowed_table_size
        self.decoder = decoder

    def clear_outbound_data_buffer(self) -> None:
        """Kept: what is queued (DATA of open streams, acknowledgements) still goes out."""

    def _begin_new_stream(
        self, stream_id: int, allowed_ids: h2.connection.AllowedStreamIDs
    ) -> h2.stream.H2Stream:
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        stream.__class__ = _RequestStream  # (h2 makes its own class; this one adds no state)
        return stream


class H2PublicConnection(DeferredFlush, asyncio.Protocol):
    """One HTTP/2 client connection (see the module docstring). Its ``schedule_flush``: the
    responses of many streams that arrive in one read of the tunnel leave in one TLS write."""

    def __init__(self, entry: PublicTlsConnection) -> None:
        self.entry = entry
        self.server = entry.server
        self.loop = entry.server.loop
        config = entry.server.config
        self.h2 = _H2Connection(
            h2.config.H2Configuration(
                client_side=False, header_encoding=None, validate_inbound_headers=False
            )
        )
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: config.h2_max_streams,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEAD_SIZE,
                h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1,
            },
        )
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _StreamTransport] = {}
        self.refused: bytes | None = None  # the 503 page of a connection past the limits
        self.client_gone = False  # the client sent GOAWAY
        # streams the client may reset before their response is complete: a token bucket of
        # h2_max_streams per second, bursts of twice that
        self.resets = RequestBudget(
            config.h2_max_streams, 2 * config.h2_max_streams, self.loop.time()
        )
        self.closed = False
        self._flush_scheduled = False
        self._write_paused = False
        self._read_paused = False
        self._waiting: set[_StreamTransport] = set()  # streams with output to send
        self.activity = 0
        self._seen_activity = -1
        self._timer: asyncio.TimerHandle | None = None
        self._timer_activity = -1
        self._hangup_look: asyncio.TimerHandle | None = None  # (``_look_for_hang_up``)

    # -- connection ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = transport  # type: ignore[assignment]
        assert self.transport is not None
        self.transport.set_write_buffer_limits(high=TLS_HIGH_WATER, low=TLS_LOW_WATER)
        admitted = self.entry.admit_h2(t)  # type: ignore[arg-type]
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()
        self._arm_timer(self.server.config.head_timeout if admitted else 1.0)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.activity += 1
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # a connection error: h2 has queued its GOAWAY (with the error's code)
            log.info("%s: HTTP/2 protocol error: %s", self.entry._peer, exc)
            self._terminate(exc.error_code)
            return
        for event in events:
            if self.closed:
                break
            if isinstance(event, h2.events.RequestReceived):
                self._on_request(event)
            elif isinstance(event, h2.events.DataReceived):
                self._on_data(event)
            elif isinstance(event, h2.events.TrailersReceived):
                self._on_trailers(event)
            elif isinstance(event, h2.events.StreamEnded):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.client_ended()
            elif isinstance(event, h2.events.StreamReset):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    if not stream.response_done and not self.resets.take(self.loop.time()):
                        # "rapid reset" (CVE-2023-44487): each request costs a tunnel stream
                        log.warning(
                            "%s: HTTP/2 client resets too many streams; closing", self.entry._peer
                        )
                        self._terminate(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, linger=True)
                        return
                    stream.client_reset()
            elif isinstance(event, h2.events.WindowUpdated):
                if event.stream_id:
                    stream = self.streams.get(event.stream_id)
                    if stream is not None and stream.outbound:
                        self._waiting.add(stream)
                else:
                    self._waiting.update(s for s in self.streams.values() if s.outbound)
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                self._waiting.update(s for s in self.streams.values() if s.outbound)
            elif isinstance(event, h2.events.ConnectionTerminated):
                # the client's GOAWAY: no new streams; the open ones may finish
                self.client_gone = True
                if not self.streams:
                    self.close()
                    return
        self.flush()

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        ended = event.stream_ended is not None
        if self.refused is not None:
            self._send_page(sid, self.refused)
            self.close()
            return
        counted = bool(self.streams)  # the connection itself stands for its first stream
        if counted and not self._count_stream():
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        stream = _StreamTransport(self, sid)
        stream.counted_ip = self.entry._peer_ip if counted else None
        self.streams[sid] = stream
        endpoint = H2Stream(self.server, self.entry.parser)
        endpoint._peer, endpoint._peer_ip = self.entry._peer, self.entry._peer_ip
        stream.protocol = endpoint
        endpoint.connection_made(stream)  # type: ignore[arg-type]  # a transport by duck typing
        self._cancel_timer()
        headers = list(event.headers)
        try:
            head, method, chunked, websocket = request_head(headers, ended)
        except BadRequest as exc:
            if isinstance(exc, MalformedRequest):
                log.info("HTTP/2 stream %d of %s: %s", sid, self.entry._peer, exc)
                stream.malformed = True
            stream.start(b"GET", False, False)
            endpoint.fail(400, "BAD_REQUEST", str(exc))
            return
        stream.start(method, chunked, websocket)
        stream.expected = content_length(headers)  # (a number: request_head checked it)
        endpoint.deliver(head)
        if self._hangup_look is None:
            self._hangup_look = self.loop.call_later(
                stalled_close_period(self.server.config), self._look_for_hang_up
            )

    def _on_trailers(self, event: h2.events.TrailersReceived) -> None:
        """Trailers are not relayed (the service gets a chunked body's end without them), but
        malformed ones make the request malformed: it is cut, never completed. So do trailers
        without END_STREAM (RFC 9113 8.1), which ``_RequestStream`` hands on with no
        ``stream_ended``, as it does any HEADERS after them (one cut, one charge, per stream):
        a stream already closing (reset, or its complete response waiting for the client's
        window) ends as it would, its request's rest refused with PROTOCOL_ERROR."""
        unended = event.stream_ended is None
        if unended:
            why: str | None = "trailers without END_STREAM"
        else:
            why = malformed(list(event.headers), trailer=True)
        if why is None:
            return
        sid = event.stream_id
        log.info("HTTP/2 stream %d of %s: malformed trailers: %s", sid, self.entry._peer, why)
        stream = self.streams.get(sid)
        if stream is not None and unended and stream.closing:
            stream.malformed = True  # (RST_STREAM PROTOCOL_ERROR after END_STREAM, not NO_ERROR)
        elif stream is not None:
            self.cut_malformed(stream)
        else:
            try:
                self.h2.reset_stream(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            except h2.exceptions.ProtocolError:
                pass

    def cut_malformed(self, stream: _StreamTransport) -> None:
        """Cut a malformed request the service has (malformed trailers, DATA that contradicts
        the content-length): ``malformed_input``. Each costs a tunnel stream, as a request the
        client resets does, and takes from the same budget (``resets``): a client that makes
        the edge cut too many is closed with ENHANCE_YOUR_CALM, as one that resets too many."""
        if not stream.response_done and not self.resets.take(self.loop.time()):
            log.warning(
                "%s: HTTP/2 client sends too many malformed requests; closing", self.entry._peer
            )
            self._terminate(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, linger=True)
            return
        stream.malformed_input()

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.finished_input:
            # nobody takes it (the stream is over on our side): free its window at once
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            return
        stream.client_data(event.data, event.flow_controlled_length)

    def _send_page(self, sid: int, page: bytes) -> None:
        """An edge answer (HTTP/1.1 bytes of ``error_response``) as one h2 response."""
        head, _, body = page.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = lines[0].split(b" ")[1]
        headers = [(b":status", status)]
        for line in lines[1:]:
            name, _, value = line.partition(b": ")
            if name.lower() not in _HOP_BY_HOP:
                headers.append((name.lower(), value))
        try:
            self.h2.send_headers(sid, headers)
            self.h2.send_data(sid, body, end_stream=True)
        except h2.exceptions.ProtocolError:
            pass

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._read_paused and self.transport is not None and not self.closed:
            self._read_paused = False
            self.transport.resume_reading()
        self._waiting.update(s for s in self.streams.values() if s.outbound)
        self.flush()

    def eof_received(self) -> bool:
        """The client is done (its ``close_notify``, or a FIN): the TLS layer closes the
        connection after this, by itself, whatever it returns, and the rest it holds waits for
        the client. That close is watched as the edge's own (``_close_transport``): a client
        that takes none of it for a look of the watch is reset, one that keeps reading gets
        it all; streams still open when it ends are reset towards their services then."""
        if self.transport is not None:
            self.entry._watch_close(self.transport)
        return False

    def _look_for_hang_up(self) -> None:
        """Every look of the watch's period while streams are open: has the client sent its
        FIN? uvloop's TLS layer ends the connection on it without a word to this protocol (no
        ``eof_received``: it keeps that for ``close_notify``), and where no idle sweep runs
        and a stream has no timer of its own (a WebSocket), nothing else would ever watch that
        close. The kernel says it (``POLLRDHUP``), whatever the loop."""
        self._hangup_look = None
        transport = self.transport
        if self.closed or transport is None or not self.streams:
            return
        if peer_hung_up(transport):
            self.entry._watch_close(transport)  # as at eof_received
            return
        self._hangup_look = self.loop.call_later(
            stalled_close_period(self.server.config), self._look_for_hang_up
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        if self._hangup_look is not None:
            self._hangup_look.cancel()
            self._hangup_look = None
        for stream in list(self.streams.values()):
            self._uncount_stream(stream)
            stream.connection_gone()
        self.streams.clear()
        self._waiting.clear()
        self.entry.h2_closed()

    # -- output ----------------------------------------------------------------------------------
    def flush(self) -> None:
        transport = self.transport
        if transport is None or self.closed:
            return
        if self._waiting and not self._write_paused:
            waiting, self._waiting = list(self._waiting), set()
            for i, stream in enumerate(waiting):
                if self._write_paused:
                    self._waiting.update(waiting[i:])
                    break
                stream.send_pending()  # (adds itself back while output waits for a window)
                data = self.h2.data_to_send()
                if data:
                    transport.write(data)
        data = self.h2.data_to_send()
        if data:
            transport.write(data)
        if (
            self._write_paused
            and not self._read_paused
            and transport.get_write_buffer_size() > OUTPUT_CAP
        ):
            self._read_paused = True
            transport.pause_reading()
            log.warning("%s: HTTP/2 client does not read what it asks for", self.entry._peer)

    def _count_stream(self) -> bool:
        """One more stream of this client IP, if ``max_connections_per_ip`` allows it."""
        server = self.server
        per_ip = server.public_limits.per_ip
        ip = self.entry._peer_ip
        count = per_ip.get(ip, 0)
        if count >= server.config.max_connections_per_ip:
            server.metrics.public_refusals.labels(code="TOO_MANY_CONNECTIONS").inc()
            return False
        per_ip[ip] = count + 1
        return True

    def _uncount_stream(self, stream: _StreamTransport) -> None:
        ip, stream.counted_ip = stream.counted_ip, None
        if ip is not None:
            self.server.public_limits.release(ip)

    def stream_done(self, stream: _StreamTransport) -> None:
        self._uncount_stream(stream)
        if self.streams.get(stream.sid) is stream:
            del self.streams[stream.sid]
        self._waiting.discard(stream)
        if not self.streams and not self.closed:
            if self.client_gone:
                self.close()
            else:
                self._arm_timer(self.server.config.keepalive_timeout)

    # -- ends ------------------------------------------------------------------------------------
    def close(self) -> None:
        """GOAWAY and close (streams still open are reset by the close)."""
        if self.closed or self.transport is None:
            return
        self._terminate(h2.errors.ErrorCodes.NO_ERROR, linger=True)

    def end(self) -> None:
        """Edge shutdown: live streams are reset, then GOAWAY and close at once (a connection
        lingering after its GOAWAY is closed now too)."""
        transport = self.transport
        if self.closed:
            if transport is not None and not transport.is_closing():
                self._cancel_timer()
                self._close_transport()
            return
        self._terminate(h2.errors.ErrorCodes.NO_ERROR)

    def _terminate(self, code: h2.errors.ErrorCodes, linger: bool = False) -> None:
        """Reset live streams, GOAWAY, close. ``linger``: close only after ``GOAWAY_LINGER``
        (or the client's close), so that what the client sends meanwhile (a SETTINGS ack, a
        request GOAWAY tells it to retry elsewhere) does not make the kernel answer with an RST
        that could destroy the GOAWAY and a last response before the client read them."""
        transport = self.transport
        if self.closed or transport is None:
            return
        for stream in list(self.streams.values()):
            stream.abort()
        if self.h2.state_machine.state is not h2.connection.ConnectionState.CLOSED:
            try:
                self.h2.close_connection(code)  # (h2 sent its own at a connection error)
            except h2.exceptions.ProtocolError:
                pass
        data = self.h2.data_to_send()
        if data:
            transport.write(data)
        self.closed = True
        if linger:
            self._cancel_timer()
            self._timer = self.loop.call_later(GOAWAY_LINGER, self._close_transport)
        else:
            self._close_transport()

    def _close_transport(self) -> None:
        """The TLS close, watched as an HTTP/1.1 connection's is (``_watch_close``): a client
        that takes nothing of the rest for a while is reset, one that keeps reading gets it all
        and ``close_notify`` (the TLS layer's own shutdown timeout is only a far backstop)."""
        transport = self.transport
        if transport is None:
            return
        if not transport.is_closing():
            transport.close()
        self.entry._watch_close(transport)

    def idle_check(self) -> bool:
        """The edge's idle sweep: a stream silent both ways is reset; the connection is idle
        (closed by the sweep) when nothing moved and no stream is open."""
        for stream in list(self.streams.values()):
            if stream.protocol is not None and stream.protocol.idle_check():
                log.info("%s: resetting an HTTP/2 stream silent for idle_timeout", self.entry._peer)
                stream.cut()
        self.flush()
        idle = self.activity == self._seen_activity and not self.streams
        self._seen_activity = self.activity
        return idle

    def _arm_timer(self, delay: float) -> None:
        self._cancel_timer()
        self._timer_activity = self.activity
        self._timer = self.loop.call_later(delay, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self.streams or self.closed:
            return
        if self.activity != self._timer_activity:
            self._arm_timer(self.server.config.keepalive_timeout)
            return
        self.close()


class H2Stream(PublicConnection):
    """One h2 request stream, served as a one-request HTTP/1.1 public connection."""

    __slots__ = ()

    http_version = "2"  # request inspection records what the client spoke

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        StreamEndpoint.connection_made(self, transport)
        server = self.server
        if server.config.access_log:  # as PublicConnection's: the same writer and metrics
            self._access = ConnectionLog(
                self._peer_ip, writer=server.access_writer, stats=server.metrics.requests
            )

    def deliver(self, data: bytes) -> None:
        """HTTP/1.1 request bytes built from the h2 stream."""
        self.activity += 1
        self._feed(data)


class _StreamTransport:
    """One h2 stream as the transport of an ``H2Stream``: the HTTP/1.1 bytes the endpoint writes
    become HEADERS and DATA, its pause/resume calls gate the request body (see the module
    docstring for the flow control)."""

    def __init__(self, conn: H2PublicConnection, sid: int) -> None:
        self.conn = conn
        self.sid = sid
        self.counted_ip: str | None = None  # counted against max_connections_per_ip
        self.protocol: H2Stream | None = None
        self.response = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        self.chunked = False
        self.websocket = False
        self.raw = False  # after the service's 101: bytes both ways unparsed
        self.switch: h11.InformationalResponse | None = None  # the service's 101
        self.reading = True
        self.inbound: deque[tuple[bytes, int]] = deque()  # (data, flow-controlled length)
        self.client_eof = False  # END_STREAM from the client
        self.eof_delivered = False
        self.finished_input = False  # nothing more from the client is taken
        self.outbound: deque[bytes] = deque()
        self.outbound_size = 0
        self.end_after = False  # END_STREAM once the queue is sent
        self.headers_sent = False
        self.response_done = False
        self.closing = False
        self.gone = False  # connection_lost delivered to the endpoint
        self.write_paused = False
        self.timer: asyncio.TimerHandle | None = None
        self._deliver_scheduled = False
        self.malformed = False  # a malformed request: answered 400, a body refused
        self.expected: int | None = None  # the request's content-length
        self.received = 0  # DATA bytes of the request so far

    def start(self, method: bytes, chunked: bool, websocket: bool) -> None:
        self.chunked = chunked
        self.websocket = websocket
        headers = [(b"host", b"h2")]
        if websocket:
            headers += [(b"connection", b"upgrade"), (b"upgrade", b"websocket")]
        self.response.send(h11.Request(method=method, target=b"/", headers=headers))
        self.response.send(h11.EndOfMessage())

    # -- asyncio.Transport, as the endpoint uses it ----------------------------------------------
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return default  # no socket of its own (SO_LINGER, hand-over: not applicable)
        transport = self.conn.transport
        return transport.get_extra_info(name, default) if transport is not None else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """The stream's own limits (STREAM_HIGH_WATER) apply."""

    def get_write_buffer_size(self) -> int:
        return self.outbound_size

    def is_closing(self) -> bool:
        return self.closing

    def can_write_eof(self) -> bool:
        return True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True
        pending = self.inbound or (self.client_eof and not self.eof_delivered)
        if pending and not self._deliver_scheduled:
            self._deliver_scheduled = True
            self.conn.loop.call_soon(self._scheduled_deliver)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing or self.response_done:
            return
        if self.raw:
            self._queue(bytes(data))
        else:
            try:
                self.response.receive_data(bytes(data))
                self._parse()
            except h11.RemoteProtocolError as exc:
                self._bad_response(str(exc))
                return
        self.send_pending()
        self.conn.schedule_flush()
        if self.outbound_size > STREAM_HIGH_WATER and not self.write_paused:
            self.write_paused = True
            if self.protocol is not None:
                self.protocol.pause_writing()

    def write_eof(self) -> None:
        """A WebSocket's service side ended: END_STREAM after what is queued."""
        if not self.closing:
            self.end_after = True
            self.send_pending()
            self.conn.schedule_flush()
            if self.eof_delivered:
                self.close()  # both directions ended

    def close(self) -> None:
        """The endpoint is done. A response that is not complete ends with RST_STREAM."""
        if self.closing:
            return
        self.closing = True
        if not self.raw and not self.response_done:
            try:
                self.response.receive_data(b"")  # the service's close ends a length-less body
                self._parse()
            except h11.RemoteProtocolError:
                pass
        if self.raw or self.response_done:
            self.end_after = True
            self.send_pending()
        else:
            self._reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        self._finish()

    def abort(self) -> None:
        """Cut: RST_STREAM (a cut response must never look complete)."""
        if self.closing:
            return
        if self.response_done and not self.raw:
            self.close()  # the whole response is here: it is sent, not cut
            return
        self.closing = True
        self._reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        self._finish()

    # -- service -> client -----------------------------------------------------------------------
    def _parse(self) -> None:
        while True:
            event = self.response.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                if event is h11.PAUSED and self.response.their_state is h11.SWITCHED_PROTOCOL:
                    self._switched()
                return
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    self.switch = event  # sent as :status 200 once h11 has switched
                else:
                    self._send_headers(event, informational=True)
            elif isinstance(event, h11.Response):
                self._send_headers(event)
            elif isinstance(event, h11.Data):
                self._queue(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._complete()
                return
            else:  # ConnectionClosed
                return

    def _send_headers(
        self, event: h11.InformationalResponse | h11.Response, informational: bool = False
    ) -> None:
        dropped = _WEBSOCKET_DROPPED if self.websocket else _HOP_BY_HOP
        named: set[bytes] = set()
        for name, value in event.headers:
            if name == b"connection":
                named.update(t.strip().lower() for t in value.split(b","))
        status = event.status_code
        if self.websocket and status == 101:
            status = 200
        headers = [(b":status", b"%d" % status)]
        headers += [(n, v) for n, v in event.headers if n not in dropped and n not in named]
        try:
            self.conn.h2.send_headers(self.sid, headers)
        except h2.exceptions.ProtocolError as exc:
            self._bad_response(f"response head not sendable over HTTP/2: {exc}")
            return
        if not informational:
            self.headers_sent = True

    def _switched(self) -> None:
        """The service answered the WebSocket upgrade with 101: ``:status 200``, then raw."""
        if self.raw:
            return
        self.raw = True
        data, _ = self.response.trailing_data
        # the 101's fields (Sec-WebSocket-Protocol, -Extensions) are the 200's
        self._send_headers(self.switch or h11.Response(status_code=200, headers=[]))
        if data:
            self._queue(bytes(data))

    def _complete(self) -> None:
        """The response ended: END_STREAM after the queue, and the tunnel stream is finished."""
        self.response_done = True
        self.end_after = True
        protocol = self.protocol
        if protocol is not None and not protocol._local_eof and not protocol._closed:
            protocol.eof_received()  # FIN to the service (it was sent Connection: close)
        self.finished_input = True
        self._drop_inbound()
        if not self.closing and not self.gone:
            self.timer = self.conn.loop.call_later(FINISH_GRACE, self._finish_grace)

    def _finish_grace(self) -> None:
        self.timer = None
        if not self.gone:
            self.closing = True
            self._finish()  # the service kept its connection open: the tunnel stream is reset

    def _bad_response(self, why: str) -> None:
        protocol = self.protocol
        log.info("HTTP/2 stream %d: the service's response cannot be relayed: %s", self.sid, why)
        if not self.headers_sent and protocol is not None:
            page = error_response(
                502,
                "UPSTREAM_BAD_RESPONSE",
                f"The service on port {protocol.port} answered with a malformed HTTP/1.1 response.",
            )
            self.conn._send_page(self.sid, page)
            self.headers_sent = self.response_done = True
            self.closing = True
            self.outbound.clear()
            self.outbound_size = 0
            self._finish()
        else:
            self.abort()
        self.conn.schedule_flush()

    def _queue(self, data: bytes) -> None:
        if data:
            self.outbound.append(data)
            self.outbound_size += len(data)

    def send_pending(self) -> None:
        """Send queued DATA within the h2 windows (the connection calls it when they open)."""
        conn = self.conn
        h2conn = conn.h2
        outbound = self.outbound
        try:
            while outbound and not conn._write_paused:
                window = h2conn.local_flow_control_window(self.sid)
                if window <= 0:
                    break
                piece = outbound[0]
                n = min(len(piece), window, h2conn.max_outbound_frame_size)
                if n == len(piece):
                    outbound.popleft()
                else:
                    outbound[0] = piece[n:]
                    piece = piece[:n]
                self.outbound_size -= n
                h2conn.send_data(self.sid, piece)
            if not outbound and self.end_after and self.headers_sent:
                self.end_after = False
                h2conn.end_stream(self.sid)
                if not self.client_eof and not self.raw:
                    # the request body is not needed any more (RFC 9113 8.1); that of a
                    # malformed request is a stream error (8.1.1)
                    h2conn.reset_stream(
                        self.sid,
                        h2.errors.ErrorCodes.PROTOCOL_ERROR
                        if self.malformed
                        else h2.errors.ErrorCodes.NO_ERROR,
                    )
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            outbound.clear()
            self.outbound_size = 0
        if outbound:
            conn._waiting.add(self)
        elif self.gone:
            conn.stream_done(self)
        if self.write_paused and self.outbound_size <= STREAM_LOW_WATER:
            self.write_paused = False
            # not from inside the tunnel's dispatch (write() runs there): the credit goes back
            # with a flush of the tunnel
            conn.loop.call_soon(self._resume)

    def _resume(self) -> None:
        if self.protocol is not None and not self.gone and not self.write_paused:
            self.protocol.resume_writing()

    def cut(self) -> None:
        """The idle sweep: reset the stream whatever its state and forget it."""
        self.abort()
        self.outbound.clear()
        self.outbound_size = 0
        self.conn.stream_done(self)

    def _reset(self, code: h2.errors.ErrorCodes) -> None:
        self.outbound.clear()
        self.outbound_size = 0
        self.end_after = False
        try:
            self.conn.h2.reset_stream(self.sid, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        self.finished_input = True
        self._drop_inbound()

    def _finish(self) -> None:
        """Tell the endpoint its transport is gone (soon, as a transport does)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.gone:
            self.gone = True
            self.conn.loop.call_soon(self._lost)
        self.conn.schedule_flush()

    def _lost(self) -> None:
        protocol = self.protocol
        if not self.outbound:
            self.conn.stream_done(self)
        else:
            self.conn._waiting.add(self)  # END_STREAM after the queue; done then
        if protocol is not None:
            protocol.connection_lost(None)

    # -- client -> service -----------------------------------------------------------------------
    def client_data(self, data: bytes, flow: int) -> None:
        if self.expected is not None:
            self.received += len(data)
            if self.received > self.expected:
                # none of it goes to the service: past the content-length it would be read
                # as a request of its own there
                self.conn.h2.acknowledge_received_data(flow, self.sid)
                self.bad_body_length(f"more than content-length {self.expected} bytes of DATA")
                return
        self.inbound.append((data, flow))
        if self.reading and not self._deliver_scheduled:
            self._deliver()

    def client_ended(self) -> None:
        self.client_eof = True
        if self.expected is not None and self.received != self.expected:
            self.bad_body_length(
                f"END_STREAM after {self.received} bytes of DATA, content-length {self.expected}"
            )
            return
        if self.reading and not self._deliver_scheduled:
            self._deliver()

    def bad_body_length(self, why: str) -> None:
        """DATA contradicts the request's content-length: malformed (RFC 9113 8.1.1), a stream
        error. Answered 400 (and RST_STREAM(PROTOCOL_ERROR) if the client is still sending)
        if the request has not gone to the service yet and nothing was answered; otherwise
        ``cut_malformed``: RST_STREAM(PROTOCOL_ERROR), the tunnel stream reset."""
        if self.closing or self.finished_input or self.conn.closed:
            return
        log.info("HTTP/2 stream %d of %s: %s", self.sid, self.conn.entry._peer, why)
        endpoint = self.protocol
        if (
            endpoint is not None
            and endpoint.mux is None
            and not endpoint._responded
            and not self.headers_sent
        ):
            self.malformed = True
            self.finished_input = True
            self._drop_inbound()
            endpoint.fail(400, "BAD_REQUEST", f"Malformed HTTP/2 request: {why}")
            return
        self.conn.cut_malformed(self)

    def malformed_input(self) -> None:
        """Malformed trailers, or DATA that contradicts the content-length of a request the
        service has: RST_STREAM(PROTOCOL_ERROR), and the tunnel stream is reset before the
        request's end reaches the service."""
        if self.closing:
            return
        self.closing = True
        self.client_eof = True
        self._reset(h2.errors.ErrorCodes.PROTOCOL_ERROR)
        self._finish()

    def client_reset(self) -> None:
        self.client_eof = True
        self.finished_input = True
        self._drop_inbound()
        self.outbound.clear()
        self.outbound_size = 0
        self.end_after = False
        self.closing = True
        self._finish()

    def connection_gone(self) -> None:
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.gone:
            self.gone = True
            if self.protocol is not None:
                self.protocol.connection_lost(None)

    def _scheduled_deliver(self) -> None:
        self._deliver_scheduled = False
        if not self.gone:
            self._deliver()
            self.conn.schedule_flush()

    def _deliver(self) -> None:
        protocol = self.protocol
        h2conn = self.conn.h2
        while self.inbound and self.reading and not self.finished_input and protocol is not None:
            data, flow = self.inbound.popleft()
            if data:
                if self.chunked:
                    data = b"%x\r\n%s\r\n" % (len(data), data)
                protocol.deliver(data)
            h2conn.acknowledge_received_data(flow, self.sid)
        if (
            self.client_eof
            and not self.inbound
            and not self.eof_delivered
            and self.reading
            and not self.finished_input
            and protocol is not None
        ):
            self.eof_delivered = True
            if self.chunked:
                protocol.deliver(b"0\r\n\r\n")
            elif self.raw and not protocol._local_eof:
                protocol.eof_received()  # WebSocket: the client's END_STREAM is a FIN

    def _drop_inbound(self) -> None:
        h2conn = self.conn.h2
        while self.inbound:
            _, flow = self.inbound.popleft()
            try:
                h2conn.acknowledge_received_data(flow, self.sid)
            except h2.exceptions.ProtocolError:
                pass
