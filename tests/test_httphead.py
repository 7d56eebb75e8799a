"""The head parsers agree with each other, and the chunked scanner finds where bodies end."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunneld.httphead import (
    MAX_HEADERS,
    ChunkedScanner,
    H11HeadParser,
    HeadError,
    HttptoolsHeadParser,
)

PARSERS = [HttptoolsHeadParser(), H11HeadParser()]


def _parse_all(head: bytes) -> list[object]:
    out: list[object] = []
    for parser in PARSERS:
        try:
            h = parser.parse(head)
        except HeadError as exc:
            out.append(("error", exc.status))
        else:
            out.append(
                (
                    h.method,
                    h.target,
                    h.version,
                    h.headers,
                    h.host,
                    h.content_length,
                    h.chunked,
                    h.upgrade,
                    h.keep_alive,
                )
            )
    return out


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.name)
def test_basic_head(parser) -> None:
    head = parser.parse(
        b"POST /x?y=1 HTTP/1.1\r\nHost: a.localhost:8080\r\nContent-Length: 12\r\nX-A: b\r\n\r\n"
    )
    assert (head.method, head.target, head.version) == (b"POST", b"/x?y=1", b"1.1")
    assert head.host == b"a.localhost:8080"
    assert head.content_length == 12 and not head.chunked and head.keep_alive
    assert (b"x-a", b"b") in head.headers


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.name)
@pytest.mark.parametrize(
    "raw, status",
    [
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
        (b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", 405),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * (MAX_HEADERS + 1) + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\n folded: x\r\n\r\n", 400),
    ],
)
def test_bad_heads(parser, raw: bytes, status: int) -> None:
    with pytest.raises(HeadError) as info:
        parser.parse(raw)
    assert info.value.status == status


def test_upgrade_and_keepalive_flags() -> None:
    for parser in PARSERS:
        h = parser.parse(
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        assert h.upgrade == b"websocket"
        h = parser.parse(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n")
        assert not h.keep_alive
        h = parser.parse(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert not h.keep_alive
        h = parser.parse(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n")
        assert h.upgrade is None  # Upgrade without Connection: upgrade is not an upgrade


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
_value = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 ;=/,.-", max_size=20).map(str.strip)


@settings(max_examples=200, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]),
    path=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/?=&-._~%", max_size=30),
    headers=st.lists(st.tuples(_token, _value), max_size=8),
    framing=st.sampled_from(["none", "cl", "chunked", "both", "cl2"]),
    version=st.sampled_from(["1.1", "1.0"]),
)
def test_parsers_agree(method: str, path: str, headers, framing: str, version: str) -> None:
    lines = [f"{method} /{path} HTTP/{version}", "Host: 8000-sb-tok.localhost"]
    lines += [
        f"{n}: {v}" for n, v in headers if n not in ("host", "content-length", "transfer-encoding")
    ]
    if framing in ("cl", "both"):
        lines.append("Content-Length: 10")
    if framing == "cl2":
        lines += ["Content-Length: 10", "Content-Length: 11"]
    if framing in ("chunked", "both"):
        lines.append("Transfer-Encoding: chunked")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    results = _parse_all(head)
    assert results[0] == results[1], head


def _chunked(pieces: list[bytes], trailers: bytes = b"") -> bytes:
    out = b"".join(b"%x;ext=1\r\n" % len(p) + p + b"\r\n" for p in pieces if p)
    return out + b"0\r\n" + trailers + b"\r\n"


@settings(max_examples=200, deadline=None)
@given(
    pieces=st.lists(st.binary(min_size=1, max_size=300), max_size=6),
    trailers=st.sampled_from([b"", b"X-Trailer: 1\r\n"]),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=6),
    rest=st.binary(max_size=20),
)
def test_chunked_scanner_finds_the_end_at_any_split(pieces, trailers, cuts, rest) -> None:
    body = _chunked(pieces, trailers)
    data = body + rest
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    scanner = ChunkedScanner()
    consumed = 0
    for a, b in itertools.pairwise(bounds):
        if scanner.done:
            break
        n = scanner.feed(memoryview(data)[a:b])
        consumed += n
        if n < b - a:
            break
    assert scanner.done
    assert consumed == len(body)


@pytest.mark.parametrize(
    "bad",
    [b"zz\r\n", b"5\r\nhelloXX\r\n", b"-1\r\n", b"1" * 5000],
)
def test_chunked_scanner_rejects_garbage(bad: bytes) -> None:
    with pytest.raises(HeadError):
        ChunkedScanner().feed(bad)


@pytest.mark.parametrize(
    "bad",
    [
        b"0x5\r\nhello\r\n0\r\n\r\n",  # a C/Python prefix: int(_, 16) accepts it, HTTP does not
        b"+5\r\nhello\r\n0\r\n\r\n",
        b"-0\r\n\r\n",
        b"1_0\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n",
        b" 5 \r\nhello\r\n0\r\n\r\n",
        b"5 \r\nhello\r\n0\r\n\r\n",
        b"\t5\r\nhello\r\n0\r\n\r\n",
        b"5\nhello\r\n0\r\n\r\n",  # bare LF ends the size line
        b"5\r\nhello\n0\r\n\r\n",  # bare LF after the data
        b"5\r\nhello\r\n0\n\r\n",
        b"5\r\nhello\r\n0\r\n\n",  # bare LF ends the trailer section
        b"5\r\nhello\r\n0\r\nX-T: 1\n\r\n",
        b"5\rhello\r\n0\r\n\r\n",
        b"\r\n",  # empty chunk size
        b";ext\r\n",
        b"1" * 17 + b"\r\n",  # more than 16 hex digits
        b"5;a\x00b\r\nhello\r\n0\r\n\r\n",  # control character in an extension
        # the same faults inside a run of tiny chunks (the scanner's fast path)
        b"1\r\nx\r\n" * 3 + b"1\nx\r\n0\r\n\r\n",
        b"1\r\nx\r\n" * 3 + b"1\r\nx\n1\r\nx\r\n0\r\n\r\n",
        b"1\r\nx\r\n" * 3 + b"+1\r\nx\r\n0\r\n\r\n",
        b"1\r\nx\r\n" * 3 + b"0x1\r\nx\r\n0\r\n\r\n",
        b"1\r\nx\r\n" * 3 + b"1 \r\nx\r\n0\r\n\r\n",
        b"1\r\nx\r\n" * 3 + b"00000000000000001\r\nx\r\n0\r\n\r\n",
        b"1\r\nx\r\n" * 3 + b"2\r\nx\r\n0\r\n\r\n",  # data shorter than its size
    ],
)
def test_chunked_scanner_strict_grammar(bad: bytes) -> None:
    """Row 11: 1-16 hex digits, optional ;ext, CRLF everywhere; whole input and byte by byte."""
    with pytest.raises(HeadError) as info:
        ChunkedScanner().feed(bad)
    assert info.value.status == 400
    scanner = ChunkedScanner()
    with pytest.raises(HeadError):
        for i in range(len(bad)):
            scanner.feed(bad[i : i + 1])


@pytest.mark.parametrize(
    "good",
    [
        b"5\r\nhello\r\n0\r\n\r\n",
        b"A\r\n0123456789\r\n0\r\n\r\n",
        b"a;name=value\r\n0123456789\r\n0;last\r\n\r\n",
        b"5 ;ext\r\nhello\r\n0\r\n\r\n",  # RFC 9112 7.1.1: BWS before the extension
        b"0000000000000005\r\nhello\r\n0\r\nX-Trailer: a\r\nX-Other: b\r\n\r\n",
    ],
)
def test_chunked_scanner_accepts_valid_bodies(good: bytes) -> None:
    for rest in (b"", b"GET / HTTP/1.1\r\n"):
        data = good + rest
        scanner = ChunkedScanner()
        assert scanner.feed(data) == len(good) and scanner.done
        scanner = ChunkedScanner()
        consumed = 0
        for i in range(len(data)):
            consumed += scanner.feed(data[i : i + 1])
            if scanner.done:
                break
        assert consumed == len(good) and scanner.done


def test_chunked_scanner_many_tiny_chunks_in_one_read() -> None:
    """A 256 KiB read of 1-byte chunks is scanned in one call (bounded work per read)."""
    body = b"1\r\nx\r\n" * 40_000 + b"0\r\n\r\n"
    scanner = ChunkedScanner()
    assert scanner.feed(memoryview(body)) == len(body) and scanner.done
