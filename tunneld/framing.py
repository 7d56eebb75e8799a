"""Sans-IO request framing for the public listener: where each request begins and ends.

Theory of operation
-------------------
``RequestFramer`` is fed the client's bytes (``receive_data``) and returns events, in order:

``RequestHead``          a complete, parsed request head (the shell routes it, forwards it rebuilt)
``memoryview | bytes``   body bytes to relay as they are (views of the input: no copy)
``HeadError``            the client broke HTTP framing; nothing after it is relayed

The events are the objects themselves, not wrappers: small keep-alive requests are the hot path,
and each wrapper, like each extra Python call per request, cost ~1 % of the edge's instructions
per request (``python -m bench.e2e.instr``). The shell dispatches on ``type(event)``.

It never touches a socket or a clock; the shell (``tunneld/public.py``) owns timers and I/O.
States and their legal transitions (one table, ``_TRANSITIONS``)::

    HEAD --head, no body------------> HEAD
    HEAD --head + Content-Length----> LENGTH  --body done--> HEAD (or UPGRADE_PENDING)
    HEAD --head + chunked-----------> CHUNKED --body done--> HEAD (or UPGRADE_PENDING)
    HEAD --head with Upgrade--------> UPGRADE_PENDING --101--> TUNNEL
                                                       --other status--> DONE
    any  --invalid input / close()--> DONE
    any but DONE --hand_off()--------> TUNNEL  (a cluster node relays it to the owner node)

``UPGRADE_PENDING``: the request asked for ``Connection: upgrade``. Its head went to the service,
but the connection is not a raw tunnel until the service answers ``101``: the shell shows the
first response bytes of that one request to ``receive_response``. Client bytes arriving meanwhile
are held (at most ``MAX_UPGRADE_HOLD``); on ``101`` they are released as body bytes and everything
after is relayed raw (``TUNNEL``); on any other status they are dropped and the connection ends
after that response (``DONE``), so no later request ever reaches the service unparsed, with a
spoofed ``Host`` or forwarding headers, or without the 421 check.
"""

from __future__ import annotations

import enum
from typing import Final

from .httphead import MAX_HEAD_SIZE, ChunkedScanner, HeadError, HeadParser, RequestHead

# Bytes a client may send after an upgrade request before the service answered 101 (a WebSocket
# client waits for the 101; a few early frames fit). Reading pauses meanwhile, so one read is
# the most that can arrive; more than this is refused.
MAX_UPGRADE_HOLD: Final = 64 * 1024
# The response status line of an upgrade request must fit in this (it is ~40 bytes).
MAX_STATUS_LINE: Final = 8 * 1024

# Header names the edge sets itself, or that are internal; a client never gets to send them.
_DROPPED_PREFIXES: Final = (b"x-tunnel-", b"x-sandbox-", b"x-forwarded-")
_DROPPED_NAMES: Final = frozenset({b"host", b"forwarded", b"x-real-ip"})
# With the access log on the edge sets X-Request-Id itself (the client's, if well formed).
_DROPPED_WITH_ID: Final = _DROPPED_NAMES | {b"x-request-id"}


class State(enum.Enum):
    # Members are singletons: identity hashing is correct and, unlike Enum's own __hash__ (a
    # Python function), costs no call on every transition check.
    __hash__ = object.__hash__

    HEAD = "head"  # collecting a request head
    LENGTH = "length"  # relaying a Content-Length body
    CHUNKED = "chunked"  # relaying a chunked body while the scanner finds its end
    UPGRADE_PENDING = "upgrade-pending"  # upgrade head sent; waiting for the service's status
    TUNNEL = "tunnel"  # after 101: raw two-way relay, nothing parsed
    DONE = "done"  # nothing more is relayed from the client


# The members as module globals, for the per-request paths here and in tunneld/public.py: on
# Python 3.11 each ``State.X`` goes through ``EnumType.__getattr__``'s type slot (~850
# instructions, and the attribute load is never specialized: five per small request were ~4 %
# of relaying it, ``python -m bench.e2e.instr``); a global is one dict lookup. (3.12 dropped
# that ``__getattr__``.)
STATE_HEAD, STATE_LENGTH, STATE_CHUNKED, STATE_UPGRADE_PENDING, STATE_TUNNEL, STATE_DONE = State


