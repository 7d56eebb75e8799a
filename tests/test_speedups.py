"""The optional C extension (tunneld/_speedups.c) against its pure-Python references
(tunneld/responses.py and tunneld/accesslog.py ``*_py``): the same result on arbitrary and hostile
bytes, None where the reference finds no match, nothing left behind after many calls, and built
and used where ``make setup`` installed tunneld (CI)."""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import subprocess
import sys
import time
import tracemalloc
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.e2e.procs import Processes
from tunneld import _speedups as C  # not built: this module errors (CI must build it)
from tunneld import speedups
from tunneld.accesslog import (
    AccessWriter,
    ConnectionLog,
    _logger_dict,
    begin_request_py,
    log_request_py,
    log_response_py,
    request_ids_py,
    text_line_py,
    whole_response_py,
)
from tunneld.httphead import RequestHead
from tunneld.metrics import REQUEST_BUCKETS, tally_py
from tunneld.responses import ResponseFramer, simple_head_py

from .test_responses import _LINE, _STATUS, TRICKY

RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 03 Dec 2026 12:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 5\r\n"
    b'Connection: keep-alive\r\nETag: "6929a000-5"\r\n\r\nhello'
)


def test_the_extension_is_built_and_used_unless_switched_off() -> None:
    """``make setup`` (pip install -e) compiles it, so CI runs the C path; the environment
    variable switches a process to the pure-Python code."""
    assert not speedups.DISABLED, "the tests run with TUNNELD_NO_EXTENSIONS set"
    assert speedups.c is C
    code = (
        "from tunneld import accesslog, responses, speedups\n"
        "print(speedups.describe(), responses.simple_head is responses.simple_head_py,"
        " accesslog.text_line is accesslog.text_line_py,"
        " accesslog.request_ids is accesslog.request_ids_py,"
        " accesslog.whole_response is accesslog.whole_response_py)"
    )
    out = {}
    for value in ("1", ""):
        env = {**os.environ, "TUNNELD_NO_EXTENSIONS": value}
        run = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0, run.stderr
        out[value] = run.stdout.split()
    assert out["1"][-4:] == ["True"] * 4 and "TUNNELD_NO_EXTENSIONS" in " ".join(out["1"])
    assert out[""][-4:] == ["False"] * 4 and out[""][0] == "C"


def test_tunneld_serve_says_which_implementation_its_access_log_uses(procs: Processes) -> None:
    """A real ``tunneld serve --access-log``: its start says C or pure Python (and why)."""
    for value, said in (("", "C speedups"), ("1", "pure Python (TUNNELD_NO_EXTENSIONS is set)")):
        env = procs.env(
            TUNNELD_ADMIN_TOKEN=procs.admin_token,
            TUNNELD_SECRET=procs.secret,
            TUNNELD_NO_EXTENSIONS=value,
        )
        procs.start_edge("--access-log", env=env)
        edge = procs.edge
        assert edge is not None
        expected = f"access log on, its per-request work in {said}"
        deadline = time.monotonic() + 30
        while expected not in procs.output(edge) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert expected in procs.output(edge)
        assert procs.stop(edge) == 0


# -- simple_head: _SIMPLE_RE and the checks of ResponseFramer.whole -------------------------------


def _same_head(data: bytes) -> None:
    assert C.simple_head(data) == simple_head_py(data), data


def test_simple_head_on_the_tricky_heads_their_prefixes_and_one_byte_changes() -> None:
    heads = [*TRICKY, RESPONSE]
    for data in heads:
        for cut in range(len(data) + 1):
            _same_head(data[:cut])
            _same_head(data[:cut] + b"\r\n\r\n")
    for data in heads:
        for i in range(len(data)):
            for byte in (b"\r", b"\n", b" ", b":", b"\t", b"\x00", b"\xff", b"0", b"a", b"A"):
                _same_head(data[:i] + byte + data[i + 1 :])
                _same_head(data[:i] + byte + data[i:])
            _same_head(data[:i] + data[i + 1 :])
    taken = [d for d in heads if C.simple_head(d) is not None]
    assert len(taken) >= 10  # the comparison above covers matches, not only "no match"


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_simple_head_on_arbitrary_bytes(data: bytes) -> None:
    _same_head(data)
    _same_head(b"HTTP/1.1 200 OK\r\n" + data)


@settings(max_examples=1000)
@given(_STATUS, st.lists(_LINE, max_size=6), st.binary(max_size=6), st.integers(0, 12))
def test_simple_head_on_adversarial_heads(
    status: bytes, lines: list[bytes], body: bytes, extra: int
) -> None:
    data = status + b"\r\n" + b"".join(lines) + b"\r\n" + body
    _same_head(data)
    for length in (len(body), len(body) + extra, max(0, len(body) - extra)):
        fitted = status + b"\r\n" + b"".join(lines) + b"Content-Length: %d\r\n\r\n" % length
        _same_head(fitted + body)
        _same_head(fitted + body + b"x" * extra)


def test_simple_head_on_every_byte_at_every_place_of_a_long_name() -> None:
    """A header name is scanned sixteen bytes at a time while it holds letters, digits and '-':
    every byte value, at each place within and across those blocks (and in the last bytes of
    the data, where the scan goes byte by byte), is taken or refused as the reference does."""
    name = bytearray(b"X-Abcdefghijklmnopqrstuvwxyz-0123456789")  # 39: two blocks and a rest
    for at in (0, 1, 9, 14, 15, 16, 17, 31, 32, 37, 38):
        for byte in range(256):
            name[at] = byte
            fitted = b"HTTP/1.1 200 OK\r\n" + bytes(name) + b": v\r\nContent-Length: 0\r\n\r\n"
            _same_head(fitted)
            _same_head(fitted[: len(b"HTTP/1.1 200 OK\r\n") + at + 1])  # ends inside the name
        name[at] = ord("a")


