"""Request-head parsing for the public listener: one interface, two implementations.

``HttptoolsHeadParser`` (llhttp, in C) is the default on the hot path; ``H11HeadParser`` is the
pure-Python reference. Both receive exactly one complete head (request line + headers + CRLFCRLF)
and return the same ``RequestHead``; the framing rules that decide where the body ends are applied
once, in ``_finish``, so the two parsers cannot disagree about request boundaries (the classic
request-smuggling hole). Measured on a 2-hop uvloop relay: parsing every head with h11 costs about
half the small-request throughput, httptools almost nothing (docs/performance.md).

Bodies are never parsed here: the public listener relays them byte for byte and only tracks where
they end (``Content-Length`` counting, or ``ChunkedScanner`` below).
"""

from __future__ import annotations

import re
from typing import Final, Protocol

import h11

# 32 KiB: nginx's default large_client_header_buffers is 4 x 8 KiB, node caps heads at 16 KiB,
# Apache at 8 KiB per line x 100 lines. Cookies of real apps fit; a megabyte of headers does not.
MAX_HEAD_SIZE: Final = 32 * 1024
MAX_HEADERS: Final = 100
# A chunk-size line is hex digits plus optional extensions; nothing legitimate needs more.
MAX_CHUNK_LINE: Final = 4096