_TRANSITIONS: Final[dict[State, frozenset[State]]] = {
    # any state but DONE -> TUNNEL: hand_off (a cluster node forwards the connection raw)
    State.HEAD: frozenset(
        {State.HEAD, State.LENGTH, State.CHUNKED, State.UPGRADE_PENDING, State.TUNNEL, State.DONE}
    ),
    State.LENGTH: frozenset({State.HEAD, State.UPGRADE_PENDING, State.TUNNEL, State.DONE}),
    State.CHUNKED: frozenset({State.HEAD, State.UPGRADE_PENDING, State.TUNNEL, State.DONE}),
    State.UPGRADE_PENDING: frozenset({State.TUNNEL, State.DONE}),
    State.TUNNEL: frozenset({State.DONE}),
    State.DONE: frozenset({State.DONE}),
}


# What ``receive_data`` returns, in order: heads, body bytes, at most one error (then DONE).
Event = RequestHead | memoryview | bytes | HeadError


def forward_head(
    head: RequestHead, host_line: bytes, trailer: bytes, id_line: bytes = b""
) -> bytes:
    """Rebuild ``head`` for the service: our Host and forwarding headers, internal ones dropped.

    ``id_line``: the request's ``x-request-id`` line (accesslog.py), which replaces the
    client's X-Request-Id lines (before ``trailer``, which ends the head).
    Every name with ``_`` is dropped too (nginx's ``underscores_in_headers off``): CGI/WSGI
    servers map ``-`` and ``_`` to the same ``HTTP_*`` variable, so ``X_Forwarded_For`` would
    reach them as ``X-Forwarded-For``.
    """
    out = [head.method, b" ", head.target, b" HTTP/", head.version, b"\r\n", host_line]
    dropped = _DROPPED_WITH_ID if id_line else _DROPPED_NAMES
    for name, value in head.headers:
        if name in dropped or name.startswith(_DROPPED_PREFIXES) or b"_" in name:
            continue
        out += (name, b": ", value, b"\r\n")
    out += (id_line, trailer)
    return b"".join(out)


