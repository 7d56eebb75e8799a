"""The access log and ``X-Request-Id`` of one public connection (on when ``access_log`` is set).

Theory of operation
-------------------
With ``access_log`` off nothing here exists: ``PublicConnection`` keeps ``None`` and its hot
path does one ``is None`` check. With it on, each connection gets a ``ConnectionLog``:

- every request forwarded to the service gets a request id: the client's ``X-Request-Id`` when
  it is well formed (1-200 of ``A-Za-z0-9._:-``), else a new random one; it travels to the
  service in ``X-Request-Id`` (a client's malformed one is dropped, never passed on);
- the service's bytes go through a :class:`~tunneld.responses.ResponseFramer`, which never changes
  them except to add ``x-request-id`` to a final response head that has none;
- when a response ends, one line goes to the ``tunneld.access`` log: client, sandbox, port,
  method, target, status, request body bytes, response body bytes, total duration and time to
  first response byte, request id. With ``--log-format json`` the same fields are JSON keys.
  Requests that got no response (the client or the service went away, or the responses could
  not be followed) are logged when the connection ends, with status ``null`` and a note.

The lines are written by an :class:`AccessWriter` (the edge's, one per process), not through a
``logging`` record each: a record costs ~30 us of Python per request (LogRecord, handler lock,
formatter, one write and flush per line), as much as relaying the request itself. The writer
formats the same line the stdlib formatter would (text: ``asctime level name: message``; json:
tunneld/logs.py's keys), keeps the lines (UTF-8 bytes) and writes them ``FLUSH_AFTER`` (50 ms)
after the first, or at 256 lines, or when the edge stops, in writes of at most ``PIPE_BUF`` bytes
that end on a line (workers share one stderr: a write that size is never interleaved with
another's). The ``tunneld.access`` logger's level still decides whether lines are written at all.

The common case takes one short path (``ConnectionLog.response``): a response that arrives whole
in one read (``ResponseFramer.whole``) is taken in one step, its line is joined from bytes
prepared per connection (client, sandbox and port) and per process (numbers below 1000,
durations below 100 ms, the time stamp of the current second), and its metrics are counted in
``RequestStats.whole`` (a ``Tally``: tunneld/metrics.py). Each Python operation here costs
~0.5-1 % of relaying a small request (``python -m bench.e2e.instr``): the path is written to do
few of them, and its work is done by C functions when tunneld/_speedups.c is built
(tunneld/speedups.py): ``begin_request`` (the request side: its id, its list, its place in
line), ``whole_response`` (validating the head, adding the id line, noting the time, status and
sizes, counting the metrics' observation) and ``text_line``, and for a connection that writes
text lines ``log_response``, which does all of the response side in one call from a
per-connection state list (``ConnectionLog.fast``): ``whole_response``, the request's end, the
log level's check, the text line and the writer's flush or timer. Each has the same results as
its pure-Python reference here (``*_py``). With the C functions, a connection's one request in
flight (the keep-alive common case: a request, its whole response, the next request) is not put
in the deque at all: ``log_request`` holds it in the state's ``Pending`` and ``log_response``
takes its whole response without the framer (no list, deque or framer work per request:
docs/performance.md); any other step (a second request, a body, a response not whole, the
end) first moves it to the deque and the framer (``spill``, ``ConnectionLog._spill``), so the
Python code here never sees the difference (tests/test_access_pending.py).

An inspected connection (tunneld/inspect.py) takes this same path, with ``quiet`` when the access
log is off: its ``recorder`` gets each request's head and body prefix, the response head and
body prefix, and the end (complete, aborted, edge-answered), at the same points as the log line.
"""

from __future__ import annotations

import asyncio
import codecs
import itertools
import logging
import os
import re
import sys
import time
from collections import deque
from collections.abc import Iterator
from time import monotonic_ns, time_ns
from typing import TYPE_CHECKING, Any, Final, TextIO

import orjson

from . import speedups
from .responses import ResponseDone, ResponseFramer, ResponseHead, Unframed