class HeadError(Exception):
    """The head cannot be relayed; the listener answers ``status`` with this JSON error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class RequestHead:
    """One parsed request head. Header names are lowercased; values are raw bytes."""

    __slots__ = (
        "chunked",
        "content_length",
        "headers",
        "host",
        "keep_alive",
        "method",
        "target",
        "upgrade",
        "version",
    )

    def __init__(
        self, method: bytes, target: bytes, version: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.host: bytes = b""
        self.content_length = 0
        self.chunked = False
        self.upgrade: bytes | None = None
        self.keep_alive = True


class HeadParser(Protocol):
    name: str

    def parse(self, head: bytes) -> RequestHead: ...


def _bad(message: str) -> HeadError:
    return HeadError(400, "BAD_REQUEST", message)


def _finish(head: RequestHead) -> RequestHead:
    """Apply the framing and routing rules shared by both parsers (RFC 9112 section 6)."""
    if head.version not in (b"1.1", b"1.0"):
        raise HeadError(
            505, "HTTP_VERSION_NOT_SUPPORTED", "Only HTTP/1.0 and HTTP/1.1 are supported."
        )
    if len(head.headers) > MAX_HEADERS:
        raise HeadError(431, "HEADERS_TOO_LARGE", f"Too many header fields (limit {MAX_HEADERS}).")
    target = head.target
    if not (target.startswith(b"/") or (target == b"*" and head.method == b"OPTIONS")):
        if head.method == b"CONNECT":
            raise HeadError(405, "METHOD_NOT_ALLOWED", "CONNECT is not supported by preview URLs.")
        raise _bad("The request target must be an absolute path (origin-form).")
    hosts: list[bytes] = []
    lengths: list[bytes] = []
    te: list[bytes] = []
    connection = b""
    upgrade = b""
    for name, value in head.headers:
        if name == b"host":
            hosts.append(value)
        elif name == b"content-length":
            lengths.append(value)
        elif name == b"transfer-encoding":
            te.append(value)
        elif name == b"connection":
            connection += b"," + value.lower()
        elif name == b"upgrade":
            upgrade = value.strip().lower()
    if len(hosts) != 1 or not hosts[0]:
        raise _bad("Exactly one Host header is required.")
    head.host = hosts[0].strip()
    if te:
        if lengths:
            raise _bad("Content-Length and Transfer-Encoding together are not allowed.")
        codings = [c.strip().lower() for c in b",".join(te).split(b",")]
        if codings != [b"chunked"]:
            # RFC 9112 6.3: a request whose final coding is not chunked has no knowable length
            raise _bad("Only Transfer-Encoding: chunked is supported.")
        head.chunked = True
    elif lengths:
        values = {v.strip() for v in b",".join(lengths).split(b",")}
        if len(values) != 1:
            raise _bad("Conflicting Content-Length values.")
        (value,) = values
        if not value.isdigit() or len(value) > 18:
            raise _bad("Invalid Content-Length.")
        head.content_length = int(value)
    tokens = {t.strip() for t in connection.split(b",")}
    if head.version == b"1.0":
        head.keep_alive = b"keep-alive" in tokens
    else:
        head.keep_alive = b"close" not in tokens
    if upgrade and b"upgrade" in tokens:
        head.upgrade = upgrade
    return head


def routing_host(head: bytes | bytearray) -> bytes | None:
    """The value of the one Host header of a complete head (``head`` ends with its CRLFCRLF),
    found without parsing the head; None when there is none or more than one (any case).

    Only for choosing where a connection goes, never for answering it: a cluster node that does
    not hold the sandbox's session passes the connection, bytes unparsed, to the node that does
    (``PublicConnection._quick_hand_over``), and that node parses the head in full
    (``HeadParser``), validates it, routes it by its own reading and answers. A parser accepts a
    head with exactly one Host line, which is then the one found here, with the same value: a
    line ends at CRLF here, and a value holding a bare CR or LF (a parser that ends lines there
    reads another) is no preview host, so it routes nowhere and the head is parsed in full. A
    head the parser refuses may give a value here (obs-fold, say): its owner answers the 400."""
    lower = head.lower()
    start = lower.find(b"\r\nhost:")
    if start < 0 or lower.find(b"\r\nhost:", start + 7) >= 0:
        return None
    start += 7
    value = bytes(head[start : head.find(b"\r\n", start)]).strip()
    return value or None


class HttptoolsHeadParser:
    """llhttp via httptools: the fast path."""

    name = "httptools"

    def __init__(self) -> None:
        import httptools

        self._httptools = httptools
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._complete = False

    # llhttp callbacks
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._complete = True

    def parse(self, head: bytes) -> RequestHead:
        self._url = b""
        self._headers = []
        self._complete = False
        httptools = self._httptools
        parser = httptools.HttpRequestParser(self)
        try:
            parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            pass  # upgrade (or CONNECT): the head is complete, what follows is not HTTP
        except httptools.HttpParserError as exc:
            raise _bad(f"Malformed request head: {exc}.") from None
        if not self._complete:
            raise _bad("Malformed request head.")
        version = parser.get_http_version().encode()
        return _finish(RequestHead(parser.get_method(), self._url, version, self._headers))


class H11HeadParser:
    """h11: the pure-Python reference implementation."""

    name = "h11"

    def parse(self, head: bytes) -> RequestHead:
        if b"\r\n " in head or b"\r\n\t" in head:
            # h11 unfolds obs-fold (RFC 9112 5.2 allows rejecting it); llhttp rejects it. Both
            # parsers must draw the same request boundaries, so the fast path's rule wins.
            raise _bad("Obsolete line folding in headers is not allowed.")
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_SIZE)
        conn.receive_data(head)
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            if "version" in str(exc).lower():
                raise HeadError(
                    505, "HTTP_VERSION_NOT_SUPPORTED", "Only HTTP/1.0 and HTTP/1.1 are supported."
                ) from None
            raise _bad(f"Malformed request head: {exc}.") from None
        if not isinstance(event, h11.Request):
            raise _bad("Malformed request head.")
        headers = [(bytes(n), bytes(v)) for n, v in event.headers.raw_items()]
        headers = [(n.lower(), v) for n, v in headers]
        return _finish(
            RequestHead(
                bytes(event.method), bytes(event.target), bytes(event.http_version), headers
            )
        )


def default_parser(name: str = "auto") -> HeadParser:
    """``auto`` picks httptools when importable, else h11."""
    if name in ("auto", "httptools"):
        try:
            return HttptoolsHeadParser()
        except ImportError:
            if name == "httptools":
                raise
    if name in ("auto", "h11"):
        return H11HeadParser()
    raise ValueError(f"unknown HTTP parser {name!r} (choose auto, httptools or h11)")


# RFC 9112 7.1: chunk-size is 1*HEXDIG (at most 16: a 64-bit count), then optional extensions
# (BWS ";" ...), then CRLF. No sign, no "0x", no "_", no spaces around the digits, no bare LF:
# every parser between the client and the service must draw the same boundaries, and Python's
# int(x, 16) alone accepts all of those. Extensions may hold no control character but HTAB.
_EXT: Final = rb"(?:[ \t]*;[^\x00-\x08\x0a-\x1f\x7f]{0,%d})?" % MAX_CHUNK_LINE
_SIZE_LINE: Final = re.compile(rb"([0-9A-Fa-f]{1,16})" + _EXT + rb"\r\n")
# The CRLF that ends a chunk's data plus the next size line: one match per chunk.
_NEXT_SIZE_LINE: Final = re.compile(rb"\r\n([0-9A-Fa-f]{1,16})" + _EXT + rb"\r\n")
# A run of complete small chunks (sizes 1-f, any case, leading zeros, extensions) in one C-level
# match: a body of 1-byte chunks is otherwise one Python iteration per 6 bytes and lets one client
# hold the event loop (issue 7 row 11). It accepts a subset of what the per-chunk path accepts.
_SMALL_CHUNKS: Final = re.compile(
    rb"(?:\r\n0{0,15}(?:"
    + b"|".join(
        b"%s%s\\r\\n[\\s\\S]{%d}" % (digit, _EXT, n)
        for n in range(1, 16)
        for digit in sorted({b"%x" % n, b"%X" % n})
    )
    + rb"))*+"
)
_TRAILER_LINE: Final = re.compile(rb"[^\r\n]{0,%d}\r\n" % MAX_CHUNK_LINE)
_LF: Final = re.compile(rb"\n")


class ChunkedScanner:
    """Finds where a chunked body ends without copying or decoding it.

    ``feed(data)`` returns how many bytes of ``data`` belong to the body; when that is less than
    ``len(data)`` or ``done`` is set, the body is over and the rest is the next request. Resumes at
    any byte boundary: a line cut by a read boundary is kept (at most ``MAX_CHUNK_LINE`` bytes)
    and completed by the next read. Chunk data is skipped by counting; lines are matched with
    precompiled patterns directly on the read buffer (no per-byte loop, no copy), one match per
    chunk, so a body of 1-byte chunks still scans at tens of MB/s (bench/micro). Trailers are
    relayed and skipped like headers (at most ``MAX_HEAD_SIZE`` bytes of them).
    """

    __slots__ = ("_line", "_remaining", "_state", "_trailer_bytes", "done")

    _SIZE, _DATA, _NEXT, _TRAILER = range(4)

    def __init__(self) -> None:
        self.done = False
        self._state = self._SIZE
        self._remaining = 0
        self._trailer_bytes = 0
        self._line = bytearray()

    def feed(self, data: bytes | memoryview) -> int:
        pos = 0
        end = len(data)
        if self._line and end:
            # finish the line cut by the previous read: match on (kept part + a bounded piece)
            kept = len(self._line)
            piece = bytes(data[: MAX_CHUNK_LINE + 8 - kept])
            joined = bytes(self._line) + piece
            self._line.clear()
            used = self._step(joined, 0, len(joined))
            if used < 0:
                return end  # still incomplete: _step kept the bytes again
            pos = used - kept
        while pos < end and not self.done:
            if self._state == self._NEXT:
                # Hot loop for runs of chunks inside one read: one match per chunk, no calls.
                match = _NEXT_SIZE_LINE.match
                small = _SMALL_CHUNKS.match
                while True:
                    pos = small(data, pos, end).end()  # type: ignore[union-attr]  # matches ""
                    m = match(data, pos, end)
                    if m is None:
                        break
                    size = int(m.group(1), 16)
                    pos = m.end()
                    if size == 0:
                        self._state = self._TRAILER
                        break
                    if pos + size >= end:
                        self._remaining = pos + size - end
                        self._state = self._DATA if self._remaining else self._NEXT
                        return end
                    pos += size
                if pos >= end:
                    break
            used = self._step(data, pos, end)
            if used < 0:
                return end
            pos = used
        return pos

    def _step(self, data: bytes | memoryview, pos: int, end: int) -> int:
        """Consume one piece at ``pos``: the new position, or -1 having kept an incomplete line."""
        state = self._state
        if state == self._DATA:
            take = min(self._remaining, end - pos)
            self._remaining -= take
            if self._remaining == 0:
                self._state = self._NEXT
            return pos + take
        if state == self._NEXT:
            m = _NEXT_SIZE_LINE.match(data, pos, end)
            if m is None:
                if end - pos >= 2 and data[pos : pos + 2] != b"\r\n":
                    raise _bad("Chunk data not followed by CRLF.")
                if end - pos == 1 and data[pos : pos + 1] != b"\r":
                    raise _bad("Chunk data not followed by CRLF.")
                return self._incomplete(data, pos, end, 2)
        elif state == self._SIZE:
            m = _SIZE_LINE.match(data, pos, end)
            if m is None:
                return self._incomplete(data, pos, end, 0)
        else:  # trailer section: header-like lines up to an empty line
            m = _TRAILER_LINE.match(data, pos, end)
            if m is None:
                return self._incomplete(data, pos, end, 0)
            self._trailer_bytes += m.end() - pos
            if self._trailer_bytes > MAX_HEAD_SIZE:
                raise _bad("Chunked trailer section too large.")
            if m.end() - pos == 2:
                self.done = True
            return m.end()
        size = int(m.group(1), 16)
        if size == 0:
            self._state = self._TRAILER
        else:
            self._remaining = size
            self._state = self._DATA
        return m.end()

    def _incomplete(self, data: bytes | memoryview, pos: int, end: int, skip: int) -> int:
        """No match at ``pos``: an error if a line end is already there, else keep the bytes."""
        if _LF.search(data, pos + skip, end) is not None:
            raise _bad(
                "Invalid chunk size or line ending."
                if self._state != self._TRAILER
                else "Invalid trailer line ending."
            )
        if end - pos > MAX_CHUNK_LINE + 2:
            raise _bad("Chunk header line too long.")
        self._line += data[pos:end]
        return -1
