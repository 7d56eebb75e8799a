"""The access log's one-step path for a response that arrives whole (tunneld/accesslog.py
``ConnectionLog.response`` and ``text_line``, tunneld/metrics.py ``RequestStats.whole``/``fold``):
what it logs, sends and counts must be exactly what the general path (the same response in two
reads: ``ResponseFramer.feed``, ``_write``, ``RequestStats.observe``) logs, sends and counts."""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import tracemalloc
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunneld import accesslog
from tunneld.accesslog import AccessWriter, ConnectionLog
from tunneld.httphead import RequestHead
from tunneld.metrics import FOLD_AFTER, REQUEST_BUCKETS, RequestStats

from .speedups_impl import implementation  # noqa: F401  (the fixture)

# With the C extension's functions and with their pure-Python references (tests/speedups_impl.py).
pytestmark = pytest.mark.usefixtures("implementation")


class Clock:
    """Stands in for time.monotonic_ns and time.time_ns in tunneld.accesslog."""

    def __init__(self) -> None:
        self.mono = 5_000_000_000
        self.wall = 1_780_000_000_123_456_789

    def monotonic_ns(self) -> int:
        return self.mono

    def time_ns(self) -> int:
        return self.wall


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    c = Clock()
    monkeypatch.setattr(accesslog, "monotonic_ns", c.monotonic_ns)
    monkeypatch.setattr(accesslog, "time_ns", c.time_ns)
    monkeypatch.setattr(accesslog, "_ID_COUNTER", accesslog._ID_COUNTER)  # restored after
    level = accesslog.log.level
    accesslog.log.setLevel(logging.INFO)
    try:
        yield c
    finally:
        accesslog.log.setLevel(level)


def _head(target: bytes, method: bytes = b"GET") -> RequestHead:
    return RequestHead(method, target, b"1.1", [(b"host", b"sb.example")])


RESPONSE_HEAD = (
    b"HTTP/1.1 %d OK\r\nServer: nginx\r\nContent-Type: text/plain\r\n"
    b"Content-Length: %d\r\nConnection: keep-alive\r\n\r\n"
)


def _exchange(
    clock: Clock,
    fmt: str,
    *,
    whole: bool,
    target: bytes,
    status: int,
    body_in: int,
    body_out: int,
    took_ns: int,
    client_id: bytes | None,
) -> tuple[str, bytes, RequestStats]:
    """One request and its response through a ConnectionLog: (the line written, the bytes for
    the client, the metrics). ``whole``: the response in one read, else in two."""
    clock.mono, clock.wall = Clock().mono, Clock().wall  # both paths from the same time
    accesslog._ID_COUNTER = itertools.count(7)  # and the same new request id
    loop = asyncio.new_event_loop()
    try:
        stream = io.StringIO()
        stats = RequestStats()
        conn = ConnectionLog("10.1.2.3", writer=AccessWriter(loop, fmt, stream), stats=stats)
        conn.sandbox_id, conn.port = "sb1", 8080
        head = _head(target)
        if client_id is not None:
            head.headers.append((b"x-request-id", client_id))
        conn.request(head)
        if body_in:
            conn.body(b"b" * body_in)
        clock.mono += took_ns
        clock.wall += took_ns
        data = (RESPONSE_HEAD % (status, body_out)) + b"o" * body_out
        parts = [data] if whole else [data[:20], data[20:]]
        out = b"".join(conn.response(part) for part in parts)
        assert conn.writer is not None
        conn.writer.flush()
    finally:
        loop.close()
    return stream.getvalue(), out, stats


CASES = [
    # target, status, body_in, body_out, took_ns, client's X-Request-Id
    (b"/1k", 200, 0, 1024, 1_234_567, None),
    (b"/", 404, 0, 0, 50_000, None),  # rounds up to 0.1 ms
    (b"/a?b=c%20d", 201, 999, 999, 99_949_999, b"client.id-1"),  # 99.9 ms: the last in the table
    (b"/x", 503, 1000, 5000, 99_950_000, None),  # 100.0 ms: formatted, not looked up
    (b"/caf\xc3\xa9/\xff", 200, 12, 3, 2_500_000_000, None),  # non-ASCII target bytes
    (b"/slow", 299, 123_456, 7_654_321, 301_000_000_000, None),
]


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("case", CASES, ids=[c[0].decode("latin-1") for c in CASES])
def test_a_whole_response_is_logged_sent_and_counted_as_the_general_path_does(
    clock: Clock, fmt: str, case: tuple[bytes, int, int, int, int, bytes | None]
) -> None:
    target, status, body_in, body_out, took_ns, client_id = case
    args = dict(
        target=target,
        status=status,
        body_in=body_in,
        body_out=body_out,
        took_ns=took_ns,
        client_id=client_id,
    )
    line, out, stats = _exchange(clock, fmt, whole=True, **args)  # type: ignore[arg-type]
    line2, out2, stats2 = _exchange(clock, fmt, whole=False, **args)  # type: ignore[arg-type]
    assert line.count("\n") == 1
    assert line == line2
    assert out == out2
    assert out.count(b"x-request-id: ") == 1
    stats.fold()
    assert stats.duration.counts == stats2.duration.counts
    assert stats.ttfb.counts == stats2.ttfb.counts
    assert stats.duration.total == pytest.approx(stats2.duration.total)
    assert stats.statuses == stats2.statuses
    assert (stats.bytes_in, stats.bytes_out) == (stats2.bytes_in, stats2.bytes_out)
    if fmt == "text":
        # what the line says, spelled out once
        method_target = f"GET {target.decode('latin-1')}"
        assert f' INFO    tunneld.access: 10.1.2.3 "{method_target}" {status} ' in line
        assert f" {body_in} {body_out}B " in line and " sb1:8080 id=" in line