if TYPE_CHECKING:
    from collections.abc import Iterable

    from .httphead import RequestHead
    from .inspect import ConnectionRecorder, Record
    from .metrics import RequestStats, Tally

__all__ = ["AccessWriter", "ConnectionLog"]

log = logging.getLogger("tunneld.access")
_INFO: Final = logging.INFO

_VALID_ID: Final = re.compile(rb"[A-Za-z0-9._:-]{1,200}")


# New request ids: 16 random hex digits drawn once per process, then a counter (16 more): as
# unique as 32 random digits across processes and restarts, without a syscall per request.
_ID_PREFIX: Final = os.urandom(8).hex().encode()
# (tunneld/_speedups.c's id_counter, when built, counts as count() does: make_ids reads it in C)
_ID_COUNTER: Iterator[int] = (itertools.count if speedups.c is None else speedups.c.id_counter)(
    int.from_bytes(os.urandom(4), "big")
)
_NEW_ID: Final = _ID_PREFIX.replace(b"%", b"%%") + b"%016x"  # one format, no concatenation


def new_request_id() -> bytes:
    return _NEW_ID % next(_ID_COUNTER)


def request_ids_py(
    headers: Iterable[tuple[bytes, bytes]], counter: Iterator[int], prefix: bytes
) -> tuple[bytes, bytes]:
    """(request id, its ``x-request-id`` header line): the first ``x-request-id`` among
    ``headers`` when it is well formed, else ``prefix`` and ``next(counter)`` in 16 hex digits.
    The reference of ``request_ids`` (tunneld/_speedups.c when built: speedups.py)."""
    for name, value in headers:
        if name == b"x-request-id":
            request_id = value if _VALID_ID.fullmatch(value) else prefix + b"%016x" % next(counter)
            break
    else:
        request_id = prefix + b"%016x" % next(counter)
    return request_id, b"x-request-id: " + request_id + b"\r\n"


# This process's worker index under ``--workers N`` (set with the logging setup, as the stdlib
# formatter's ``name[wN]`` tag is).
WORKER: int | None = None

# One write to a pipe of at most PIPE_BUF (4096) bytes is atomic (POSIX): workers' lines never
# mix. The lines are kept as UTF-8 (stderr's encoding), so a chunk is counted in its bytes. A
# single longer line goes alone, as with logging.
_WRITE_CHUNK: Final = 4096
# "000" to "999": the milliseconds of a time stamp (a lookup, not a format per line).
_MSECS: Final = tuple(b"%03d" % ms for ms in range(1000))
# Numbers as text, a lookup instead of a format per number for what most lines show: statuses,
# body sizes below 1000, and durations below 100 ms in tenths of a millisecond ("0.0"-"99.9").
_NUMBERS: Final = tuple(b"%d" % n for n in range(1000))
_TENTHS: Final = tuple(b"%d.%d" % divmod(n, 10) for n in range(1000))
# Lines are written this long after the first of them (as nginx's ``access_log ... flush=``):
# one write per interval, not one per loop iteration, which with one request in flight is a
# write (a syscall) per request. A crash loses at most this much of the log; a stop writes it.
FLUSH_AFTER: Final = 0.05
# Lines kept before a write even within the interval (a burst of completions).
_MAX_PENDING: Final = 256
# AccessWriter.lines: the pending lines, the time stamp, its second, the timer of the next write
_L_PENDING, _L_STAMP, _L_SEC, _L_TIMER = range(4)


