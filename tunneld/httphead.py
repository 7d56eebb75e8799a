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


class ChunkedScanner:
    """Finds where a chunked body ends without copying or decoding it.

    ``feed(data)`` returns how many bytes of ``data`` belong to the body; when that is less than
    ``len(data)`` or ``done`` is set, the body is over and the rest is the next request. Resumes at
    any byte boundary. Trailers are relayed and skipped like headers.
    """

    __slots__ = ("_line", "_remaining", "_state", "done")

    _SIZE, _DATA, _DATA_CRLF, _TRAILER = range(4)

    def __init__(self) -> None:
        self.done = False
        self._state = self._SIZE
        self._remaining = 0
        self._line = bytearray()

    def feed(self, data: bytes | memoryview) -> int:
        pos = 0
        end = len(data)
        while pos < end and not self.done:
            state = self._state
            if state == self._DATA:
                take = min(self._remaining, end - pos)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = self._DATA_CRLF
                continue
            # line-oriented states: collect up to LF
            nl = bytes(data[pos : min(end, pos + MAX_CHUNK_LINE + 2)]).find(b"\n")
            if nl < 0:
                self._line += data[pos:end]
                if len(self._line) > MAX_CHUNK_LINE:
                    raise _bad("Chunk header line too long.")
                return end
            self._line += data[pos : pos + nl + 1]
            pos += nl + 1
            line = bytes(self._line).rstrip(b"\r\n")
            self._line.clear()
            if state == self._SIZE:
                size_text = line.split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise _bad("Invalid chunk size.") from None
                if not size_text or size < 0 or len(size_text) > 16:
                    raise _bad("Invalid chunk size.")
                if size == 0:
                    self._state = self._TRAILER
                else:
                    self._remaining = size
                    self._state = self._DATA
            elif state == self._DATA_CRLF:
                if line:
                    raise _bad("Chunk data not followed by CRLF.")
                self._state = self._SIZE
            else:  # trailer section: ends at the empty line
                if not line:
                    self.done = True
        return pos
