"""A connection's one request in flight held in C (tunneld/_speedups.c ``Pending``): with the C
extension, ``log_request`` keeps a request out of the connection's deque while nothing else is
in flight, and ``log_response`` takes its whole response without the framer; anything else
first moves it back (``spill``). Whatever the requests, bodies, responses (whole, split,
chunked, informational, HEAD, several in one read, garbage) and ends, a connection must send,
log and count exactly what the pure-Python reference (which holds no such request) does,
driven the way tunneld/public.py drives it."""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunneld import _speedups as C
from tunneld import accesslog
from tunneld.accesslog import AccessWriter, ConnectionLog
from tunneld.httphead import RequestHead
from tunneld.metrics import RequestStats

from .speedups_impl import SWITCHED
from .test_access_fast_path import Clock


def _response(status: int, body: bytes, **extra: bytes) -> bytes:
    head = b"HTTP/1.1 %d X\r\nServer: t\r\nContent-Length: %d\r\n" % (status, len(body))
    for name, value in extra.items():
        head += name.replace("_", "-").encode() + b": " + value + b"\r\n"
    return head + b"\r\n" + body


CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
# what a service may answer: each is one read, or two when the op says "split"
RESPONSES = {
    "whole": _response(200, b"hello"),
    "whole404": _response(404, b""),
    "big": _response(200, b"x" * 3000),
    "with-id": _response(200, b"ok", X_Request_Id=b"svc-1"),
    "chunked": CHUNKED,
    "204": b"HTTP/1.1 204 No Content\r\n\r\n",
    "continue": b"HTTP/1.1 100 Continue\r\n\r\n" + _response(200, b"ok"),
    "head-reply": _response(200, b""),  # a HEAD's answer looks like this with a length
    "two": _response(200, b"a") + _response(201, b"bb"),
    "short": _response(200, b"hello")[:-2],  # the rest never comes
    "trailing": _response(200, b"a") + b"HTTP/1.1 2",  # and the start of one nobody asked for
    "garbage": b"NOT HTTP\r\n\r\n",
}

OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("request"),
            st.sampled_from([b"GET", b"GET", b"POST", b"HEAD"]),
            st.sampled_from([None, b"client-7", b"bad id!"]),
        ),
        st.tuples(st.just("body"), st.integers(1, 3000)),
        st.tuples(st.just("response"), st.sampled_from(sorted(RESPONSES)), st.booleans()),
        st.tuples(st.just("tick"), st.integers(0, 3 * 10**9)),
        st.tuples(st.just("edge"), st.sampled_from([502, 504])),
    ),
    max_size=14,
)


def _run(impl: str, ops: list[tuple[Any, ...]], end: bool, level: int) -> tuple[Any, ...]:
    """``ops`` through one ConnectionLog as tunneld/public.py calls it, with the C functions or
    the references: the bytes for the client of each response, the lines, the metrics."""
    clock = Clock()
    outs: list[object] = []
    with pytest.MonkeyPatch.context() as mp:
        for module, name, reference in SWITCHED:
            mp.setattr(module, name, getattr(C, name) if impl == "c" else reference)
        mp.setattr(accesslog, "monotonic_ns", clock.monotonic_ns)
        mp.setattr(accesslog, "time_ns", clock.time_ns)
        mp.setattr(accesslog, "_ID_COUNTER", itertools.count(7))
        mp.setattr(accesslog.log, "level", level)
        logging.Logger.manager._clear_cache()  # type: ignore[attr-defined]
        loop = asyncio.new_event_loop()
        try:
            stream = io.StringIO()
            stats = RequestStats()
            conn = ConnectionLog("10.1.2.3", writer=AccessWriter(loop, "text", stream), stats=stats)
            conn.sandbox_id, conn.port = "sb1", 8080
            held = []
            for op in ops:
                fast = conn.fast
                if op[0] == "request":
                    headers = [(b"host", b"h")]
                    if op[2] is not None:
                        headers.append((b"x-request-id", op[2]))
                    head = RequestHead(op[1], b"/t", b"1.1", headers)
                    line = conn.request(head) if fast is None else accesslog.log_request(fast, head)
                    outs.append(line)
                    if impl == "c" and fast is not None:
                        held.append(fast[accesslog._S_INLINE].busy)
                elif op[0] == "body":
                    conn.body(b"b" * op[1])
                elif op[0] == "response":
                    data = RESPONSES[op[1]]
                    for part in (data[:20], data[20:]) if op[2] else (data,):
                        if fast is None:
                            outs.append(conn.response(part))
                        else:
                            outs.append(
                                accesslog.log_response(fast, conn, part) or conn.general(part)
                            )
                elif op[0] == "tick":
                    clock.mono += op[1]
                    clock.wall += op[1]
                else:
                    conn.edge_answered(op[1], "TEST")
            if end:
                conn.closed(service_ended=True)
            assert conn.writer is not None
            conn.writer.flush()
        finally:
            loop.close()
            logging.Logger.manager._clear_cache()  # type: ignore[attr-defined]
    stats.fold()
    metrics = (
        stats.duration.counts,
        stats.ttfb.counts,
        dict(stats.statuses),
        stats.bytes_in,
        stats.bytes_out,
        round(stats.duration.total, 6),
    )
    return outs, stream.getvalue(), metrics, held


