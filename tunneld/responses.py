"""Sans-IO response framing, for the access log and ``X-Request-Id``: where each response on one
client connection begins and ends, and its head.

Theory of operation
-------------------
Responses are relayed to the client unparsed: a tunnel must not alter what a service answers.
When the access log is on, the edge must still know each response's status, size and end, and
echo the request id in its head. ``ResponseFramer`` follows the byte stream the service sends
without changing it: it keeps a response's head until it is complete (at most
``MAX_RESPONSE_HEAD`` bytes), hands it to the shell as :class:`ResponseHead` (which may add one
header line before the blank line), then passes body bytes through as they come (views of the
input, no copy), counting them, and reports :class:`ResponseDone` where the body ends
(``Content-Length``, chunked framing via ``ChunkedScanner``, or the end of the connection). The
request methods are told to it in order (``expect``): a response to ``HEAD``, a 204 or a 304 has
no body; 1xx other than 101 are informational heads before the real one.

Anything it cannot follow is never guessed at: a head over the limit or one that is not a valid
status line and header block, conflicting lengths, a ``101`` (the connection becomes a tunnel):
it emits :class:`Unframed` and from then on passes every byte through untouched, uncounted.
Whatever it does, the bytes that reach the client are the service's bytes, in order, with at
most one header line added to a complete, valid head (tests check this against h11-made
responses split at every boundary).
"""

from __future__ import annotations

import re
from collections import deque
from typing import Final

from . import speedups
from .httphead import ChunkedScanner, HeadError

__all__ = [
    "MAX_RESPONSE_HEAD",
    "ResponseDone",
    "ResponseFramer",
    "ResponseHead",
    "Unframed",
    "simple_head",
]

# Responses carry bigger heads than requests (many Set-Cookie lines); past this, stop following.
MAX_RESPONSE_HEAD: Final = 64 * 1024
# A whole head, validated in one match (C, not a Python loop per line): the status line, then
# header lines "name: value" (the value any bytes but CR and LF), then the blank line.
# Possessive quantifiers: nothing to backtrack into (twice as fast with ``re``). "Any byte but CR
# and LF" is spelled as ranges, which ``re`` compiles to a bitmap: a quarter faster per byte
# than ``[^\r\n]``, a list it searches for each byte.
_HEAD_RE: Final = re.compile(
    rb"HTTP/1\.[01] ([1-9][0-9][0-9])(?: [\x00-\x09\x0b\x0c\x0e-\xff]*+)?\r\n"
    rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]++:[\x00-\x09\x0b\x0c\x0e-\xff]*+\r\n)*+\r\n"
)
# The three headers the framer reads, found in a valid head (each line starts after a CRLF);
# spelled out case by case, which ``re`` matches faster than with IGNORECASE.
_FRAMING_HEADERS: Final = re.compile(
    rb"\r\n([Cc][Oo][Nn][Tt][Ee][Nn][Tt]-[Ll][Ee][Nn][Gg][Tt][Hh]"
    rb"|[Tt][Rr][Aa][Nn][Ss][Ff][Ee][Rr]-[Ee][Nn][Cc][Oo][Dd][Ii][Nn][Gg]"
    rb"|[Xx]-[Rr][Ee][Qq][Uu][Ee][Ss][Tt]-[Ii][Dd]):([^\r\n]*+)"
)


# The common response, in one match: a final status (2xx-5xx), exactly one Content-Length with
# one value, and no Transfer-Encoding or X-Request-Id line (each other line is checked not to be
# one of them). A head this matches is one ``_HEAD_RE`` matches too, and ``_parse_head`` would
# give it (status, length, False, False): ``whole`` takes the response without the general
# path's events. Names as in ``_FRAMING_HEADERS`` (case by case, which ``re`` matches fastest).
# A line's first character picks its branch (``re`` tests a branch's leading class before it
# enters it): only a name that starts with C, T or X is checked against the three, a tenth
# faster than checking every line.
_TOKEN: Final = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]*+"
_OTHER_LINE: Final = (
    rb"(?:[!#$%&'*+.^_`|~0-9ABD-SU-WYZabd-su-wyz-]" + _TOKEN
    + rb"|[Cc](?![Oo][Nn][Tt][Ee][Nn][Tt]-[Ll][Ee][Nn][Gg][Tt][Hh]:)" + _TOKEN
    + rb"|[Tt](?![Rr][Aa][Nn][Ss][Ff][Ee][Rr]-[Ee][Nn][Cc][Oo][Dd][Ii][Nn][Gg]:)" + _TOKEN
    + rb"|[Xx](?!-[Rr][Ee][Qq][Uu][Ee][Ss][Tt]-[Ii][Dd]:)" + _TOKEN
    + rb"):[\x00-\x09\x0b\x0c\x0e-\xff]*+\r\n"
)  # fmt: skip
_SIMPLE_RE: Final = re.compile(
    rb"HTTP/1\.[01] ([2-5][0-9][0-9])(?: [\x00-\x09\x0b\x0c\x0e-\xff]*+)?\r\n(?:"
    + _OTHER_LINE
    + rb")*+"
    rb"[Cc][Oo][Nn][Tt][Ee][Nn][Tt]-[Ll][Ee][Nn][Gg][Tt][Hh]:[ \t]*+([0-9]{1,18})[ \t]*+\r\n"
    rb"(?:" + _OTHER_LINE + rb")*+\r\n"
)