def test_the_worker_tag_and_a_new_second_reach_the_whole_path(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(accesslog, "WORKER", 2)
    loop = asyncio.new_event_loop()
    try:
        stream = io.StringIO()
        conn = ConnectionLog("10.1.2.3", writer=AccessWriter(loop, "text", stream))
        conn.sandbox_id, conn.port = "sb1", 8080
        data = (RESPONSE_HEAD % (200, 2)) + b"ok"
        for _ in range(2):
            conn.request(_head(b"/"))
            conn.response(data)
            clock.wall += 1_000_000_000  # the next line is a second later
        conn.sandbox_id, conn.port = "sb2", 9090  # the shell set another: the line follows
        conn.request(_head(b"/"))
        conn.response(data)
        assert conn.writer is not None
        conn.writer.flush()
    finally:
        loop.close()
    lines = stream.getvalue().splitlines()
    assert [line[:23] for line in lines] == [
        _stamp(clock.wall - 2_000_000_000),
        _stamp(clock.wall - 1_000_000_000),
        _stamp(clock.wall),
    ]
    assert all(" INFO    tunneld.access[w2]: 10.1.2.3 " in line for line in lines)
    assert [line.split(" id=")[0].rsplit(" ", 1)[1] for line in lines] == [
        "sb1:8080",
        "sb1:8080",
        "sb2:9090",
    ]


def _stamp(ns: int) -> str:
    """The stdlib formatter's asctime for a time in ns."""
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "", None, None)
    record.created = ns / 1e9
    record.msecs = (ns % 1_000_000_000) // 1_000_000
    return logging.Formatter("%(asctime)s").format(record)


def test_quiet_and_a_raised_level_write_nothing_but_still_count(clock: Clock) -> None:
    loop = asyncio.new_event_loop()
    try:
        for quiet, level in ((True, logging.INFO), (False, logging.WARNING)):
            accesslog.log.setLevel(level)
            stream = io.StringIO()
            stats = RequestStats()
            conn = ConnectionLog(
                "10.1.2.3", quiet=quiet, writer=AccessWriter(loop, "text", stream), stats=stats
            )
            conn.request(_head(b"/"))
            assert conn.response((RESPONSE_HEAD % (200, 2)) + b"ok").endswith(b"\r\n\r\nok")
            assert conn.writer is not None
            conn.writer.flush()
            assert stream.getvalue() == ""
            assert len(stats.whole) == 1  # one observation
    finally:
        loop.close()


# -- RequestStats: whole responses counted by its Tally --------------------------------------------

OBSERVATION = st.tuples(
    st.one_of(  # ns
        st.sampled_from([round(b * 1e9) for b in REQUEST_BUCKETS]),  # on a bound: in its bucket
        st.integers(0, 400 * 10**9),
    ),
    st.integers(0, 999),  # whole responses are 200-599; the fold must class any status
    st.integers(0, 10**9),
    st.integers(0, 10**9),
)


@given(st.lists(OBSERVATION, max_size=50), st.integers(1, 4))
def test_batched_observations_count_as_one_at_a_time(
    observations: list[tuple[int, int, int, int]], batches: int
) -> None:
    batched, single = RequestStats(), RequestStats()
    for i, (ns, status, body_in, body_out) in enumerate(observations):
        batched.whole.add(ns, status, body_in, body_out)
        if i % batches == 0:
            batched.fold()
        single.observe(ns / 1e9, ns / 1e9, status, body_in, body_out)
    ours, theirs = list(batched.collect()), list(single.collect())  # a scrape folds the rest
    assert len(batched.whole) == 0
    assert [m.name for m in ours] == [m.name for m in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert len(a.samples) == len(b.samples)
        for x, y in zip(a.samples, b.samples, strict=True):
            assert (x.name, x.labels) == (y.name, y.labels)
            assert x.value == pytest.approx(y.value, rel=1e-9, abs=1e-9)


def test_counting_whole_responses_keeps_nothing_per_response(clock: Clock) -> None:
    """The Tally's memory stays bounded however many responses it counts between scrapes (the
    C one keeps no object per response; the Python one at most FOLD_AFTER observations), and
    every response is counted."""
    stats = RequestStats()
    conn = ConnectionLog("10.1.2.3", quiet=True, stats=stats)
    data = (RESPONSE_HEAD % (200, 2)) + b"ok"

    def respond(n: int) -> None:
        for k in range(n):
            clock.mono += 1_000 * k  # a float each (under 2**53 ns)
            conn.request(_head(b"/"))
            conn.response(data)

    respond(FOLD_AFTER + 1)  # warm: the Python one's batch grown once
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        respond(FOLD_AFTER * 8)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # kept per response: ~56 bytes (a list slot and a float at least) x 8192 = ~450 KiB
    assert grown < 128 * 1024
    assert len(stats.whole) == FOLD_AFTER * 9 + 1
    stats.fold()
    assert sum(stats.duration.counts) == FOLD_AFTER * 9 + 1 == stats.statuses["2xx"]
    assert len(stats.whole) == 0