@settings(max_examples=300)
@given(
    st.lists(st.binary(max_size=40).map(lambda v: v.replace(b"\r", b"").replace(b"\n", b""))),
    st.sampled_from([b"Content-Length", b"content-length", b"CoNtEnT-LeNgTh"]),
    st.text("0123456789 \t", min_size=0, max_size=22).map(str.encode),
    st.integers(0, 3),
)
def test_simple_head_on_values_and_lengths(
    values: list[bytes], name: bytes, length: bytes, where: int
) -> None:
    """Long values (the eight-bytes-at-a-time scan) and Content-Length values of any shape."""
    lines = [b"X-V%d: %s\r\n" % (i, v) for i, v in enumerate(values)]
    lines.insert(min(where, len(lines)), name + b":" + length + b"\r\n")
    head = b"HTTP/1.1 404 Not Found\r\n" + b"".join(lines) + b"\r\n"
    digits = length.strip(b" \t")
    body = b"b" * (int(digits) if digits.isdigit() and int(digits) < 100 else 3)
    _same_head(head + body)


# -- whole_response: the framer's checks, its state after, the id line ----------------------------


def _framer(methods: list[bytes], prefix: bytes, raw: bool) -> ResponseFramer:
    framer = ResponseFramer()
    for m in methods:
        framer.expect(m)
    if prefix:
        framer.feed(prefix)  # a partial head (kept in _buf) or a body in progress
    if raw:
        framer.feed(b"NOT HTTP\r\n\r\n")  # unframed from here
    return framer


def _state(framer: ResponseFramer) -> tuple[object, ...]:
    return (framer._state, bytes(framer._buf), list(framer._methods), framer._remaining)


def _request(id_line: bytes, started: int, body_in: int) -> list[Any]:
    """A request in flight as ConnectionLog keeps it (tunneld/accesslog.py)."""
    return [b"GET", b"/", b"id", started, None, body_in, None, id_line, 0, 0]


@settings(max_examples=500)
@given(
    st.one_of(st.sampled_from([*TRICKY, RESPONSE]), st.binary(max_size=80)),
    st.lists(st.sampled_from([b"GET", b"HEAD", b"POST"]), max_size=3),
    st.sampled_from([b"", b"HTTP/1.1 2", b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab"]),
    st.booleans(),
    st.binary(max_size=30),
    st.integers(0, 2**70),
    st.integers(0, 2**64),
    st.integers(0, 10**12),
    st.booleans(),
)
def test_whole_response_does_what_the_reference_does(
    data: bytes,
    methods: list[bytes],
    prefix: bytes,
    raw: bool,
    id_line: bytes,
    now: int,
    started: int,
    body_in: int,
    metrics: bool,
) -> None:
    ours, theirs = _framer(methods, prefix, raw), _framer(methods, prefix, raw)
    request_c, request_py = _request(id_line, started, body_in), _request(id_line, started, body_in)
    kept_c = C.tally(REQUEST_BUCKETS) if metrics else None
    kept_py = tally_py(REQUEST_BUCKETS) if metrics else None
    got = C.whole_response(ours, data, request_c, now, kept_c)
    assert got == whole_response_py(theirs, data, request_py, now, kept_py)
    assert _state(ours) == _state(theirs)
    assert request_c == request_py
    assert _taken(kept_c) == _taken(kept_py)


def _taken(kept: Any) -> object:
    """What a Tally (or None) counted: its length and ``take()``, the sum of seconds to the ns
    (the C adds each duration as it comes, the reference a batch sorted: the last bits differ;
    each duration is whole ns, so the rounded sums are equal)."""
    if kept is None:
        return None
    n = len(kept)
    counts, total, statuses, body_in, body_out = kept.take()
    return n, (counts, round(total, 9), statuses, body_in, body_out)


def test_whole_response_notes_the_response_and_inserts_the_line_before_the_blank_line() -> None:
    framer = _framer([b"GET", b"GET"], b"", False)
    request = _request(b"x-request-id: abc\r\n", 1_000, 7)
    kept = C.tally(REQUEST_BUCKETS)
    out = C.whole_response(framer, RESPONSE, request, 2_501_000, kept)
    assert out == RESPONSE.replace(b"\r\n\r\n", b"\r\nx-request-id: abc\r\n\r\n")
    assert request[4:] == [2_500_000, 7, None, b"x-request-id: abc\r\n", 200, 5]
    assert list(framer._methods) == [b"GET"]
    # 0.0025 s: in the bucket of its bound (le="0.0025"), the second
    assert kept.take() == ([0, 1] + [0] * 15, 0.0025, [0, 1, 0, 0, 0, 0], 7, 5)


def test_whole_response_refuses_bad_arguments_before_it_changes_anything() -> None:
    for request, kept, now in (
        (_request(b"x", 0, 0)[:9], None, 1),  # too short
        (_request(None, 0, 0), None, 1),  # type: ignore[arg-type]  # an id line not bytes
        (_request(b"x", 0, 0), (), 1),  # kept not a Tally
        (_request(b"x", 0, 0), [], 1),  # (a list was, before the Tally)
        (_request(b"x", 0, 0), tally_py(REQUEST_BUCKETS), 1),  # nor the Python one
        (_request(b"x", 0, 0), None, "1"),  # now not a number
    ):
        framer = _framer([b"GET"], b"", False)
        before = list(request)
        with pytest.raises(TypeError):
            C.whole_response(framer, RESPONSE, request, now, kept)  # type: ignore[arg-type]
        assert list(framer._methods) == [b"GET"] and request == before


# -- tally: the metrics of whole responses ---------------------------------------------------------

_NS = st.one_of(
    st.sampled_from([round(b * 1e9) for b in REQUEST_BUCKETS]),  # on a bound: in its bucket
    st.integers(0, 400 * 10**9),
    st.integers(-(2**70), 2**70),  # past 2**53: Python's division, as the reference's
)
_BYTES = st.one_of(st.integers(0, 10**12), st.integers(2**64 - 3, 2**66))  # past 64 bits: exact


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(
            _NS, st.one_of(st.integers(100, 599), st.integers(-(2**70), 2**70)), _BYTES, _BYTES
        ),
        max_size=40,
    ),
    st.integers(1, 50),
)
def test_tally_counts_what_the_reference_counts(
    observations: list[tuple[int, int, int, int]], take_every: int
) -> None:
    """The same counts per bucket and status class and the same byte sums (ints of any size,
    exact), taken at the same points; the sums of seconds agree up to the order of addition
    (each order's rounding is within n * 2**-52 of the sum of the terms' sizes: with large
    terms of both signs that is far more than the sum itself)."""
    ours, theirs = C.tally(REQUEST_BUCKETS), tally_py(REQUEST_BUCKETS)
    sizes = 0.0
    for i, observation in enumerate(observations, 1):
        ours.add(*observation)
        theirs.add(*observation)
        sizes += abs(observation[0] / 1e9)
        assert len(ours) == len(theirs)
        if i % take_every == 0 or i == len(observations):
            (c1, t1, s1, i1, o1), (c2, t2, s2, i2, o2) = ours.take(), theirs.take()
            assert (c1, s1, i1, o1) == (c2, s2, i2, o2)
            assert t1 == pytest.approx(
                t2, rel=1e-12, abs=1e-12 + len(observations) * 2**-52 * sizes
            )
            assert len(ours) == 0
            sizes = 0.0
    assert ours.take() == theirs.take() == ([0] * 17, 0.0, [0] * 6, 0, 0)


