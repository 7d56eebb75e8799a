"""AccessWriter: the access log's lines without a logging record each (tunneld/accesslog.py).
They must read exactly as the stdlib formatter of ``tunneld serve`` writes them, leave in
writes that never split a line nor exceed PIPE_BUF, and come out at the end of the loop
iteration that made them."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import socket
from collections.abc import Callable
from typing import TextIO

import pytest

from tunneld import accesslog
from tunneld.accesslog import AccessWriter, new_request_id
from tunneld.logs import JsonFormatter

from .speedups_impl import implementation  # noqa: F401  (the fixture)

# With the C extension's functions and with their pure-Python references (tests/speedups_impl.py).
pytestmark = pytest.mark.usefixtures("implementation")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


FIELDS = {"client": "10.0.0.1", "status": 200, "path": "/x y", "bytes_out": None}


class Recorder(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def _stdlib(fmt: str, message: str) -> str:
    """What ``tunneld serve``'s logging setup writes for ``message`` (cli._setup_logging)."""
    record = logging.LogRecord("tunneld.access", logging.INFO, __file__, 1, message, None, None)
    record.access = FIELDS  # type: ignore[attr-defined]
    if fmt == "json":
        return JsonFormatter().format(record)
    return logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s").format(record)


_STAMP = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[.,]\d{3}Z?")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_line_reads_as_the_stdlib_formatter_writes_it(fmt: str) -> None:
    loop = asyncio.new_event_loop()
    try:
        stream = Recorder()
        writer = AccessWriter(loop, fmt, stream)
        writer.write('10.0.0.1 "GET /x y" 200', FIELDS)
        writer.flush()
    finally:
        loop.close()
    ours = stream.getvalue()
    theirs = _stdlib(fmt, '10.0.0.1 "GET /x y" 200')
    assert ours.endswith("\n") and ours.count("\n") == 1
    if fmt == "json":
        a, b = json.loads(ours), json.loads(theirs)
        assert _STAMP.match(a.pop("time")) and _STAMP.match(b.pop("time"))
        assert a == b
    else:
        assert _STAMP.sub("", ours.rstrip("\n")) == _STAMP.sub("", theirs)


def test_the_worker_tag_is_the_formatters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accesslog, "WORKER", 3)
    loop = asyncio.new_event_loop()
    try:
        text, js = Recorder(), Recorder()
        AccessWriter(loop, "text", text).write("m", {})
        AccessWriter(loop, "json", js).write("m", {})
        loop.run_until_complete(asyncio.sleep(accesslog.FLUSH_AFTER))  # the timed flush
    finally:
        loop.close()
    assert " INFO    tunneld.access[w3]: m\n" in text.getvalue()
    assert json.loads(js.getvalue())["worker"] == 3


@pytest.mark.anyio
async def test_lines_leave_together_in_line_aligned_writes_of_at_most_pipe_buf() -> None:
    stream = Recorder()
    writer = AccessWriter(asyncio.get_running_loop(), "text", stream)
    messages = [f"request {i} " + "\u00e9" * (i % 300) for i in range(200)]  # 2 bytes each
    for message in messages[:100]:
        writer.write(message, {})
    await asyncio.sleep(0)
    assert stream.writes == []  # nothing yet: written FLUSH_AFTER after the first line
    for message in messages[100:]:
        writer.write(message, {})
    # the writer's timer was armed before this sleep's, so it has fired when the sleep ends
    await asyncio.sleep(accesslog.FLUSH_AFTER)
    assert len(stream.writes) >= 2
    assert all(len(w.encode()) <= 4096 and w.endswith("\n") for w in stream.writes)
    lines = "".join(stream.writes).splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == messages


@pytest.mark.anyio
async def test_a_burst_is_written_at_once() -> None:
    stream = Recorder()
    writer = AccessWriter(asyncio.get_running_loop(), "text", stream)
    for i in range(accesslog._MAX_PENDING):
        writer.write(str(i), {})
    assert "".join(stream.writes).count("\n") == accesslog._MAX_PENDING  # bounded, not kept


@pytest.mark.anyio
async def test_a_closed_stream_does_not_break_serving() -> None:
    stream = io.StringIO()
    writer = AccessWriter(asyncio.get_running_loop(), "text", stream)
    stream.close()
    writer.write("lost", {})
    writer.flush()  # ValueError from the closed stream is swallowed