@settings(max_examples=400, deadline=None)
@given(OPS, st.booleans(), st.sampled_from([logging.INFO, logging.WARNING]))
def test_what_a_connection_sends_logs_and_counts_is_the_references(
    ops: list[tuple[Any, ...]], end: bool, level: int
) -> None:
    ours = _run("c", ops, end, level)
    theirs = _run("python", ops, end, level)
    assert ours[:3] == theirs[:3]


def test_the_common_case_is_held_in_c_and_every_other_step_moves_it_back() -> None:
    """The cases the property above must cover do happen: a GET is held (busy) and its whole
    response taken there; a second request before the response, a HEAD, a body and a
    response that is not whole are each served by the deque's way, after the move."""
    ops: list[tuple[Any, ...]] = [
        ("request", b"GET", None),  # held
        ("response", "whole", False),  # taken in C
        ("request", b"GET", None),  # held again (its list reused)
        ("request", b"GET", b"client-7"),  # a second one: the first goes to the deque first
        ("response", "two", False),
        ("request", b"HEAD", None),  # never held
        ("response", "head-reply", False),
        ("request", b"POST", None),  # held, then a body moves it
        ("body", 10),
        ("response", "whole", False),
        ("request", b"GET", None),  # held, then a split response moves it
        ("response", "whole", True),
    ]
    outs, lines, _, held = _run("c", ops, False, logging.INFO)
    assert held == [1, 1, 0, 0, 1, 1]  # the pipelined one and the HEAD went the deque's way
    assert _run("python", ops, False, logging.INFO)[:2] == (outs, lines)
    assert lines.count("\n") == 6
    assert [line.split('"')[1] for line in lines.splitlines()] == [
        "GET /t", "GET /t", "GET /t", "HEAD /t", "POST /t", "GET /t",
    ]  # fmt: skip
    assert " 200 10 5B " in lines.splitlines()[4]  # the body counted after the move


def test_with_the_real_clocks_the_request_is_held_and_its_time_measured() -> None:
    """With time.monotonic_ns in the state the C reads the clock itself (no Python call): the
    request is held, and the line's duration lies within the time around the exchange."""
    loop = asyncio.new_event_loop()
    level = accesslog.log.level
    accesslog.log.setLevel(logging.INFO)
    try:
        stream = io.StringIO()
        conn = ConnectionLog("10.1.2.3", writer=AccessWriter(loop, "text", stream))
        conn.sandbox_id, conn.port = "sb1", 8080
        fast = conn.fast
        assert fast is not None and fast[accesslog._S_MONO] is time.monotonic_ns
        before = time.monotonic_ns()
        accesslog.log_request(fast, RequestHead(b"GET", b"/r", b"1.1", [(b"host", b"h")]))
        assert fast[accesslog._S_INLINE].busy == 1
        time.sleep(0.02)
        out = accesslog.log_response(fast, conn, RESPONSES["whole"])
        took_ms = (time.monotonic_ns() - before) / 1e6
        assert fast[accesslog._S_INLINE].busy == 0
        assert isinstance(out, bytes) and b"\r\nx-request-id: " in out
        assert conn.writer is not None
        conn.writer.flush()
    finally:
        accesslog.log.setLevel(level)
        loop.close()
    duration = float(stream.getvalue().split("B ")[1].split("ms")[0])
    assert 20.0 <= duration <= took_ms + 0.1


def test_a_held_request_is_logged_when_the_connection_ends_without_its_response() -> None:
    """The client or the service went away while the request was held in C: its line says
    so (``closed`` moves it to the deque first), exactly as the reference's."""
    for end_ops in (
        [("request", b"GET", None)],
        [("request", b"GET", None), ("response", "short", False)],
        [("request", b"GET", None), ("edge", 502)],
    ):
        ours = _run("c", end_ops, True, logging.INFO)
        assert ours[:3] == _run("python", end_ops, True, logging.INFO)[:3]
        assert ours[1].count("\n") == 1


# Sequences after which the framer is not idle although no request is in flight: the next
# request must not be held (the framer, not the C, follows its response)
NOT_IDLE = {
    "unframed": [("response", "garbage", False)],
    "a head begun": [("request", b"GET", None), ("response", "trailing", False)],
}


@pytest.mark.parametrize("name", sorted(NOT_IDLE))
def test_a_request_is_not_held_while_the_framer_is_busy(name: str) -> None:
    ops = [*NOT_IDLE[name], ("request", b"GET", None), ("response", "whole", False)]
    ops += [("request", b"GET", None), ("response", "whole", True)]
    ours = _run("c", ops, True, logging.INFO)
    assert ours[3][-2] == 0  # the request after it went the deque's way
    assert ours[:3] == _run("python", ops, True, logging.INFO)[:3]
