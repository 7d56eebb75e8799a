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
tunneld/logs.py's keys), keeps the lines and writes them ``FLUSH_AFTER`` (50 ms) after the first,
or at 256 lines, or when the edge stops, in writes of at most ``PIPE_BUF`` bytes that end on a
line (workers share one stderr: a write that size is never interleaved with another's). The
``tunneld.access`` logger's level still decides whether lines are written at all.

An inspected connection (tunneld/inspect.py) takes this same path, with ``quiet`` when the access
log is off: its ``recorder`` gets each request's head and body prefix, the response head and
body prefix, and the end (complete, aborted, edge-answered), at the same points as the log line.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import sys
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Final, TextIO

import orjson

from .responses import ResponseDone, ResponseFramer, ResponseHead, Unframed

if TYPE_CHECKING:
    from .httphead import RequestHead
    from .inspect import ConnectionRecorder, Record
    from .metrics import RequestStats

__all__ = ["AccessWriter", "ConnectionLog", "request_id_of"]

log = logging.getLogger("tunneld.access")
_INFO: Final = logging.INFO

_VALID_ID: Final = re.compile(rb"[A-Za-z0-9._:-]{1,200}")


# New request ids: 16 random hex digits drawn once per process, then a counter (16 more): as
# unique as 32 random digits across processes and restarts, without a syscall per request.
_ID_PREFIX: Final = os.urandom(8).hex().encode()
_ID_COUNTER = itertools.count(int.from_bytes(os.urandom(4), "big"))


def new_request_id() -> bytes:
    return _ID_PREFIX + b"%016x" % next(_ID_COUNTER)


def request_id_of(head: RequestHead) -> bytes:
    """The client's well-formed X-Request-Id, else a new one (32 hex digits)."""
    for name, value in head.headers:
        if name == b"x-request-id":
            if _VALID_ID.fullmatch(value):
                return value
            break
    return new_request_id()


# This process's worker index under ``--workers N`` (set with the logging setup, as the stdlib
# formatter's ``name[wN]`` tag is).
WORKER: int | None = None

# One write to a pipe of at most PIPE_BUF (4096) bytes is atomic (POSIX): workers' lines never
# mix. Counted in characters: a line's are at most U+00FF (targets are decoded as latin-1), two
# bytes each in UTF-8, so 2048 of them fit. A single longer line goes alone, as with logging.
_WRITE_CHUNK: Final = 2048
# "000" to "999": the milliseconds of a time stamp (a lookup, not a format per line).
_MSECS: Final = tuple(f"{ms:03d}" for ms in range(1001))
# Lines are written this long after the first of them (as nginx's ``access_log ... flush=``):
# one write per interval, not one per loop iteration, which with one request in flight is a
# write (a syscall) per request. A crash loses at most this much of the log; a stop writes it.
FLUSH_AFTER: Final = 0.05
# Lines kept before a write even within the interval (a burst of completions).
_MAX_PENDING: Final = 256


class AccessWriter:
    """Formats access lines as the stdlib formatter of ``tunneld serve`` would and writes them in
    batches (see the module docstring)."""

    __slots__ = (
        "_json",
        "_loop",
        "_pending",
        "_sec",
        "_stamp",
        "_tail",
        "_timer",
        "_worker",
        "stream",
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
        self._tail = f" INFO    {name}: "  # the text line after its time stamp
        self.stream = stream if stream is not None else sys.stderr
        self._pending: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sec = -1
        self._stamp = ""
        self._worker = worker if self._json else None

    @property
    def json(self) -> bool:
        return self._json

    def write(self, message: str, fields: dict[str, Any] | None) -> None:
        now = time.time()
        sec = int(now)
        if sec != self._sec:
            self._sec = sec
            if self._json:
                self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec))
            else:
                self._stamp = time.strftime("%Y-%m-%d %H:%M:%S,", time.localtime(sec))
        msecs = _MSECS[int((now - sec) * 1000)]
        if self._json:
            out: dict[str, Any] = {
                "time": f"{self._stamp}{msecs}Z",
                "level": "info",
                "logger": "tunneld.access",
                "message": message,
            }
            if self._worker is not None:
                out["worker"] = self._worker
            if fields:
                out.update(fields)
            line = orjson.dumps(out, default=str).decode() + "\n"
        else:
            line = f"{self._stamp}{msecs}{self._tail}{message}\n"
        pending = self._pending
        pending.append(line)
        if len(pending) >= _MAX_PENDING:
            self.flush()
        elif self._timer is None:
            self._timer = self._loop.call_later(FLUSH_AFTER, self.flush)

    def flush(self) -> None:
        """Write the pending lines now (also ``FLUSH_AFTER`` after the first, and at stop)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending = self._pending
        if not pending:
            return
        self._pending = []
        try:
            chunk: list[str] = []
            size = 0
            for line in pending:
                if size + len(line) > _WRITE_CHUNK and chunk:
                    self.stream.write("".join(chunk))
                    chunk, size = [], 0
                chunk.append(line)
                size += len(line)
            self.stream.write("".join(chunk))
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed or full: never break serving for a log
            pass


class _Request:
    __slots__ = ("body_in", "method", "record", "request_id", "started", "target", "ttfb")

    def __init__(self, method: bytes, target: bytes, request_id: bytes) -> None:
        self.method = method
        self.target = target
        self.request_id = request_id
        self.started = time.monotonic()
        self.ttfb: float | None = None
        self.body_in = 0
        self.record: Record | None = None  # inspection (tunneld/inspect.py), when on


class ConnectionLog:
    """Requests in flight on one connection, in order, and the framer of their responses."""

    __slots__ = (
        "_capture",
        "_requests",
        "client",
        "framer",
        "port",
        "quiet",
        "recorder",
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
        self.writer = writer  # None: through the ``logging`` module (one record per line)
        self.quiet = quiet  # no log lines: the connection is here for inspection only
        self.recorder: ConnectionRecorder | None = None
        self._capture: Record | None = None  # the record whose response body is flowing
        self.sandbox_id = ""
        self.port = 0
        self.framer = ResponseFramer()
        self._requests: deque[_Request] = deque()

    # -- requests --------------------------------------------------------------------------------
    def request(self, head: RequestHead) -> bytes:
        """A request is forwarded; returns the ``x-request-id`` header line it carries."""
        # request_id_of, inlined (this runs per request, a call costs ~1 % of the request)
        for name, value in head.headers:
            if name == b"x-request-id":
                request_id = value if _VALID_ID.fullmatch(value) else new_request_id()
                break
        else:
            request_id = _ID_PREFIX + b"%016x" % next(_ID_COUNTER)
        requests = self._requests
        if len(requests) < 1024:  # pipelining without reading: stop recording, not grow
            request = _Request(head.method, head.target, request_id)
            if self.recorder is not None:
                request.record = self.recorder.begin(head, request_id)
            requests.append(request)
            self.framer.expect(head.method)
        return b"x-request-id: " + request_id + b"\r\n"

    def body(self, data: bytes | memoryview) -> None:
        if self._requests:
            request = self._requests[-1]
            request.body_in += len(data)
            if request.record is not None:
                request.record.request_body(data)

    # -- responses -------------------------------------------------------------------------------
    def response(self, data: bytes) -> bytes:
        """The service's bytes -> the bytes to write to the client (the same, plus at most
        one x-request-id line per final response head)."""
        requests = self._requests
        if requests and self.recorder is None:
            # The common case first: one whole response in this read (ResponseFramer.whole).
            whole = self.framer.whole(data)
            if whole is not None:
                status, end = whole
                request = requests.popleft()
                now = time.monotonic()
                request.ttfb = now - request.started
                self._write(request, status, len(data) - end, None, now)
                return b"".join(
                    (
                        data[: end - 2],
                        b"x-request-id: ",
                        request.request_id,
                        b"\r\n\r\n",
                        data[end:],
                    )
                )
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

    def _head(self, head: ResponseHead) -> bytes:
        if head.status < 200 and head.status != 101:
            return head.raw  # informational
        request = self._requests[0] if self._requests else None
        if request is None:
            return head.raw
        if request.ttfb is None:
            request.ttfb = time.monotonic() - request.started
        if request.record is not None:
            self._capture = request.record
            request.record.response_head_raw(head.raw)
        if head.has_request_id:
            return head.raw
        return head.raw[:-2] + b"x-request-id: " + request.request_id + b"\r\n\r\n"

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
        if self._requests:
            self._write(self._requests.popleft(), status, None, f"edge: {code}")

    def closed(self, service_ended: bool = True) -> None:
        """The connection ended: a body read until close is complete if the service ended it
        (``service_ended``: its FIN, not a reset); the rest got no (whole) response."""
        if service_ended:
            for event in self.framer.close():
                if isinstance(event, ResponseDone):
                    self._done(event)
        self._capture = None
        while self._requests:
            request = self._requests.popleft()
            cut = request.ttfb is not None  # its head went out: the response was cut short
            self._write(request, None, None, "response cut short" if cut else "no response")

    def _write(
        self,
        request: _Request,
        status: int | None,
        body_out: int | None,
        note: str | None,
        now: float | None = None,
    ) -> None:
        if request.record is not None and self.recorder is not None:
            self.recorder.end(request.record, status, note)
        duration = (time.monotonic() if now is None else now) - request.started
        ttfb = request.ttfb
        if self.stats is not None:
            self.stats.observe(duration, ttfb, status, request.body_in, body_out or 0)
        if self.quiet or not log.isEnabledFor(_INFO):
            return
        # Durations in tenths of a millisecond, integer arithmetic and formatting: float
        # rounding and formatting cost as much as the rest of the line (``bench.e2e.instr``).
        d10 = int(duration * 10000.0 + 0.5)
        if ttfb is None:
            ttfb_text = "-"
        else:
            t10 = int(ttfb * 10000.0 + 0.5)
            ttfb_text = f"{t10 // 10}.{t10 % 10}ms"
        method = request.method.decode("latin-1")
        path = request.target.decode("latin-1")
        request_id = request.request_id.decode("ascii")
        message = (
            f'{self.client} "{method} {path}" {"-" if status is None else status} '
            f"{request.body_in} {'-' if body_out is None else body_out}B "
            f"{d10 // 10}.{d10 % 10}ms ttfb {ttfb_text} {self.sandbox_id}:{self.port} "
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
            "bytes_in": request.body_in,
            "bytes_out": body_out,
            "duration_ms": round(duration * 1000, 3),
            "ttfb_ms": None if ttfb is None else round(ttfb * 1000, 3),
            "request_id": request_id,
        }
        if note:
            fields["note"] = note
        if writer is not None:  # json: the fields are keys of the line too
            writer.write(message, fields)
        else:
            log.info("%s", message, extra={"access": fields})