def test_new_request_ids_are_32_hex_digits_and_distinct() -> None:
    ids = [new_request_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(re.fullmatch(rb"[0-9a-f]{32}", i) for i in ids)


@pytest.mark.anyio
async def test_an_early_flush_writes_once_and_disarms_the_timer() -> None:
    stream = Recorder()
    writer = AccessWriter(asyncio.get_running_loop(), "text", stream)
    writer.write("a", {})
    writer.flush()  # as the edge's stop does
    assert len(stream.writes) == 1
    await asyncio.sleep(accesslog.FLUSH_AFTER * 2)
    assert len(stream.writes) == 1  # nothing twice, nothing empty
    writer.write("b", {})  # a new first line arms a new timer
    await asyncio.sleep(accesslog.FLUSH_AFTER)
    assert [w.rsplit(": ", 1)[1] for w in stream.writes] == ["a\n", "b\n"]


def _seqpacket_stream(encoding: str) -> tuple[TextIO, socket.socket]:
    """A text stream whose descriptor is one end of a SOCK_SEQPACKET pair: each write to it is
    one message at the other end, so a test sees the writes themselves."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(True)
    stream = open(ours.detach(), "w", encoding=encoding, buffering=1 << 16)  # noqa: SIM115
    theirs.settimeout(5)
    return stream, theirs


def _messages(sock: socket.socket) -> list[bytes]:
    out = []
    sock.setblocking(False)
    try:
        while len(out) < 10_000:
            out.append(sock.recv(1 << 17))
    except BlockingIOError:
        pass
    return out


def _written(encoding: str, feed: Callable[[AccessWriter, TextIO], None]) -> list[bytes]:
    """The writes an AccessWriter makes on a SOCK_SEQPACKET stream of ``encoding`` after
    ``feed(writer, stream)`` and a flush."""
    loop = asyncio.new_event_loop()
    stream, peer = _seqpacket_stream(encoding)
    try:
        writer = AccessWriter(loop, "text", stream)
        feed(writer, stream)
        writer.flush()
        return _messages(peer)
    finally:
        loop.close()
        stream.close()
        peer.close()


def test_a_utf8_descriptor_gets_the_lines_in_line_aligned_writes_of_at_most_pipe_buf() -> None:
    """With a descriptor that takes UTF-8 the lines go to it directly (no text round trip): the
    same bytes, after what the stream held, in line-aligned writes of at most PIPE_BUF, a line
    longer than that alone."""
    messages = [f"request {i} " + "\u00e9" * (i % 300) for i in range(150)]
    messages.insert(70, "x" * 5000)  # one line longer than PIPE_BUF

    def feed(writer: AccessWriter, stream: TextIO) -> None:
        stream.write("held in the stream\n")  # buffered (no line buffering): must go first
        for message in messages:
            writer.write(message, {})

    got = _written("utf-8", feed)
    assert got[0] == b"held in the stream\n"
    writes = got[1:]
    assert len(writes) >= 3
    long_line = [w for w in writes if len(w) > 4096]
    assert len(long_line) == 1 and long_line[0].count(b"\n") == 1
    assert all(w.endswith(b"\n") for w in writes)
    assert all(len(w) <= 4096 for w in writes if w is not long_line[0])
    lines = b"".join(writes).decode("utf-8").splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == messages


def test_a_stream_of_another_encoding_writes_text() -> None:
    """A stream that does not write UTF-8 gets text, which it encodes as it does."""
    got = _written("latin-1", lambda writer, _: writer.write("caf\u00e9", {}))
    assert len(got) == 1 and got[0].endswith(b": caf\xe9\n")


@pytest.mark.anyio
async def test_a_descriptor_closed_under_the_writer_does_not_break_serving() -> None:
    stream, peer = _seqpacket_stream("utf-8")
    writer = AccessWriter(asyncio.get_running_loop(), "text", stream)
    peer.close()  # EPIPE (SIGPIPE is ignored by Python)
    try:
        writer.write("lost", {})
        writer.flush()  # the OSError is swallowed
        assert writer.pending == []
    finally:
        stream.close()
