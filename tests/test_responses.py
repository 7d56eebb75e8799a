"""The sans-IO response framer: never changes a byte, finds where each response ends exactly as
h11 does, and gives up (passes everything through) on what it cannot follow."""

from __future__ import annotations

import itertools

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunneld.responses import (
    MAX_RESPONSE_HEAD,
    ResponseDone,
    ResponseFramer,
    ResponseHead,
    Unframed,
)

from .speedups_impl import implementation  # noqa: F401  (the fixture)

# With the C extension's functions and with their pure-Python references (tests/speedups_impl.py).
pytestmark = pytest.mark.usefixtures("implementation")


def _responses(specs: list[tuple[str, int, str, bytes]]) -> tuple[bytes, list[bytes]]:
    """Bytes an h11 server sends for ``specs`` (method, status, framing, body) on one
    connection, and the methods in order."""
    conn = h11.Connection(h11.SERVER)
    out = b""
    methods = []
    for method, status, framing, body in specs:
        conn.receive_data(f"{method} / HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        assert isinstance(conn.next_event(), h11.Request)
        assert isinstance(conn.next_event(), h11.EndOfMessage)
        methods.append(method.encode())
        headers = [("x-n", str(len(methods)))]
        if framing == "length":
            headers.append(("content-length", str(len(body))))
        else:
            headers.append(("transfer-encoding", "chunked"))
        out += conn.send(h11.Response(status_code=status, headers=headers))
        if method != "HEAD" and status not in (204, 304):
            for i in range(0, len(body), 7):
                out += conn.send(h11.Data(data=body[i : i + 7]))
        out += conn.send(h11.EndOfMessage())
        conn.start_next_cycle()
    return out, methods


def _run(data: bytes, methods: list[bytes], cuts: list[int]) -> tuple[bytes, list[object]]:
    framer = ResponseFramer()
    for m in methods:
        framer.expect(m)
    out = b""
    events: list[object] = []
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in itertools.pairwise(points):
        for e in framer.feed(memoryview(data)[a:b]):
            if isinstance(e, ResponseHead):
                out += e.raw
            elif isinstance(e, (bytes, memoryview)):
                out += bytes(e)
            events.append(e)
    events += framer.close()
    return out, events


SPEC = st.tuples(
    st.sampled_from(["GET", "POST", "HEAD"]),
    st.sampled_from([200, 201, 204, 304, 404, 500]),
    st.sampled_from(["length", "chunked"]),
    st.binary(max_size=300),
)


@given(st.lists(SPEC, min_size=1, max_size=6), st.lists(st.integers(0, 10_000), max_size=12))
def test_every_byte_passes_and_every_response_ends_where_h11_says(specs, cuts) -> None:
    data, methods = _responses(specs)
    out, events = _run(data, methods, cuts)
    assert out == data  # nothing altered, nothing lost, nothing duplicated
    done = [e for e in events if isinstance(e, ResponseDone)]
    assert [d.status for d in done] == [s[1] for s in specs]
    for d, (method, status, _framing, body) in zip(done, specs, strict=True):
        if method != "HEAD" and status not in (204, 304):
            assert d.body >= len(body)  # the body bytes (chunk framing counted too)
    assert not any(isinstance(e, Unframed) for e in events)


def test_a_body_until_close_ends_at_close() -> None:
    framer = ResponseFramer()
    framer.expect(b"GET")
    events = framer.feed(b"HTTP/1.1 200 OK\r\n\r\nabc") + framer.feed(b"def")
    assert not any(isinstance(e, ResponseDone) for e in events)
    (done,) = framer.close()
    assert isinstance(done, ResponseDone) and (done.status, done.body) == (200, 6)


def test_informational_heads_then_the_real_one() -> None:
    framer = ResponseFramer()
    framer.expect(b"POST")
    data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    events = framer.feed(data)
    heads = [e.status for e in events if isinstance(e, ResponseHead)]
    done = [e for e in events if isinstance(e, ResponseDone)]
    assert heads == [100, 200] and [(d.status, d.body) for d in done] == [(200, 2)]


def test_101_and_what_it_cannot_follow_pass_through_untouched() -> None:
    cases = [
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n\x81\x02hi",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\nab",
        b"NOT HTTP AT ALL\r\n\r\nxyz",
        b"HTTP/1.1 200 OK\r\nbad header line\r\n\r\nxyz",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nnot a chunk",
    ]
    for data in cases:
        framer = ResponseFramer()
        framer.expect(b"GET")
        events = framer.feed(data) + framer.feed(b"more")
        out = b"".join(
            e.raw if isinstance(e, ResponseHead) else bytes(e)
            for e in events
            if isinstance(e, (ResponseHead, bytes, memoryview))
        )
        assert out == data + b"more", data
        assert any(isinstance(e, Unframed) for e in events), data
        assert not framer.following


def test_a_head_over_the_limit_is_passed_through_not_buffered_forever() -> None:
    framer = ResponseFramer()
    framer.expect(b"GET")
    head = b"HTTP/1.1 200 OK\r\n" + b"x-big: " + b"a" * MAX_RESPONSE_HEAD
    events = framer.feed(head)
    assert any(isinstance(e, Unframed) for e in events)
    assert b"".join(bytes(e) for e in events if isinstance(e, (bytes, memoryview))) == head


def test_request_id_header_is_noticed() -> None:
    framer = ResponseFramer()
    framer.expect(b"GET")
    (head, *_rest) = framer.feed(b"HTTP/1.1 204 No Content\r\nX-Request-Id: abc\r\n\r\n")
    assert isinstance(head, ResponseHead) and head.has_request_id


# -- ResponseFramer.whole: the one-step path for a response that arrives whole ------------------


def _outcomes(chunks: list[bytes], methods: list[bytes], *, whole: bool) -> list[object]:
    """What the access log learns from ``chunks``: (status, body bytes) per finished response,
    ("head", raw, whether it has an X-Request-Id) per head, ("unframed",): through ``whole``
    first where it applies (as ConnectionLog.response does) or through ``feed`` only."""
    framer = ResponseFramer()
    for m in methods:
        framer.expect(m)
    seen: list[object] = []
    for chunk in chunks:
        if whole:
            taken = framer.whole(chunk)
            if taken is not None:
                status, end = taken
                seen += [("head", chunk[:end], False), (status, len(chunk) - end)]
                continue
        for e in framer.feed(chunk):
            if isinstance(e, ResponseHead):
                seen.append(("head", e.raw, e.has_request_id))
            elif isinstance(e, ResponseDone):
                seen.append((e.status, e.body))
            elif isinstance(e, Unframed):
                seen.append(("unframed",))
    for e in framer.close():
        if isinstance(e, ResponseDone):
            seen.append((e.status, e.body))
    return seen


@given(st.lists(SPEC, min_size=1, max_size=6), st.lists(st.integers(0, 10_000), max_size=12))
def test_whole_learns_what_feed_learns_however_the_bytes_are_split(specs, cuts) -> None:
    data, methods = _responses(specs)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    chunks = [data[a:b] for a, b in itertools.pairwise(points) if b > a]
    assert _outcomes(chunks, methods, whole=True) == _outcomes(chunks, methods, whole=False)


CL = b"Content-Length: 3\r\n"
TRICKY = [
    b"HTTP/1.1 200 OK\r\n" + CL + b"\r\nabc",  # the common case: taken
    b"HTTP/1.0 404 Not Found\r\ncontent-LENGTH:   3 \t\r\nServer: x\r\n\r\nabc",  # taken
    b"HTTP/1.1 200 OK\r\n" + CL + b"\r\nab",  # body not all here
    b"HTTP/1.1 200 OK\r\n" + CL + b"\r\nabcHTTP/1.1 200 OK\r\n" + CL + b"\r\nabc",  # two
    b"HTTP/1.1 200 OK\r\n" + CL + CL + b"\r\nabc",  # the same length twice
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Request-Id: mine\r\n" + CL + b"\r\nabc",  # kept, not added
    b"HTTP/1.1 200 OK\r\nx-request-id: mine\r\n" + CL + b"\r\nabc",
    b"HTTP/1.1 200 OK\nContent-Length: 3\n\nabc",  # bare LF: not HTTP/1.1 framing
    b"HTTP/1.1 200 OK\r\nX: a\nContent-Length: 9\r\n" + CL + b"\r\nabc",
    b"HTTP/1.1 200 OK\r\nX: a\rContent-Length: 9\r\n" + CL + b"\r\nabc",
    b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n" + CL + b"\r\nabc",  # obs-fold
    b"HTTP/1.1 200 OK\r\nX: Content-Length: 9\r\n" + CL + b"\r\nabc",  # the name in a value
    b"HTTP/1.1 200 OK\r\nContent-Length : 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1_0\r\n\r\n0123456789",
    b"HTTP/1.1 204 No Content\r\n" + CL + b"\r\n",
    b"HTTP/1.1 304 Not Modified\r\n" + CL + b"\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n" + CL + b"\r\nabc",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n" + CL + b"\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/2 200 OK\r\n" + CL + b"\r\nabc",
    b"HTTP/1.1 600 Odd\r\n" + CL + b"\r\nabc",
    b"HTTP/1.1 200 OK\r\nBad Name: x\r\n" + CL + b"\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc\r\n",  # a CRLF after the body
    # names that contain, extend or resemble the three the framer reads: other headers, taken
    b"HTTP/1.1 200 OK\r\nX-Content-Length: 9\r\n" + CL + b"\r\nabc",
    b"HTTP/1.1 200 OK\r\nXContent-Length: 9\r\n" + CL + b"\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Lengths: 9\r\n" + CL + b"\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length-X: 9\r\n" + CL + b"\r\nabc",
    b"HTTP/1.1 200 OK\r\nTransfer-Encodings: chunked\r\n" + CL + b"\r\nabc",
    b"HTTP/1.1 200 OK\r\nX-Transfer-Encoding: chunked\r\n" + CL + b"\r\nabc",
    b"HTTP/1.1 200 OK\r\nX-Request-Ids: a\r\nX-Request: b\r\n" + CL + b"\r\nabc",
    b"HTTP/1.1 200 OK\r\nC: 1\r\nT: 2\r\nX: 3\r\n" + CL + b"\r\nabc",
    # the three in other cases and places: never taken
    b"HTTP/1.1 200 OK\r\ncONTENT-lENGTH: 3\r\nCONTENT-LENGTH: 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\n" + CL + b"TRANSFER-ENCODING: identity\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\n" + CL + b"x-REQUEST-id: mine\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length:\t3\r\nContent-Length: 4\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\tContent-Length: 4\r\n\r\nabc",  # obs-fold
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n Transfer-Encoding: chunked\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length:3\r\nX:\r\n\r\nabc",  # no spaces: taken
    b"HTTP/1.1 200 OK\r\n: 3\r\n" + CL + b"\r\nabc",  # an empty name
    b"HTTP/1.1 200 OK\r\nX-\x80: 3\r\n" + CL + b"\r\nabc",  # a non-token byte in a name
    b"HTTP/1.1 200 OK\r\nX: \x80\x00\xff\r\n" + CL + b"\r\nabc",  # any byte in a value: taken
    b"HTTP/1.1 200 OK\r\nContent-Length: 3 4\r\n\r\nabc4",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0003\r\n\r\nabc",  # leading zeros: taken
    b"HTTP/1.1 200 OK\r\nContent-Length: 1234567890123456789\r\n\r\nabc",  # 19 digits
    b"HTTP/1.1 20 OK\r\n" + CL + b"\r\nabc",
    b"HTTP/1.1 2000 OK\r\n" + CL + b"\r\nabc",
    b"HTTP/1.1 200\r\n" + CL + b"\r\nabc",  # no reason phrase: taken
    b"HTTP/1.1 200 \r\n" + CL + b"\r\nabc",  # an empty one: taken
    b"HTTP/1.1 200OK\r\n" + CL + b"\r\nabc",
    b"http/1.1 200 OK\r\n" + CL + b"\r\nabc",
    b"HTTP/1.1 599 Odd\r\n" + CL + b"\r\nabc",  # taken
    b"HTTP/1.1 199 Odd\r\n" + CL + b"\r\nabc",
]


def test_whole_takes_only_what_feed_would_frame_the_same_way() -> None:
    taken = []
    for i, data in enumerate(TRICKY):
        for method in (b"GET", b"HEAD"):
            got = _outcomes([data], [method], whole=True)
            assert got == _outcomes([data], [method], whole=False), (data, method)
            framer = ResponseFramer()
            framer.expect(method)
            if framer.whole(data) is not None:
                taken.append((i, method))
    # the plain ones, the name inside a value, an empty body, other names that resemble the
    # three, any byte in a value, leading zeros, no or an empty reason phrase, a 599; never
    # the answer to HEAD
    assert taken == [
        (i, b"GET") for i in (0, 1, 14, 22, 27, 28, 29, 30, 31, 32, 33, 34, 41, 44, 46, 50, 51, 54)
    ]


# Header lines built to confuse a check that looks for the names: the three names in any case,
# with prefixes, suffixes and spaces, empty or odd values, obs-folds, bare CR or LF.
_NAME = st.sampled_from(
    [
        b"Content-Length", b"content-length", b"CONTENT-LENGTH", b"Content-Lengthx",
        b"XContent-Length", b"Content-Length ", b" Content-Length", b"Content_Length",
        b"Transfer-Encoding", b"transfer-encoding", b"X-Transfer-Encoding", b"Transfer-Encodin",
        b"X-Request-Id", b"x-request-id", b"X-Request-Ids", b"X-Request", b"C", b"T", b"X",
        b"Server", b"Date", b"ETag", b"Cache-Control", b"x", b"", b"Na\x80me", b"a:b",
        b"Content Length", b"X Y",
    ]
)  # fmt: skip
_VALUE = st.one_of(
    st.sampled_from([b"3", b" 3 ", b"\t3", b"03", b"3, 3", b"3,4", b"-3", b"+3", b"", b"chunked"]),
    st.binary(max_size=8).map(lambda v: v.replace(b"\r", b"").replace(b"\n", b"")),
)
_FIELD = st.tuples(_NAME, _VALUE).map(lambda nv: nv[0] + b":" + nv[1] + b"\r\n")
_LINE = st.one_of(
    _FIELD,
    _FIELD,
    _FIELD,
    st.sampled_from(
        [b" folded\r\n", b"\tfolded\r\n", b"no colon\r\n", b"X: a\nb\r\n", b"X: a\rb\r\n"]
    ),
)
_STATUS = st.sampled_from(
    [b"HTTP/1.1 200 OK", b"HTTP/1.0 404 Not Found", b"HTTP/1.1 204 No Content",
     b"HTTP/1.1 304 Not Modified", b"HTTP/1.1 101 Switching", b"HTTP/1.1 100 Continue",
     b"HTTP/1.1 500", b"HTTP/1.2 200 OK", b"HTTP/1.1 200 O\rK"]
)  # fmt: skip


@settings(max_examples=1000)
@given(
    _STATUS,
    st.lists(_LINE, max_size=5),
    st.binary(max_size=6),
    st.sampled_from([b"GET", b"HEAD", b"POST"]),
)
def test_whole_agrees_with_feed_on_adversarial_heads(
    status: bytes, lines: list[bytes], body: bytes, method: bytes
) -> None:
    data = status + b"\r\n" + b"".join(lines) + b"\r\n" + body
    assert _outcomes([data], [method], whole=True) == _outcomes([data], [method], whole=False)
    # the same head with a Content-Length that fits the body: what ``whole`` is for
    fitted = status + b"\r\n" + b"".join(lines) + b"Content-Length: %d\r\n\r\n" % len(body)
    fitted += body
    assert _outcomes([fitted], [method], whole=True) == _outcomes([fitted], [method], whole=False)