def text_line_py(
    pending: list[bytes],
    stamp: bytes,
    sec: int,
    now: int,
    lead: bytes,
    request: list[Any],
    site: bytes,
) -> int:
    """Append the text line of a whole response to ``pending`` and return its length: the time
    stamp (``stamp``, the text of second ``sec``, and the milliseconds of ``now``, ns), ``lead``
    (level, logger, client), the request's method and target (non-ASCII bytes as latin-1
    characters, in UTF-8), status, body sizes, time (``_TTFB``, its duration and time to first
    byte), ``site`` and the request id. -1 and nothing appended when ``now`` is in another
    second than ``sec`` (the caller restamps). The reference of ``text_line``
    (tunneld/_speedups.c when built: speedups.py); numbers are never negative."""
    ms = now // 1_000_000
    if ms // 1000 != sec:
        return -1
    status, body_out, ns = request[_STATUS], request[_BODY_OUT], request[_TTFB]
    target = request[_TARGET]
    if not target.isascii():
        target = target.decode("latin-1").encode()
    body_in = request[_BODY_IN]
    d10 = (ns + 50_000) // 100_000  # _tenths(ns), inlined
    took = _TENTHS[d10] if d10 < 1000 else b"%d.%d" % divmod(d10, 10)
    pending.append(
        b"".join(
            (
                stamp,
                _MSECS[ms % 1000],
                lead,
                request[_METHOD],
                b" ",
                target,
                b'" ',
                _NUMBERS[status] if status < 1000 else b"%d" % status,
                b" ",
                _NUMBERS[body_in] if body_in < 1000 else b"%d" % body_in,
                b" ",
                _NUMBERS[body_out] if body_out < 1000 else b"%d" % body_out,
                b"B ",
                took,
                b"ms ttfb ",
                took,
                b"ms",
                site,
                request[_ID],
                b"\n",
            )
        )
    )
    return len(pending)


def _tenths(ns: int) -> bytes:
    """A duration in nanoseconds as milliseconds with one decimal, rounded half up."""
    d10 = (ns + 50_000) // 100_000
    return _TENTHS[d10] if d10 < 1000 else b"%d.%d" % divmod(d10, 10)


class AccessWriter:
    """Formats access lines as the stdlib formatter of ``tunneld serve`` would and writes them in
    batches (see the module docstring)."""

    __slots__ = (
        "_fd",
        "_json",
        "_loop",
        "_stream",
        "_worker",
        "lines",
        "tail",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fmt: str = "text",
        stream: TextIO | None = None,
    ) -> None:
        worker = WORKER
        self._loop = loop
        self._json = fmt == "json"
        name = "tunneld.access" + ("" if worker is None or self._json else f"[w{worker}]")
        self.tail = f" INFO    {name}: ".encode()  # the text line after its time stamp
        self._stream: TextIO = sys.stderr
        self._fd = -1
        self.stream = stream if stream is not None else sys.stderr
        # What changes as lines come, in one list that ``log_response`` reads by index: the
        # pending lines (UTF-8), the time stamp of second ``sec`` up to its milliseconds, that
        # second, and the timer of the next write (None: not armed).
        self.lines: list[Any] = [[], b"", -1, None]
        self._worker = worker if self._json else None

    @property
    def json(self) -> bool:
        return self._json

    @property
    def stream(self) -> TextIO:
        """Where the lines go (stderr unless told). When it has a file descriptor and writes
        UTF-8, the lines are written to the descriptor itself (after what the stream holds):
        the same bytes as through the stream, without decoding them into text and the stream
        encoding them back."""
        return self._stream

    @stream.setter
    def stream(self, stream: TextIO) -> None:
        self._stream = stream
        self._fd = _utf8_fd(stream)

    @property
    def pending(self) -> list[bytes]:
        """The lines not written yet."""
        return self.lines[_L_PENDING]  # type: ignore[no-any-return]

    @property
    def stamp(self) -> bytes:
        """The time stamp of the current second, up to its milliseconds."""
        return self.lines[_L_STAMP]  # type: ignore[no-any-return]

    def restamp(self, sec: int) -> None:
        """The time stamp's text for another second."""
        if self._json:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec))
        else:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S,", time.localtime(sec))
        self.lines[_L_STAMP] = stamp.encode()
        self.lines[_L_SEC] = sec

    def write(self, message: str, fields: dict[str, Any] | None) -> None:
        ms = time_ns() // 1_000_000
        sec = ms // 1000
        if sec != self.lines[_L_SEC]:
            self.restamp(sec)
        msecs = _MSECS[ms - sec * 1000]
        if self._json:
            out: dict[str, Any] = {
                "time": (self.stamp + msecs + b"Z").decode(),
                "level": "info",
                "logger": "tunneld.access",
                "message": message,
            }
            if self._worker is not None:
                out["worker"] = self._worker
            if fields:
                out.update(fields)
            line = orjson.dumps(out, default=str) + b"\n"
        else:
            text = message.encode("utf-8", "surrogatepass")
            line = b"".join((self.stamp, msecs, self.tail, text, b"\n"))
        self.add(line)

    def add(self, line: bytes) -> None:
        """Keep a whole line (UTF-8, ending with a newline) for the next write."""
        pending = self.lines[_L_PENDING]
        pending.append(line)
        if len(pending) >= _MAX_PENDING:
            self.flush()
        else:
            self.arm()

    def arm(self) -> None:
        """Write the pending lines ``FLUSH_AFTER`` from now unless a write is due already."""
        if self.lines[_L_TIMER] is None:
            self.lines[_L_TIMER] = self._loop.call_later(FLUSH_AFTER, self.flush)

    def flush(self) -> None:
        """Write the pending lines now (also ``FLUSH_AFTER`` after the first, and at stop)."""
        lines = self.lines
        timer = lines[_L_TIMER]
        if timer is not None:
            timer.cancel()
            lines[_L_TIMER] = None
        pending = lines[_L_PENDING]
        if not pending:
            return
        lines[_L_PENDING] = []
        data = b"".join(pending)
        stream = self._stream
        try:
            if self._fd >= 0:
                stream.flush()  # what the stream holds was written first
                fd = self._fd
                for chunk in _line_chunks(data):
                    while chunk:  # a blocking descriptor: a short write only on a signal
                        chunk = chunk[os.write(fd, chunk) :]
            else:
                for chunk in _line_chunks(data):
                    stream.write(str(chunk, "utf-8", "surrogatepass"))
                stream.flush()
        except (OSError, ValueError):  # stderr closed or full: never break serving for a log
            pass