# The final statuses ``whole`` takes, by their three digits (a lookup, not an int() call).
_WHOLE_STATUS: Final = {b"%d" % n: 0 if n in (204, 304) else n for n in range(200, 600)}


def simple_head_py(data: bytes) -> tuple[int, int] | None:
    """(status, length of the head) when ``data`` is exactly one whole response of the common
    kind (``_SIMPLE_RE``, not a 204 or 304, its ``Content-Length`` the rest of ``data``), else
    None. The reference of ``simple_head`` (tunneld/_speedups.c when built: speedups.py)."""
    match = _SIMPLE_RE.match(data)
    if match is None:
        return None
    code, length = match.groups()
    end = match.end()
    status = _WHOLE_STATUS[code]  # 0: 204 or 304, which have no body
    if not status or end + int(length) != len(data):
        return None
    return status, end


class ResponseHead:
    """A complete response head (``raw``: its exact bytes, ending with the blank line)."""

    __slots__ = ("has_request_id", "raw", "status")

    def __init__(self, status: int, raw: bytes, has_request_id: bool) -> None:
        self.status = status
        self.raw = raw
        self.has_request_id = has_request_id


class ResponseDone:
    """The response that began with the last final head ended; ``body`` bytes followed it."""

    __slots__ = ("body", "status")

    def __init__(self, status: int, body: int) -> None:
        self.status = status
        self.body = body