class RequestFramer:
    """Splits one client connection's byte stream into request heads and bodies (see above)."""

    __slots__ = (
        "_head_buf",
        "_held",
        "_parser",
        "_remaining",
        "_scanner",
        "_status_buf",
        "_upgrade_after_body",
        "state",
    )

    def __init__(self, parser: HeadParser) -> None:
        self._parser = parser
        self.state = STATE_HEAD
        self._head_buf = bytearray()
        self._remaining = 0
        self._scanner: ChunkedScanner | None = None
        self._upgrade_after_body = False
        self._held = bytearray()
        self._status_buf = bytearray()

    # -- introspection for the shell -------------------------------------------------------------
    @property
    def idle(self) -> bool:
        """Between requests: the last request is complete and no byte of the next one arrived."""
        return self.state is STATE_HEAD and not self._head_buf

    @property
    def head_pending(self) -> bool:
        """Part of a request head arrived and the rest has not (the head timeout runs)."""
        return self.state is STATE_HEAD and bool(self._head_buf)

    @property
    def holding(self) -> bool:
        """Client bytes must not be read now: waiting for the service to accept an upgrade."""
        return self.state is STATE_UPGRADE_PENDING

    def _to(self, state: State) -> None:
        assert state in _TRANSITIONS[self.state], (self.state, state)
        self.state = state

    def hand_off(self) -> None:
        """Relay everything from now on unparsed (another node of a cluster parses it: the
        shell forwards the raw bytes it kept, then every later byte)."""
        self._head_buf.clear()
        self._held.clear()
        self._status_buf.clear()
        self._scanner = None
        self._upgrade_after_body = False
        self._to(STATE_TUNNEL)

    def close(self) -> None:
        """Relay nothing more (an error, a 421, a timeout): later input is ignored."""
        self.state = STATE_DONE
        self._head_buf.clear()
        self._held.clear()
        self._status_buf.clear()
        self._scanner = None

    # -- client -> service -----------------------------------------------------------------------
    def receive_data(self, data: memoryview | bytes) -> list[Event]:
        """Feed client bytes; body events may be views of ``data`` (use them before reuse)."""
        events: list[Event] = []
        pos = 0
        end = len(data)
        while pos < end:
            state = self.state
            if state is STATE_HEAD:
                self._head_buf += data[pos:]
                pos = end
                head = self._take_head(events)
                if head is None:
                    break
                if self._head_buf:  # the rest of the read belongs to what follows the head
                    data, self._head_buf = bytes(self._head_buf), bytearray()
                    pos, end = 0, len(data)
            elif state is STATE_LENGTH:
                take = min(self._remaining, end - pos)
                events.append(data[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._body_done()
            elif state is STATE_CHUNKED:
                assert self._scanner is not None
                try:
                    take = self._scanner.feed(data[pos:])
                except HeadError as exc:
                    self.close()
                    events.append(exc)
                    break
                if take:
                    events.append(data[pos : pos + take])
                pos += take
                if self._scanner.done:
                    self._scanner = None
                    self._body_done()
                elif not take:  # pragma: no cover - the scanner always consumes or keeps input
                    break
            elif state is STATE_UPGRADE_PENDING:
                self._held += data[pos:]
                pos = end
                if len(self._held) > MAX_UPGRADE_HOLD:
                    self.close()
                    error = "Too many bytes sent before the upgrade was accepted."
                    events.append(HeadError(400, "BAD_REQUEST", error))
            elif state is STATE_TUNNEL:
                events.append(data[pos:end])
                break
            else:  # DONE
                break
        return events

    def _take_head(self, events: list[Event]) -> RequestHead | None:
        buf = self._head_buf
        # RFC 9112 2.2: ignore empty lines before a request line (some clients add CRLF to bodies)
        while buf[:2] == b"\r\n":
            del buf[:2]
        if not buf:
            return None
        idx = buf.find(b"\r\n\r\n")
        if (idx < 0 and len(buf) > MAX_HEAD_SIZE) or idx + 4 > MAX_HEAD_SIZE:
            self.close()
            events.append(HeadError(431, "HEADERS_TOO_LARGE", "Request head too large."))
            return None
        if idx < 0:
            return None
        raw = bytes(buf[: idx + 4])
        del buf[: idx + 4]
        try:
            head = self._parser.parse(raw)
        except HeadError as exc:
            self.close()
            events.append(exc)
            return None
        events.append(head)
        if head.chunked:
            self._upgrade_after_body = head.upgrade is not None
            self._to(STATE_CHUNKED)
            self._scanner = ChunkedScanner()
        elif head.content_length:
            self._upgrade_after_body = head.upgrade is not None
            self._to(STATE_LENGTH)
            self._remaining = head.content_length
        elif head.upgrade is not None:
            self._upgrade_after_body = True
            self._body_done()
        # else: a request without a body (most of them): the next head follows, state HEAD
        return head

    def _body_done(self) -> None:
        if self._upgrade_after_body:
            self._upgrade_after_body = False
            self._status_buf.clear()
            self._to(STATE_UPGRADE_PENDING)
        else:
            self._to(STATE_HEAD)

    # -- service -> client (upgrade requests only) -----------------------------------------------
    def receive_response(self, data: bytes) -> bool | None:
        """Show the framer response bytes while ``UPGRADE_PENDING``.

        Returns None while the status line is incomplete, True when the service answered 101 (the
        state is now ``TUNNEL``; ``take_held()`` gives what the client sent meanwhile), False for
        any other answer (the state is now ``DONE``: relay that response, then close).
        """
        if self.state is not STATE_UPGRADE_PENDING:
            return None
        buf = self._status_buf
        buf += data[: MAX_STATUS_LINE + 2 - len(buf)]
        nl = buf.find(b"\r\n")
        if nl < 0:
            if len(buf) < MAX_STATUS_LINE:
                return None
            self.close()  # no status line a proxy could trust: not an upgrade
            return False
        line = bytes(buf[:nl])
        buf.clear()
        # "HTTP/1.1 101 Switching Protocols": the status code is the second field
        parts = line.split(b" ", 2)
        if len(parts) >= 2 and parts[0].startswith(b"HTTP/1.") and parts[1] == b"101":
            self._to(STATE_TUNNEL)
            return True
        self.close()
        return False

    def take_held(self) -> bytes:
        """The client bytes held while the upgrade was pending (after a 101: relay them)."""
        held, self._held = bytes(self._held), bytearray()
        return held
