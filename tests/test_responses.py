"""The sans-IO response framer: never changes a byte, finds where each response ends exactly as
h11 does, and gives up (passes everything through) on what it cannot follow."""

from __future__ import annotations

import itertools

import h11
from hypothesis import given
from hypothesis import strategies as st

from tunneld.responses import (
    MAX_RESPONSE_HEAD,
    ResponseDone,
    ResponseFramer,
    ResponseHead,
    Unframed,
)


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