class Unframed:
    """From here on the bytes are passed through untouched and unfollowed (``reason``: why)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


Event = ResponseHead | ResponseDone | Unframed | bytes | memoryview

_HEAD, _LENGTH, _CHUNKED, _UNTIL_CLOSE, _RAW = range(5)


class ResponseFramer:
    """Follows one connection's responses (see the module docstring)."""

    __slots__ = ("_body", "_buf", "_methods", "_remaining", "_scanner", "_state", "_status")

    def __init__(self) -> None:
        self._state = _HEAD
        self._buf = bytearray()
        self._methods: deque[bytes] = deque()
        self._remaining = 0
        self._scanner: ChunkedScanner | None = None
        self._status = 0
        self._body = 0

    @property
    def following(self) -> bool:
        return self._state != _RAW

    def expect(self, method: bytes) -> None:
        """A request with ``method`` was sent to the service: its response comes in order."""
        if self._state != _RAW and len(self._methods) < 1024:
            self._methods.append(method)

    def whole(self, data: bytes) -> tuple[int, int] | None:
        """``data`` is exactly one whole response of the common kind (see ``_SIMPLE_RE``) that
        answers the next expected request, which is not ``HEAD``: take it and return (status,
        length of its head); the framer then expects the next response. Else None, and nothing
        changed: ``feed`` it. The same outcome as ``feed``'s head, body and done, in one step
        (most small responses arrive whole in one read)."""
        methods = self._methods
        if self._state != _HEAD or self._buf or not methods or methods[0] == b"HEAD":
            return None
        taken = simple_head(data)
        if taken is not None:
            methods.popleft()
        return taken

    def feed(self, data: bytes | memoryview) -> list[Event]:
        events: list[Event] = []
        pos, end = 0, len(data)
        while pos < end:
            state = self._state
            if state == _RAW:
                events.append(data[pos:])
                break
            if state == _HEAD:
                if not self._buf and isinstance(data, bytes):
                    # a head that starts here: look in ``data``, copy nothing yet
                    idx = data.find(b"\r\n\r\n", pos)
                    if idx >= 0:
                        rest = self._head(events, data[pos : idx + 4], data, idx + 4)
                        if rest is None:
                            break
                        pos = rest
                        continue
                self._buf += data[pos:]
                pos = end
                rest_bytes = self._take_head(events)
                if rest_bytes is not None:
                    data, pos, end = rest_bytes, 0, len(rest_bytes)
            elif state == _LENGTH:
                take = min(self._remaining, end - pos)
                events.append(data[pos : pos + take])
                pos += take
                self._body += take
                self._remaining -= take
                if not self._remaining:
                    self._done(events)
            elif state == _CHUNKED:
                assert self._scanner is not None
                try:
                    take = self._scanner.feed(data[pos:])
                except HeadError:
                    self._unframe(events, "a malformed chunked body")
                    events.append(data[pos:])
                    break
                if take:
                    events.append(data[pos : pos + take])
                pos += take
                self._body += take
                if self._scanner.done:
                    self._scanner = None
                    self._done(events)
            else:  # _UNTIL_CLOSE
                events.append(data[pos:])
                self._body += end - pos
                break
        return events

    def close(self) -> list[Event]:
        """The service ended the connection: a body read until close is complete now."""
        if self._state == _UNTIL_CLOSE:
            events: list[Event] = []
            self._done(events)
            return events
        return []

    # -- internals -------------------------------------------------------------------------------
    def _take_head(self, events: list[Event]) -> bytes | None:
        """Complete head in the buffer: emit it, set the body state, return the bytes after it
        (None: wait for more, or unframed)."""
        buf = self._buf
        idx = buf.find(b"\r\n\r\n")
        if idx < 0:
            if len(buf) > MAX_RESPONSE_HEAD:
                self._unframe(events, "a response head over the size limit")
                events.append(bytes(buf))
                buf.clear()
            return None
        raw = bytes(buf[: idx + 4])
        rest = bytes(buf[idx + 4 :])
        buf.clear()
        return None if self._head(events, raw, rest, 0) is None else rest

    def _head(self, events: list[Event], raw: bytes, data: bytes, after: int) -> int | None:
        """Emit the complete head ``raw`` (``data[after:]`` follows it) and set the body state;
        returns where to go on in ``data``, or None when nothing more is followed (unframed:
        the rest of ``data`` is emitted as is)."""
        parsed = _parse_head(raw)
        if parsed is None:
            self._unframe(events, "a response head that is not valid HTTP/1.1")
            events.append(raw + data[after:])
            return None
        status, length, chunked, has_id = parsed
        events.append(ResponseHead(status, raw, has_id))
        if 100 <= status < 200 and status != 101:
            return after  # informational: the final head follows
        method = self._methods.popleft() if self._methods else b"GET"
        self._status = status
        self._body = 0
        if status == 101:
            events.append(ResponseDone(status, 0))
            self._unframe(events, "switched protocols")
            if after < len(data):
                events.append(data[after:])
            return None
        if method == b"HEAD" or status in (204, 304):
            self._done(events)
        elif chunked:
            self._state = _CHUNKED
            self._scanner = ChunkedScanner()
        elif length is not None:
            self._remaining = length
            self._state = _LENGTH
            if not length:
                self._done(events)
        elif length is None and chunked is None:
            self._unframe(events, "conflicting body lengths")
            if after < len(data):
                events.append(data[after:])
            return None
        else:
            self._state = _UNTIL_CLOSE
        return after

    def _done(self, events: list[Event]) -> None:
        events.append(ResponseDone(self._status, self._body))
        self._state = _HEAD

    def _unframe(self, events: list[Event], reason: str) -> None:
        self._state = _RAW
        self._methods.clear()
        self._scanner = None
        events.append(Unframed(reason))


def _parse_head(raw: bytes) -> tuple[int, int | None, bool | None, bool] | None:
    """(status, content length or None, chunked, has x-request-id), or None if invalid.

    ``chunked`` None with length None means conflicting or unparsable lengths (unframed)."""
    match = _HEAD_RE.fullmatch(raw)
    if match is None:
        return None
    status = int(match.group(1))
    lengths: set[bytes] = set()
    codings: list[bytes] = []
    has_id = False
    for name, value in _FRAMING_HEADERS.findall(raw, match.end(1)):
        name = name.lower()
        value = value.strip(b" \t")
        if name == b"content-length":
            lengths.update(v.strip() for v in value.split(b","))
        elif name == b"transfer-encoding":
            codings += [c.strip().lower() for c in value.split(b",")]
        else:
            has_id = True
    if codings:
        if lengths:
            return status, None, None, has_id  # both: ambiguous, follow nothing
        return status, None, codings[-1] == b"chunked", has_id
    if lengths:
        if len(lengths) != 1:
            return status, None, None, has_id
        (text,) = lengths
        if not text.isdigit() or len(text) > 18:
            return status, None, None, has_id
        return status, int(text), False, has_id
    return status, None, False, has_id


# The C version when built (tunneld/speedups.py), else the reference above.
simple_head = simple_head_py if speedups.c is None else speedups.c.simple_head