def test_tally_refuses_bad_arguments_and_counts_nothing_then() -> None:
    for bounds in ((0.5, 0.1), (1.0, 1.0), (float("nan"),), tuple(range(65)), ("a",), 3):
        with pytest.raises((TypeError, ValueError)):
            C.tally(bounds)  # type: ignore[arg-type]
    tally = C.tally(REQUEST_BUCKETS)
    for args in (
        (1, "200", 0, 0),  # a status not an int
        ("1", 200, 0, 0),  # a duration not a number
        (1, 200, b"0", 0),  # sizes not ints
        (1, 200, 0, None),
        (1, 200, 0),  # too few
    ):
        with pytest.raises(TypeError):
            tally.add(*args)
        assert len(tally) == 0
    assert tally.take() == ([0] * 17, 0.0, [0] * 6, 0, 0)


# -- text_line ------------------------------------------------------------------------------------

_INT = st.one_of(st.integers(0, 1100), st.integers(0, 2**62))


@settings(max_examples=500)
@given(
    st.binary(max_size=30),
    st.one_of(st.integers(0, 2**62), st.integers(1_780_000_000 * 10**9, 1_790_000_000 * 10**9)),
    st.integers(-1, 2),
    st.binary(max_size=30),
    st.binary(max_size=10),
    st.binary(max_size=60),
    st.binary(max_size=40),
    _INT,
    st.integers(100, 999),
    _INT,
    st.one_of(_INT, st.integers(2**63 - 50_001, 2**63 - 50_001)),
    st.binary(max_size=30),
)
def test_text_line_writes_what_the_reference_writes(
    stamp: bytes,
    now: int,
    sec_offset: int,
    lead: bytes,
    method: bytes,
    target: bytes,
    rid: bytes,
    body_in: int,
    status: int,
    body_out: int,
    ns: int,
    site: bytes,
) -> None:
    """``sec`` in the second of ``now`` (offset 0: a line) or another (-1: nothing appended)."""
    sec = now // 10**9 + sec_offset
    request = [method, target, rid, 0, ns, body_in, None, b"", status, body_out]
    ours: list[bytes] = [b"before"]
    theirs: list[bytes] = [b"before"]
    n = C.text_line(ours, stamp, sec, now, lead, request, site)
    assert n == text_line_py(theirs, stamp, sec, now, lead, request, site)
    assert n == (2 if sec_offset == 0 else -1)
    assert ours == theirs


def test_text_line_refuses_what_it_cannot_format() -> None:
    request = [b"GET", b"/", b"id", 0, 0, 0, None, b"", 200, 0]
    good: list[Any] = [[], b"s", 0, 1, b"l", request, b"x"]
    bad = {
        0: ((), TypeError),
        1: ("s", TypeError),
        2: (0.0, TypeError),
        3: (-1, ValueError),
        5: (request[:9], TypeError),
        6: ("x", TypeError),
    }
    for index, (value, error) in bad.items():
        args = list(good)
        args[index] = value
        with pytest.raises(error):
            C.text_line(*args)
    for item, value, error in (
        (0, "GET", TypeError),
        (1, None, TypeError),
        (2, 3, TypeError),
        (4, None, TypeError),  # no time noted
        (4, 2**63 - 1, OverflowError),
        (5, -1, ValueError),
        (8, 2**64, OverflowError),
        (9, 1.5, TypeError),
    ):
        broken = list(request)
        broken[item] = value
        with pytest.raises(error):
            C.text_line([], b"s", 0, 1, b"l", broken, b"x")
    with pytest.raises(TypeError):
        C.text_line([], b"s", 1)  # type: ignore[call-arg]
    assert good[0] == []  # nothing appended by a refused call


# -- request_ids ----------------------------------------------------------------------------------

_ID_NAME = st.sampled_from(
    [b"x-request-id", b"X-Request-Id", b"x-request-ids", b"x-request-i", b"host", b""]
)
_ID_VALUE = st.one_of(
    st.text("abcXYZ019._:-", min_size=0, max_size=202).map(str.encode),
    st.binary(max_size=12),
    st.sampled_from([b"a" * 200, b"a" * 201, b"ok id", b"\xffid", b"id\x00"]),
)


@settings(max_examples=500)
@given(
    st.lists(st.tuples(_ID_NAME, _ID_VALUE), max_size=4),
    st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([2**64 - 1, 2**64, 2**70, -1, -(2**65)])),
    st.binary(max_size=20),
)
def test_request_ids_are_what_the_reference_makes(
    headers: list[tuple[bytes, bytes]], start: int, prefix: bytes
) -> None:
    """With itertools.count and with the C's id_counter (whose values make_ids reads in C while
    they fit in 64 bits), two requests each: the same ids, across 2**64 too."""
    for ours in (itertools.count(start), C.id_counter(start)):
        theirs = itertools.count(start)
        for _ in range(2):
            assert C.request_ids(headers, ours, prefix) == request_ids_py(headers, theirs, prefix)
        assert next(ours) == next(theirs)  # the counter advanced the same


class _IntStart(int):
    pass