def _utf8_fd(stream: TextIO) -> int:
    """The file descriptor under ``stream`` when it has one and encodes text as UTF-8, else -1."""
    try:
        fd = stream.fileno()
        encoding = stream.encoding
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation: both of the last
        return -1
    try:
        utf8 = isinstance(encoding, str) and codecs.lookup(encoding).name == "utf-8"
    except LookupError:
        return -1
    return fd if utf8 and fd >= 0 else -1


def _line_chunks(data: bytes) -> Iterator[memoryview]:
    """``data`` (whole lines) in pieces of at most ``_WRITE_CHUNK`` bytes that end on a line; a
    single longer line alone."""
    view = memoryview(data)
    start, end = 0, len(data)
    while end - start > _WRITE_CHUNK:
        stop = data.rfind(b"\n", start, start + _WRITE_CHUNK) + 1
        if stop <= start:  # the first line alone is longer
            stop = data.find(b"\n", start) + 1 or end
        yield view[start:stop]
        start = stop
    if start < end:
        yield view[start:end]


# A request in flight is a list indexed by these, not an object: creating an object costs a
# Python ``__init__`` call, three times a list's cost, per request.
_METHOD, _TARGET, _ID, _STARTED, _TTFB, _BODY_IN, _RECORD, _ID_LINE, _STATUS, _BODY_OUT = range(10)
# _STARTED, _TTFB: time.monotonic_ns() at the head's arrival, and ns to the first response byte
# (None until then); _RECORD: the inspection record (tunneld/inspect.py) or None; _ID_LINE: the
# ``x-request-id`` header line the request carries, which the response head gets too;
# _STATUS, _BODY_OUT: set by ``whole_response`` for the text line (the C one reads these indices).


def begin_request_py(
    head: RequestHead,
    counter: Iterator[int],
    prefix: bytes,
    now: int,
    requests: deque[list[Any]],
    framer: ResponseFramer,
) -> list[Any]:
    """A request forwarded: its list (``request_ids_py`` of its headers, started ``now``),
    appended to ``requests`` and its method expected by ``framer`` unless 1024 are waiting
    (pipelining without reading: stop recording, not grow). The reference of
    ``begin_request`` (tunneld/_speedups.c when built: speedups.py)."""
    request_id, id_line = request_ids_py(head.headers, counter, prefix)
    request = [head.method, head.target, request_id, now, None, 0, None, id_line, 0, 0]
    if len(requests) < 1024:
        requests.append(request)
        framer.expect(head.method)
    return request