@pytest.mark.parametrize(
    "start", [0, 7, 2**30 - 1, 2**63, 2**64 - 3, 2**64, 2**70, -2, -(2**65), _IntStart(5), True]
)
def test_id_counter_counts_as_itertools_count(start: int) -> None:
    ours, theirs = C.id_counter(start), itertools.count(start)
    assert iter(ours) is ours
    for _ in range(5):
        a, b = next(ours), next(theirs)
        assert (a, type(a)) == (b, type(b))
    with pytest.raises(TypeError):
        C.id_counter(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        C.id_counter("1")  # type: ignore[arg-type]


def _outcome(call: Callable[..., object], *args: Any) -> object:
    try:
        return call(*args)
    except Exception as e:  # the kind of error, not its message
        return type(e)


def test_request_ids_refuse_what_the_reference_refuses() -> None:
    cases: list[tuple[Any, Any]] = [
        ([(b"x-request-id",)], b""),  # not a pair
        ([(b"x-request-id", b"a", b"b")], b""),
        ([(b"x-request-id", "text")], b""),  # a str value
        ([(b"x-request-id", None)], b""),
        ([b"xy"], b""),  # bytes unpack into two ints: no error, a new id
        ([None], b""),
        (None, b""),
        (((b"x-request-id", b"gen"),), b""),  # any iterable (here a tuple)
    ]
    for headers, prefix in cases:
        ours = _outcome(C.request_ids, headers, itertools.count(), prefix)
        theirs = _outcome(request_ids_py, headers, itertools.count(), prefix)
        assert ours == theirs, (headers, ours, theirs)
    assert _outcome(C.request_ids, [], itertools.count(), b"") == (
        b"0000000000000000",
        b"x-request-id: 0000000000000000\r\n",
    )
    counters: list[Any] = [[1, 2], iter([])]
    for counter in counters:  # not an iterator; exhausted
        ours = _outcome(C.request_ids, [], counter, b"")
        assert ours == _outcome(request_ids_py, [], counter, b"")
        assert ours in (TypeError, StopIteration)
    with pytest.raises(TypeError):
        C.request_ids([], itertools.count(), "p")  # type: ignore[arg-type]


def test_request_ids_survive_a_name_that_changes_the_headers() -> None:
    """A name's ``__eq__`` (any object may stand in for bytes) that empties the list being read:
    no read past its end, the same result as the reference."""

    class Sneaky(bytes):
        def __eq__(self, other: object) -> bool:
            headers.clear()
            return False

        __hash__ = bytes.__hash__

    for impl in (C.request_ids, request_ids_py):
        headers = [(Sneaky(b"a"), b"b"), (b"x-request-id", b"kept")]
        rid, _line = impl(headers, itertools.count(5), b"p")
        assert rid == b"p0000000000000005"


# -- begin_request --------------------------------------------------------------------------------


def _begun(impl: Callable[..., list[Any]], head: RequestHead, waiting: int, raw: bool) -> object:
    """What ``impl`` returns and leaves behind, from a fresh counter, requests and framer."""
    requests: deque[list[Any]] = deque([[b"OLD"]] * waiting)
    framer = _framer([b"GET"] * min(waiting, 1100), b"", raw)
    counter = itertools.count(41)
    request = impl(head, counter, b"p", 12345, requests, framer)
    return request, list(requests)[-1] is request, len(requests), _state(framer), next(counter)


@settings(max_examples=300)
@given(
    st.lists(st.tuples(_ID_NAME, _ID_VALUE), max_size=4),
    st.sampled_from([b"GET", b"HEAD", b"POST", b""]),
    st.binary(max_size=20),
    st.sampled_from([0, 1, 1023, 1024, 1025]),
    st.booleans(),
)
def test_begin_request_does_what_the_reference_does(
    headers: list[tuple[bytes, bytes]], method: bytes, target: bytes, waiting: int, raw: bool
) -> None:
    head = RequestHead(method, target, b"1.1", headers)
    assert _begun(C.begin_request, head, waiting, raw) == _begun(
        begin_request_py, head, waiting, raw
    )


def test_begin_request_refuses_what_the_reference_refuses() -> None:
    good = RequestHead(b"GET", b"/", b"1.1", [(b"host", b"h")])
    for head, requests, framer in (
        (object(), deque(), ResponseFramer()),  # no headers
        (RequestHead(b"GET", b"/", b"1.1", [(b"x-request-id", "x")]), deque(), ResponseFramer()),
        (good, object(), ResponseFramer()),  # requests without a length
        (good, deque(), object()),  # a framer without a state
    ):
        ours = _outcome(C.begin_request, head, itertools.count(), b"p", 1, requests, framer)
        theirs = _outcome(begin_request_py, head, itertools.count(), b"p", 1, requests, framer)
        assert ours == theirs and isinstance(ours, type), (ours, theirs)


# -- attributes of __slots__ classes, read without a lookup while the class stays the same ---------


def _whole(impl: Callable[..., object], framer: ResponseFramer) -> object:
    return _outcome(impl, framer, RESPONSE, _request(b"x-request-id: a\r\n", 0, 0), 7, None)


def test_a_changed_class_a_subclass_and_an_unset_slot_read_as_python_reads_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The C code reads a slot at its offset, cached per class: after the class changes (here
    its ``_methods`` and a head's ``method`` become properties), for a subclass that overrides
    one, and for a slot never set, it must read what Python reads."""
    for _ in range(3):  # cached by now
        assert _whole(C.whole_response, _framer([b"GET"], b"", False)) == _whole(
            whole_response_py, _framer([b"GET"], b"", False)
        )
    assert isinstance(_whole(C.whole_response, _framer([b"GET"], b"", False)), bytes)
    ours, theirs = _framer([b"GET"], b"", False), _framer([b"GET"], b"", False)
    with monkeypatch.context() as m:
        m.setattr(ResponseFramer, "_methods", property(lambda self: deque([b"HEAD"])))
        assert _whole(C.whole_response, ours) is None
        assert _whole(whole_response_py, theirs) is None
    assert isinstance(_whole(C.whole_response, _framer([b"GET"], b"", False)), bytes)

    class Headless(ResponseFramer):
        # always a body in progress (no head is taken); what __init__ sets is dropped
        _state = property(lambda self: 1, lambda self, value: None)  # type: ignore[assignment]

    for impl in (C.whole_response, whole_response_py):
        framer = Headless()
        framer.expect(b"GET")
        assert _whole(impl, framer) is None
    unset = ResponseFramer.__new__(ResponseFramer)  # no __init__: no slot holds anything
    assert _whole(C.whole_response, unset) is AttributeError
    assert _whole(whole_response_py, unset) is AttributeError

    head = RequestHead(b"GET", b"/", b"1.1", [])
    ours = _begun(C.begin_request, head, 0, False)
    assert ours == _begun(begin_request_py, head, 0, False)
    with monkeypatch.context() as m:
        m.setattr(RequestHead, "method", property(lambda self: b"PUT"))
        ours = _begun(C.begin_request, head, 0, False)
        assert ours == _begun(begin_request_py, head, 0, False)
        assert ours[0][0] == b"PUT"  # type: ignore[index]


# -- log_response ---------------------------------------------------------------------------------


class _Writer:
    """Stands in for AccessWriter: its ``lines`` and what was called."""

    def __init__(self, calls: list[object], pending: int, sec: int, armed: bool) -> None:
        self.calls = calls
        self.lines: list[Any] = [[b"l"] * pending, b"S%d," % sec, sec, "timer" if armed else None]

    def restamp(self, sec: int) -> None:
        self.calls.append(("restamp", sec))
        self.lines[1], self.lines[2] = b"S%d," % sec, sec

    def flush(self) -> None:
        self.calls.append("flush")
        self.lines[0], self.lines[3] = [], None

    def arm(self) -> None:
        self.calls.append("arm")
        self.lines[3] = "timer"


class _Log:
    def __init__(self, calls: list[object], on: bool) -> None:
        self.calls, self.on = calls, on

    def isEnabledFor(self, level: int) -> bool:  # logging.Logger's name
        self.calls.append(("isEnabledFor", level))
        return self.on


class _Conn:
    """Stands in for ConnectionLog: its sandbox id and port, ``_resite`` into the state."""

    def __init__(self, calls: list[object], sandbox_id: str, port: int) -> None:
        self.calls, self.sandbox_id, self.port = calls, sandbox_id, port
        self.state: list[Any] = []

    def _resite(self) -> None:
        self.calls.append("resite")
        self.state[6:9] = [
            b" %s:%d id=" % (self.sandbox_id.encode(), self.port),
            self.sandbox_id,
            self.port,
        ]


SANDBOX = "sb"  # one object: "the same sandbox id" is identity, as in ConnectionLog


def _logged(
    impl: Callable[..., object], case: tuple[Any, ...], first: tuple[Any, Any] | None = None
) -> tuple[Any, ...]:
    """What ``impl`` (log_response or its reference) returns and leaves behind, on a fresh
    connection state made from ``case``; ``first``: the oldest request's start and body_in
    instead of 1000 and 0."""
    (
        data,
        methods,
        waiting,
        kept_before,
        metrics,
        pending,
        armed,
        on,
        site,
        mono,
        wall,
        sec_offset,
        bad,
    ) = case
    calls: list[object] = []
    framer = _framer(methods, b"", False)
    requests: deque[list[Any]] = deque(
        _request(b"x-request-id: r%d\r\n" % k, 1_000 + k, k) for k in range(waiting)
    )
    if first is not None and requests:
        requests[0][3], requests[0][5] = first
    kept: Any = None
    if metrics:  # the C reads its own Tally; the reference takes either
        kept = C.tally(REQUEST_BUCKETS) if impl is C.log_response else tally_py(REQUEST_BUCKETS)
        for _ in range(kept_before):
            kept.add(1_000_000, 200, 1, 2)
    writer = _Writer(calls, pending, wall // 10**9 + sec_offset, armed)
    conn = _Conn(calls, SANDBOX, 8080)
    clocks = iter([mono, wall])
    logger: Any = _Log(calls, on)
    if isinstance(on, str):  # a real logger: the C reads ``disabled`` and its cache
        logger = logging.Logger("t", logging.INFO if on.startswith("info") else logging.WARNING)
        if "warm" in on:
            logger.isEnabledFor(logging.INFO)  # the answer in its cache
        logger.disabled = on.endswith(" disabled")
        # odd values where the C reads booleans: what Python's truth and lookups make of them
        if on.endswith("zero-disabled"):
            logger.disabled = 0
        elif on.endswith("one-disabled"):
            logger.disabled = 1
        elif on.endswith("no-disabled"):
            del logger.disabled  # then isEnabledFor's AttributeError, from both
        elif on.endswith("odd-cache"):
            logger._cache = {logging.INFO: 1}  # truthy, not True
        elif on.endswith("list-cache"):
            logger._cache = []  # type: ignore[assignment]  # IndexError from both
        elif on.endswith("no-cache"):
            del logger._cache
    state: list[Any] = [
        requests, framer, kept, writer.lines, writer, b' INFO a: 1.2.3.4 "',
        b" old:1 id=", *site, lambda: next(clocks), lambda: next(clocks), logger,
        requests.popleft, _logger_dict(logger), itertools.count(7), b"p", None,
    ]  # fmt: skip
    if bad is not None:
        index, value = bad
        state[index] = value
    conn.state = state
    outcome = _outcome(impl, state, conn, data)
    return (
        outcome,
        calls,
        [list(r) for r in requests],
        _state(framer),
        _taken(kept),
        writer.lines,
        state[6:9],
    )


_LOG_CASE = st.tuples(
    st.one_of(  # mostly responses it takes: most of what it does comes after
        st.just(RESPONSE),
        st.just(RESPONSE.replace(b"200 OK", b"404 Not Found")),
        st.sampled_from([RESPONSE[:-1], *TRICKY]),
        st.binary(max_size=40),
    ),
    st.lists(st.sampled_from([b"GET", b"GET", b"HEAD"]), max_size=2),
    st.integers(0, 2),  # requests waiting
    st.sampled_from([0, 1, 3]),  # observations counted before
    st.booleans(),  # metrics
    st.sampled_from([0, 1, 254, 255, 256]),  # pending lines before
    st.booleans(),  # the writer's timer armed
    st.sampled_from(  # the logger logs info: a stand-in's answer, or a real logger's
        [
            *(True, False, "info", "info warm", "warning", "warning warm"),
            *("info warm disabled", "info warm zero-disabled", "info one-disabled"),
            *("info no-disabled", "info warm odd-cache", "info list-cache", "info no-cache"),
        ]
    ),
    st.sampled_from([(SANDBOX, 8080), (SANDBOX, 8081), ("".join("sb"), 8080), (None, 0)]),
    st.integers(1_000, 2**40),  # monotonic ns
    st.integers(1_780_000_000 * 10**9, 1_790_000_000 * 10**9),  # wall ns
    st.sampled_from([0, -1]),  # the writer's second: this one, or the one before
    st.none(),
)

# States no ConnectionLog makes: refused with an exception, never a crash (the reference may
# take some of them: Python's duck typing)
_BAD_STATES = [
    (0, object()),  # requests without a length
    (2, ()),  # kept not a Tally
    (3, None),  # no lines
    (3, [[], b"S", 0]),  # lines too short
    (5, "lead"),  # the lead not bytes
    (9, None),  # the clock not callable
    (10, lambda: "now"),  # the wall clock not an int
    (11, object()),  # no isEnabledFor
    (12, None),  # no popleft
    (13, ()),  # the logger's dict not a dict
]


@settings(max_examples=500)
@given(_LOG_CASE)
def test_log_response_does_what_the_reference_does(case: tuple[Any, ...]) -> None:
    """The same bytes out, the same requests left, framer, kept observations, pending lines,
    site and calls (isEnabledFor, resite, restamp, flush, arm) in the same order, or the
    same exception, from the same state; ``str`` sandbox ids equal but not identical also
    make the site again (identity, as ConnectionLog compares)."""
    assert _logged(C.log_response, case) == _logged(log_response_py, case)


class _Int(int):
    """An int, but not exactly: what the C holds in C numbers only for exact ints."""


WALL = 1_780_000_000_123_456_789


@pytest.mark.parametrize(
    "first, mono, wall",
    [
        ((_Int(1_000), 0), 5_001_000, WALL),  # a start not exactly an int
        ((1_000, _Int(3)), 5_001_000, WALL),  # body_in
        ((1_000, 2**62), 5_001_000, WALL),  # body_in in 64 bits, the sums past them
        ((2**70, 0), 2**70 + 5_001_000, WALL),  # clocks past 64 bits
        ((1_000, 0), _Int(5_001_000), WALL),  # the monotonic clock
        # the wall clock: the numbers taken in C, then the line made from the request's items
        ((1_000, 0), 5_001_000, _Int(WALL)),
    ],
)
def test_log_response_on_numbers_it_cannot_hold_in_c_does_what_the_reference_does(
    first: tuple[Any, Any], mono: Any, wall: Any
) -> None:
    """Exact ints that fit are read into C (no int objects made or read back); for anything
    else it takes the general way, whole_response and text_line on the objects, at the same
    point: the same outcome as the reference each way."""
    for metrics, kept_before, sec_offset, on in itertools.product(
        (False, True), (0, 2), (0, -1), (True, "info", False)
    ):
        case = (RESPONSE, [b"GET"], 2, kept_before, metrics, 0, False, on, (SANDBOX, 8080), mono,
                wall, sec_offset, None)  # fmt: skip
        ours, theirs = _logged(C.log_response, case, first), _logged(log_response_py, case, first)
        assert ours == theirs, case


def test_log_response_refuses_states_it_cannot_use() -> None:
    for bad in _BAD_STATES:
        case = (RESPONSE, [b"GET"], 1, 4, True, 0, False, True, (SANDBOX, 8080), 5_001_000,
                1_780_000_000_123_456_789, -1, bad)  # fmt: skip
        ours = _logged(C.log_response, case)
        assert isinstance(ours[0], type) and issubclass(ours[0], Exception), (bad, ours)
    with pytest.raises(TypeError):
        C.log_response([], _Conn([], SANDBOX, 1), RESPONSE)  # too short
    with pytest.raises(TypeError):
        C.log_response((), _Conn([], SANDBOX, 1), RESPONSE)  # type: ignore[arg-type]


def test_log_response_reads_the_clocks_of_time_as_time_does() -> None:
    """With time.monotonic_ns and time.time_ns in the state the C reads their clocks itself:
    the request's time (counted in the Tally: the taken request's items are not set) lies
    between two monotonic_ns() calls around it, and the line's stamp is of a second between
    two time_ns() calls."""
    writer = _Writer([], 0, 0, True)
    conn = _Conn([], SANDBOX, 8080)
    requests: deque[list[Any]] = deque([_request(b"", 0, 0)])
    logger = logging.Logger("t", logging.INFO)
    kept = C.tally(REQUEST_BUCKETS)
    state: list[Any] = [
        requests, _framer([b"GET"], b"", False), kept, writer.lines, writer, b"",
        b" x id=", SANDBOX, 8080, time.monotonic_ns, time.time_ns, logger, requests.popleft,
        _logger_dict(logger), itertools.count(), b"p", None,
    ]  # fmt: skip
    request = requests[0]
    wall0, mono0 = time.time_ns(), time.monotonic_ns()
    request[3] = mono0
    assert C.log_response(state, conn, RESPONSE) is not None
    mono1, wall1 = time.monotonic_ns(), time.time_ns()
    seconds = kept.take()[1]
    assert 0 <= seconds <= (mono1 - mono0) / 1e9
    assert wall0 // 10**9 <= writer.lines[2] <= wall1 // 10**9  # restamped to the line's second
    assert len(writer.lines[0]) == 1


def _sized(body: int) -> bytes:
    """A whole response of the common kind with a body of ``body`` bytes."""
    return RESPONSE.replace(b"Content-Length: 5", b"Content-Length: %d" % body)[:-5] + b"b" * body


def test_log_response_writes_into_its_last_output_only_when_nothing_else_holds_it() -> None:
    """Its output is written into the previous one's buffer once no one holds that (the
    transport wrote it and let it go): with the same bytes, length and hash as a new object
    would have. An output still held (a transport that could write only part of it keeps it)
    is never changed, and one past 64 KiB is not kept."""
    writer = _Writer([], 0, 0, True)
    requests: deque[list[Any]] = deque()
    logger = logging.Logger("t", logging.WARNING)  # no lines: the bytes for the client only
    state: list[Any] = [
        requests, _framer([], b"", False), None, writer.lines, writer, b"", b" x id=",
        SANDBOX, 8080, time.monotonic_ns, time.time_ns, logger, requests.popleft,
        _logger_dict(logger), itertools.count(), b"p", None,
    ]  # fmt: skip
    conn = _Conn([], SANDBOX, 8080)

    def respond(body: int) -> bytes:
        requests.append(_request(b"x-request-id: r%d\r\n" % body, 0, 0))
        state[1].expect(b"GET")
        out = C.log_response(state, conn, _sized(body))
        assert isinstance(out, bytes)
        return out

    def expected(body: int) -> bytes:
        head, rest = _sized(body).split(b"\r\n\r\n", 1)
        return head + b"\r\nx-request-id: r%d\r\n\r\n" % body + rest

    held = respond(300)
    hash(held)  # its hash cached in the object
    kept = respond(200)  # the first is held: a new object
    assert held == expected(300) and kept == expected(200)
    address = id(kept)
    del kept
    for body in (100, 150, 0, 200):  # smaller or as large: into the same buffer
        out = respond(body)
        assert id(out) == address
        assert out == expected(body) and len(out) == len(expected(body))
        assert hash(out) == hash(bytes(bytearray(out)))  # not the hash of what it held before
        del out
    assert held == expected(300)  # held all along: never written into
    larger = respond(250)  # past its size: a new one (kept from now on)
    assert id(larger) != address and larger == expected(250)
    del larger
    huge = respond(70_000)  # past 64 KiB: not kept
    assert huge == expected(70_000)
    address = id(huge)
    del huge
    small = respond(10)
    assert small == expected(10)  # the 250-byte one's buffer, never the huge one's
    assert id(small) != address


def test_log_response_asks_a_logger_what_logging_would_answer() -> None:
    """The C reads a real logger's cache and ``disabled`` instead of calling isEnabledFor: a
    line exactly when the reference (which calls it) writes one, each way the logger is set."""
    lines = {}
    for on in ("info", "info warm", "warning", "warning warm", "info warm disabled"):
        case = (RESPONSE, [b"GET"], 1, 0, False, 0, True, on, (SANDBOX, 8080), 5_001_000,
                1_780_000_000_123_456_789, 0, None)  # fmt: skip
        ours, theirs = _logged(C.log_response, case), _logged(log_response_py, case)
        assert ours == theirs, on
        lines[on] = len(ours[5][0])
    assert lines == {
        "info": 1,
        "info warm": 1,
        "warning": 0,
        "warning warm": 0,
        "info warm disabled": 0,
    }


def test_log_response_logs_a_whole_response_in_one_call() -> None:
    """Its effects spelled out once (the differential test checks the rest)."""
    case = (RESPONSE, [b"GET"], 2, 1, True, 255, False, True, (SANDBOX, 8080), 5_001_000,
            1_780_000_000_123_456_789, -1, None)  # fmt: skip
    out, calls, requests, framer, kept, lines, site = _logged(C.log_response, case)
    assert out == RESPONSE.replace(b"\r\n\r\n", b"\r\nx-request-id: r0\r\n\r\n")
    assert [r[2:] for r in requests] == [_request(b"x-request-id: r1\r\n", 1_001, 1)[2:]]
    assert framer == (0, b"", [], 0)
    # counted with the one before (1 ms, 200, 1 B in, 2 B out): 5 ms, 200, 0 B in, 5 B out
    assert kept == (2, ([1, 0, 1] + [0] * 14, 0.006, [0, 2, 0, 0, 0, 0], 1, 7))
    assert calls == [("isEnabledFor", 20), ("restamp", 1_780_000_000), "flush"]
    assert lines == [[], b"S1780000000,", 1_780_000_000, None]  # flushed at 256 lines
    assert site == [b" old:1 id=", SANDBOX, 8080]


def test_log_response_keeps_the_line_and_arms_the_writer() -> None:
    case = (RESPONSE, [b"GET"], 1, 0, False, 0, False, True, ("other", 1), 6_000,
            1_780_000_000_123_456_789, 0, None)  # fmt: skip
    _, calls, _, _, _, lines, site = _logged(C.log_response, case)
    assert calls == [("isEnabledFor", 20), "resite", "arm"]
    assert site == [b" sb:8080 id=", SANDBOX, 8080]
    assert lines[0] == [
        b'S1780000000,123 INFO a: 1.2.3.4 "GET /" 200 0 5B 0.0ms ttfb 0.0ms sb:8080 id=id\n'
    ]
    assert lines[3] == "timer"


# -- log_request ----------------------------------------------------------------------------------


def _requested(impl: Callable[..., object], head: RequestHead, waiting: int, bad: Any) -> object:
    """What ``impl`` (log_request or its reference) returns and leaves behind."""
    requests: deque[list[Any]] = deque([[b"OLD"]] * waiting)
    framer = _framer([b"GET"] * min(waiting, 1100), b"", False)
    counter = itertools.count(41)
    clock = iter([12345])
    state: list[Any] = [requests, framer] + [None] * 7 + [lambda: next(clock)] + [None] * 4
    state += [counter, b"p", None]
    if bad is not None:
        state[bad[0]] = bad[1]
    outcome = _outcome(impl, state, head)
    return outcome, [list(r) for r in requests], _state(framer), next(counter)


@settings(max_examples=300)
@given(
    st.lists(st.tuples(_ID_NAME, _ID_VALUE), max_size=4),
    st.sampled_from([b"GET", b"HEAD", b"POST"]),
    st.sampled_from([0, 1, 1023, 1024]),
    st.sampled_from(
        [
            None,
            (0, object()),  # requests without a length
            (9, None),  # the clock not callable
            (14, [1]),  # the counter not an iterator
        ]
    ),
)
def test_log_request_does_what_the_reference_does(
    headers: list[tuple[bytes, bytes]], method: bytes, waiting: int, bad: Any
) -> None:
    """The same id line, the same request list queued (or not, at 1024 waiting), the same
    framer and counter after, or the same kind of error."""
    head = RequestHead(method, b"/t", b"1.1", headers)
    ours, theirs = (
        _requested(C.log_request, head, waiting, bad),
        _requested(log_request_py, head, waiting, bad),
    )
    assert ours == theirs
    if bad is None and waiting < 1024:
        assert ours[1][-1][3] == 12345 and ours[1][-1][7] == ours[0]  # started now, its line


def test_log_request_refuses_a_state_too_short_or_a_prefix_not_bytes() -> None:
    head = RequestHead(b"GET", b"/", b"1.1", [])
    with pytest.raises(TypeError):
        C.log_request([None] * 15, head)
    assert _requested(C.log_request, head, 0, (15, "p"))[:2] == (TypeError, [])


# -- nothing left behind --------------------------------------------------------------------------


def _grows(call: Callable[[], object], rounds: int = 5_000) -> int:
    """Bytes still allocated after ``rounds`` calls, beyond what the first 1,000 left (one
    object left per call, 16 bytes at the least, is 80 KB: past the 64 KiB allowed)."""
    for _ in range(1000):
        call()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(rounds):
            call()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def _raises(call: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        try:
            call()
        except (TypeError, ValueError, OverflowError, StopIteration):
            return
        raise AssertionError("did not raise")

    return run


def test_many_calls_leave_nothing_behind() -> None:
    data = bytearray(RESPONSE)  # a buffer export left behind would block its resizing
    id_line = b"x-request-id: abc\r\n"
    headers = [(b"host", b"h"), (b"x-request-id", b"client.id")]
    bad_headers: list[Any] = [(b"x-request-id", "text")]
    head = RequestHead(b"GET", b"/x", b"1.1", headers)
    bad_head = RequestHead(b"GET", b"/x", b"1.1", bad_headers)
    framer = ResponseFramer()  # expects at most 1024: the list stays bounded
    counter = itertools.count()
    request = [b"GET", b"/caf\xc3\xa9", b"id", 0, 10**9, 5, None, id_line, 200, 10**6]
    watched = [RESPONSE, id_line, headers, bad_headers, headers[1][1], request[1], request[2]]
    gc.collect()  # what earlier tests left (hypothesis' examples, tracebacks) holds RESPONSE
    refs = [sys.getrefcount(o) for o in watched]

    def whole() -> None:
        framer = ResponseFramer()
        framer.expect(b"GET")
        kept = C.tally(REQUEST_BUCKETS)
        noted = [b"GET", b"/", b"id", 5, None, 5, None, id_line, 0, 0]
        assert C.whole_response(framer, RESPONSE, noted, 10**12, kept) is not None
        assert C.whole_response(framer, RESPONSE, noted, 10**12, kept) is None  # none expected

    def line() -> None:
        pending: list[bytes] = []
        C.text_line(pending, b"stamp", 0, 123, b"lead", request, b"site")

    def bad_line() -> None:
        C.text_line([], b"stamp", 0, -1, b"lead", request, b"site")

    def logged(wall: int, on: bool, pending: int) -> Callable[[], None]:
        """log_response of one whole response, its line on a new second or not, flushed or
        armed (the writer's calls in Python), or not logged."""

        def run() -> None:
            case = (RESPONSE, [b"GET"], 2, 7, True, pending, False, on, ("x", 1), 5_001_000,
                    wall, -1, None)  # fmt: skip
            assert isinstance(_logged(C.log_response, case)[0], bytes)

        return run

    # a connection whose one request in flight is held in C (a Pending), as public.py drives
    # it: the request and its whole response; a second request before it (the first moves to
    # the deque), both responses in one read; a request with a body (moved by ``body``)
    loop = asyncio.new_event_loop()
    devnull = open(os.devnull, "w")  # noqa: SIM115  (closed below)
    conn = ConnectionLog("1.2.3.4", writer=AccessWriter(loop, "text", devnull))
    conn.sandbox_id, conn.port = "sb", 1
    fast = conn.fast
    assert fast is not None

    def held() -> None:
        C.log_request(fast, head)
        assert C.log_response(fast, conn, RESPONSE) is not None

    def moved() -> None:
        C.log_request(fast, head)
        C.log_request(fast, head)
        assert C.log_response(fast, conn, RESPONSE) is not None
        assert C.log_response(fast, conn, RESPONSE) is not None
        C.log_request(fast, head)
        conn.body(b"body")
        assert C.log_response(fast, conn, RESPONSE) is not None
        assert not conn._requests and not fast[16].busy

    calls: dict[str, Callable[[], object]] = {
        "held": held,
        "moved": moved,
        "log_request": lambda: _requested(C.log_request, head, 1, None),
        "log_request refused": lambda: _requested(C.log_request, bad_head, 1, None),
        "log_response": logged(1_780_000_000_123_456_789, True, 0),
        "log_response flushed": logged(1_780_000_000_123_456_789, True, 255),
        "log_response not logged": logged(1_780_000_000_123_456_789, False, 0),
        "log_response not whole": lambda: _logged(
            C.log_response,
            (RESPONSE[:-1], [b"GET"], 1, 0, True, 0, False, True, ("x", 1), 5, 10**18, 0, None),
        ),
        "log_response refused": lambda: [
            _logged(
                C.log_response,
                (RESPONSE, [b"GET"], 1, 7, True, 0, False, True, ("x", 1), 5, 10**18, 0, bad),
            )
            for bad in _BAD_STATES
        ],
        "simple_head": lambda: C.simple_head(RESPONSE),
        "simple_head no match": lambda: C.simple_head(RESPONSE[:-1]),
        "simple_head bytearray": lambda: C.simple_head(data),  # type: ignore[arg-type]
        "whole_response": whole,
        "whole_response refused": _raises(
            lambda: C.whole_response(
                _framer([b"GET"], b"", False), RESPONSE, _request(b"x", 0, 0), "1", None
            )
        ),
        "text_line": line,
        "text_line refused": _raises(bad_line),
        "tally": lambda: [
            (t := C.tally(REQUEST_BUCKETS)).add(10**12, 200, 2**70, 5),
            t.add(2**60, 999, 2**64 - 1, 2**64 - 1),
            t.take(),
        ],
        "tally refused": _raises(lambda: C.tally(REQUEST_BUCKETS).add(1, 200, b"0", 0)),
        "request_ids client": lambda: C.request_ids(headers, counter, b"p"),
        "request_ids new": lambda: C.request_ids(headers[:1], counter, b"p"),
        "request_ids refused": _raises(lambda: C.request_ids(bad_headers, counter, b"p")),
        "begin_request": lambda: C.begin_request(head, counter, b"p", 10**12, deque(), framer),
        "begin_request refused": _raises(
            lambda: C.begin_request(bad_head, counter, b"p", 1, deque(), framer)
        ),
    }
    try:
        for name, call in calls.items():
            assert _grows(call) < 64 * 1024, name
    finally:
        loop.close()
        devnull.close()
    assert [sys.getrefcount(o) for o in watched] == refs
    data += b"!"  # no export left: the bytearray can still grow