def whole_response_py(
    framer: ResponseFramer, data: bytes, request: list[Any], now: int, kept: Tally | None
) -> bytes | None:
    """The access log's one step for a whole response: when ``framer.whole(data)`` takes it,
    note its time (``now`` - started, as its duration and time to first byte), status and body
    size in ``request``, add its observation to ``kept`` (RequestStats.whole, or None), and
    return ``data`` with the request's id line before the blank line that ends its head; else
    None (nothing changed). The reference of ``whole_response`` (tunneld/_speedups.c when
    built: speedups.py)."""
    taken = framer.whole(data)
    if taken is None:
        return None
    status, end = taken
    ns = now - request[_STARTED]
    body_out = len(data) - end
    request[_TTFB] = ns
    request[_STATUS] = status
    request[_BODY_OUT] = body_out
    if kept is not None:
        kept.add(ns, status, request[_BODY_IN], body_out)
    return b"".join((data[: end - 2], request[_ID_LINE], data[end - 2 :]))


# ConnectionLog.fast, the state ``log_response`` reads by index (its docstring)
(
    _S_REQUESTS,
    _S_FRAMER,
    _S_KEPT,
    _S_LINES,
    _S_WRITER,
    _S_LEAD,
    _S_SITE,
    _S_SITE_OF,
    _S_SITE_PORT,
    _S_MONO,
    _S_WALL,
    _S_LOG,
    _S_POPLEFT,
    _S_LOG_DICT,
    _S_COUNTER,
    _S_PREFIX,
    _S_INLINE,
) = range(17)


def _logger_dict(logger: Any) -> dict[str, Any] | None:
    """``logger``'s instance dict when no class of it defines ``disabled`` or ``_cache``: then
    ``logger.disabled`` and ``logger._cache`` are what the dict holds (``log_response`` reads
    them there, two dict lookups instead of Python's getattr; ``logging.Logger`` sets both in
    ``__init__``). None otherwise (``log_response`` then calls ``isEnabledFor``)."""
    names = ("disabled", "_cache")
    if any(name in vars(cls) for cls in type(logger).__mro__ for name in names):
        return None
    d = getattr(logger, "__dict__", None)
    return d if type(d) is dict else None


def log_request_py(state: list[Any], head: RequestHead) -> bytes:
    """``ConnectionLog.request`` on a connection with ``log_response``'s ``state`` (no
    recorder): ``begin_request_py`` with the state's id counter and prefix, monotonic clock,
    requests and framer; returns the ``x-request-id`` line the request carries. The reference
    of ``log_request`` (tunneld/_speedups.c when built: speedups.py)."""
    request = begin_request_py(
        head,
        state[_S_COUNTER],
        state[_S_PREFIX],
        state[_S_MONO](),
        state[_S_REQUESTS],
        state[_S_FRAMER],
    )
    return request[_ID_LINE]  # type: ignore[no-any-return]


def spill_py(state: list[Any]) -> None:
    """The reference of ``spill`` (tunneld/_speedups.c when built: speedups.py), which moves
    the request in flight that ``log_request`` holds in C (the state's ``_S_INLINE``, a
    ``Pending``: the connection's one request, kept out of the deque) to the state's requests
    and its method to the framer's. ``log_request_py`` keeps none there: nothing to do."""


def log_response_py(state: list[Any], conn: ConnectionLog, data: bytes) -> bytes | None:
    """``ConnectionLog.response``'s one step for a whole response on a connection that writes
    text lines. ``state`` is the connection's ``fast`` list: its requests (a deque), framer,
    the metrics' count of whole responses (RequestStats.whole, a ``Tally``, or None), the
    writer's ``lines`` and the writer, the lines' lead and " sandbox:port id=" (made for
    sandbox id and port in the next two), a monotonic and a wall clock (ns), the logger, the
    requests' ``popleft`` and the logger's instance dict (``_logger_dict``, or None; the C
    reads ``disabled`` and ``_cache`` from it as ``isEnabledFor`` would, and calls the method
    when either is not there or the level is not in the cache), and the request
    ids' counter and prefix (``log_request``). When ``whole_response_py`` takes ``data`` for
    the oldest request (and counts it), that request leaves the queue, and when the logger logs
    info its line is appended by ``text_line_py`` (``conn._resite()`` first when ``conn``'s
    sandbox id or port changed, the writer restamped on a new second) and the writer flushes at
    ``_MAX_PENDING`` lines or is armed; returns the bytes for the client, or None (nothing
    changed). The reference of ``log_response`` (tunneld/_speedups.c when built:
    speedups.py)."""
    requests = state[_S_REQUESTS]
    if not requests:
        return None
    request = requests[0]
    out = whole_response_py(state[_S_FRAMER], data, request, state[_S_MONO](), state[_S_KEPT])
    if out is None:
        return None
    requests.popleft()
    if not state[_S_LOG].isEnabledFor(_INFO):
        return out
    if conn.sandbox_id is not state[_S_SITE_OF] or conn.port != state[_S_SITE_PORT]:
        conn._resite()
    site = state[_S_SITE]
    now = state[_S_WALL]()
    lines = state[_S_LINES]
    lead = state[_S_LEAD]
    count = text_line_py(lines[0], lines[1], lines[2], now, lead, request, site)
    if count < 0:  # a new second: its stamp, then the line
        state[_S_WRITER].restamp(now // 1_000_000_000)
        count = text_line_py(lines[0], lines[1], lines[2], now, lead, request, site)
    if count >= _MAX_PENDING:
        state[_S_WRITER].flush()
    elif lines[_L_TIMER] is None:
        state[_S_WRITER].arm()
    return out


class ConnectionLog:
    """Requests in flight on one connection, in order, and the framer of their responses."""

    __slots__ = (
        "_capture",
        "_kept",
        "_recorder",
        "_requests",
        "_text_state",
        "client",
        "fast",
        "framer",
        "port",
        "quiet",
        "sandbox_id",
        "stats",
        "writer",
    )

    def __init__(
        self,
        client: str,
        *,
        quiet: bool = False,
        writer: AccessWriter | None = None,
        stats: RequestStats | None = None,
    ) -> None:
        self.client = client
        self.stats = stats  # the edge's per-request metrics (tunneld/metrics.py)
        self._kept = None if stats is None else stats.whole  # its observations of whole responses
        self.writer = writer  # None: through the ``logging`` module (one record per line)
        self.quiet = quiet  # no log lines: the connection is here for inspection only
        self._recorder: ConnectionRecorder | None = None
        self._capture: Record | None = None  # the record whose response body is flowing
        self.sandbox_id = ""
        self.port = 0
        self.framer = ResponseFramer()
        self._requests: deque[list[Any]] = deque()
        # When this connection's lines are text lines the writer formats: the state of
        # ``log_response`` (its docstring), which takes a whole response in one call. Its
        # constant parts: the lines' lead (after the time stamp up to the method), and
        # " sandbox:port id=" (made again if the shell sets another sandbox or port).
        self._text_state: list[Any] | None = None
        if writer is not None and not quiet and not writer.json:
            lead = writer.tail + client.encode("utf-8", "surrogatepass") + b' "'
            self._text_state = [
                self._requests,
                self.framer,
                self._kept,
                writer.lines,
                writer,
                lead,
                b"",
                None,
                0,
                monotonic_ns,
                time_ns,
                log,
                self._requests.popleft,
                _logger_dict(log),
                _ID_COUNTER,
                _ID_PREFIX,
                None if speedups.c is None else speedups.c.pending(),
            ]
        # ``log_response(fast, self, data)`` first, then ``general(data)`` when it takes
        # nothing, is ``response(data)``, and ``log_request(fast, head)`` is ``request(head)``
        # (tunneld/public.py calls them itself); None while a recorder is set.
        self.fast = self._text_state

    @property
    def recorder(self) -> ConnectionRecorder | None:
        """The inspection recorder of this connection (tunneld/inspect.py), or None."""
        return self._recorder

    @recorder.setter
    def recorder(self, recorder: ConnectionRecorder | None) -> None:
        self._spill()
        self._recorder = recorder
        self.fast = self._text_state if recorder is None else None

    # -- requests --------------------------------------------------------------------------------
    def _spill(self) -> None:
        """Before the deque or the framer is read here: the request in flight that
        ``log_request`` may hold in C moves to them (``spill``; accesslog's C keeps a
        connection's one request out of the deque while nothing else is in flight)."""
        if self._text_state is not None:
            spill(self._text_state)

    def request(self, head: RequestHead) -> bytes:
        """A request is forwarded; returns the ``x-request-id`` header line it carries."""
        self._spill()
        requests = self._requests
        request = begin_request(
            head, _ID_COUNTER, _ID_PREFIX, monotonic_ns(), requests, self.framer
        )
        if self._recorder is not None and requests and requests[-1] is request:
            request[_RECORD] = self._recorder.begin(head, request[_ID])
        return request[_ID_LINE]  # type: ignore[no-any-return]

    def body(self, data: bytes | memoryview) -> None:
        if self._text_state is not None:
            spill(self._text_state)  # _spill() without the call
        if self._requests:
            request = self._requests[-1]
            request[_BODY_IN] += len(data)
            if request[_RECORD] is not None:
                request[_RECORD].request_body(data)

    # -- responses -------------------------------------------------------------------------------
    def response(self, data: bytes) -> bytes:
        """The service's bytes -> the bytes to write to the client (the same, plus at most
        one x-request-id line per final response head)."""
        fast = self.fast
        if fast is not None:  # text lines: the common case in one call (log_response)
            out_bytes = log_response(fast, self, data)
            if out_bytes is not None:
                return out_bytes
        elif self._requests and self._recorder is None:
            # json lines, lines through logging, or quiet: one whole response in this read
            # (ResponseFramer.whole), all of it here, the general path's ``_write`` inlined.
            requests = self._requests
            request = requests[0]
            out_bytes = whole_response(self.framer, data, request, monotonic_ns(), self._kept)
            if out_bytes is not None:  # status, sizes and time now in request; metrics counted
                requests.popleft()
                if not self.quiet and log.isEnabledFor(_INFO):
                    ns = request[_TTFB]
                    self._log(request, request[_STATUS], request[_BODY_OUT], None, ns / 1e9)
                return out_bytes
        return self.general(data)

    def general(self, data: bytes) -> bytes:
        """``response`` for what its one-step paths do not take."""
        self._spill()
        out: list[bytes | memoryview] = []
        for event in self.framer.feed(data):
            if isinstance(event, (bytes, memoryview)):
                out.append(event)
                if self._capture is not None:
                    self._capture.response_body(event)
            elif isinstance(event, ResponseHead):
                out.append(self._head(event))
            elif isinstance(event, ResponseDone):
                self._done(event)
            elif isinstance(event, Unframed):
                self._unframed(event.reason)
        if len(out) == 1 and type(out[0]) is bytes:
            return out[0]
        return b"".join(out)

    def _resite(self) -> None:
        """The shell set another sandbox or port: the text lines' "sandbox:port" again."""
        state = self._text_state
        if state is not None:
            sandbox_id, port = self.sandbox_id, self.port
            state[_S_SITE_OF], state[_S_SITE_PORT] = sandbox_id, port
            state[_S_SITE] = f" {sandbox_id}:{port} id=".encode("utf-8", "surrogatepass")

    def _head(self, head: ResponseHead) -> bytes:
        if head.status < 200 and head.status != 101:
            return head.raw  # informational
        request = self._requests[0] if self._requests else None
        if request is None:
            return head.raw
        if request[_TTFB] is None:
            request[_TTFB] = monotonic_ns() - request[_STARTED]
        if request[_RECORD] is not None:
            self._capture = request[_RECORD]
            request[_RECORD].response_head_raw(head.raw)
        if head.has_request_id:
            return head.raw
        id_line: bytes = request[_ID_LINE]
        return head.raw[:-2] + id_line + b"\r\n"

    def _done(self, done: ResponseDone) -> None:
        self._capture = None
        if self._requests:
            self._write(self._requests.popleft(), done.status, done.body, None)

    def _unframed(self, reason: str) -> None:
        self._capture = None
        while self._requests:
            self._write(self._requests.popleft(), None, None, f"responses not followed: {reason}")

    def edge_answered(self, status: int, code: str) -> None:
        """The edge answered the oldest request itself (an error page) and closes."""
        self._spill()
        if self._requests:
            self._write(self._requests.popleft(), status, None, f"edge: {code}")

    def closed(self, service_ended: bool = True) -> None:
        """The connection ended: a body read until close is complete if the service ended it
        (``service_ended``: its FIN, not a reset); the rest got no (whole) response."""
        self._spill()
        if service_ended:
            for event in self.framer.close():
                if isinstance(event, ResponseDone):
                    self._done(event)
        self._capture = None
        while self._requests:
            request = self._requests.popleft()
            cut = request[_TTFB] is not None  # its head went out: the response was cut short
            self._write(request, None, None, "response cut short" if cut else "no response")

    def _write(
        self, request: list[Any], status: int | None, body_out: int | None, note: str | None
    ) -> None:
        record = request[_RECORD]
        if record is not None and self._recorder is not None:
            self._recorder.end(record, status, note)
        duration = (monotonic_ns() - request[_STARTED]) / 1e9
        ttfb = request[_TTFB]
        if self.stats is not None:
            self.stats.observe(
                duration,
                None if ttfb is None else ttfb / 1e9,
                status,
                request[_BODY_IN],
                body_out or 0,
            )
        if self.quiet or not log.isEnabledFor(_INFO):
            return
        self._log(request, status, body_out, note, duration)

    def _log(
        self,
        request: list[Any],
        status: int | None,
        body_out: int | None,
        note: str | None,
        duration: float,
    ) -> None:
        """One line, for any end of a request (``_line`` is the common case's)."""
        ttfb_ns = request[_TTFB]
        duration_text = _tenths(int(duration * 1e9)).decode()
        ttfb_text = "-" if ttfb_ns is None else f"{_tenths(ttfb_ns).decode()}ms"
        method = request[_METHOD].decode("latin-1")
        path = request[_TARGET].decode("latin-1")
        request_id = request[_ID].decode("ascii")
        message = (
            f'{self.client} "{method} {path}" {"-" if status is None else status} '
            f"{request[_BODY_IN]} {'-' if body_out is None else body_out}B "
            f"{duration_text}ms ttfb {ttfb_text} {self.sandbox_id}:{self.port} "
            f"id={request_id}{f' ({note})' if note else ''}"
        )
        writer = self.writer
        if writer is not None and not writer.json:
            writer.write(message, None)
            return
        fields: dict[str, Any] = {
            "client": self.client,
            "sandbox": self.sandbox_id,
            "port": self.port,
            "method": method,
            "path": path,
            "status": status,
            "bytes_in": request[_BODY_IN],
            "bytes_out": body_out,
            "duration_ms": round(duration * 1000, 3),
            "ttfb_ms": None if ttfb_ns is None else round(ttfb_ns / 1e6, 3),
            "request_id": request_id,
        }
        if note:
            fields["note"] = note
        if writer is not None:  # json: the fields are keys of the line too
            writer.write(message, fields)
        else:
            log.info("%s", message, extra={"access": fields})


# The C versions when built (tunneld/speedups.py), else the references above.
request_ids = request_ids_py if speedups.c is None else speedups.c.request_ids
text_line = text_line_py if speedups.c is None else speedups.c.text_line
whole_response = whole_response_py if speedups.c is None else speedups.c.whole_response
begin_request = begin_request_py if speedups.c is None else speedups.c.begin_request
log_response = log_response_py if speedups.c is None else speedups.c.log_response
log_request = log_request_py if speedups.c is None else speedups.c.log_request
spill = spill_py if speedups.c is None else speedups.c.spill
