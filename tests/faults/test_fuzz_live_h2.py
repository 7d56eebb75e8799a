"""Fuzzing the live public HTTP/2 listener (HTTPS, ALPN ``h2``) with seeded hostile frames.

Each case opens a real TLS connection to an in-process edge with a real agent and origin, sends
a valid client preface and SETTINGS (and often a valid request), then frames from a seeded
generator: bad lengths, unknown types, HEADERS with invalid pseudo-headers or undecodable HPACK,
CONTINUATION floods, WINDOW_UPDATE overflow, RST_STREAM on unknown streams, SETTINGS with
out-of-range values, frames on the wrong stream, padding longer than the frame, truncated frames
and random bytes. For every case:

* every frame the edge sends parses (hyperframe), and the connection ends (the edge's GOAWAY and
  close, or its keep-alive / idle close; short timeouts here) within a deadline, never hangs;
* a GOAWAY carries a known error code;
* no traceback is logged (the autouse ``no_unhandled_errors``);
* after the run a fresh HTTP/2 connection to the same edge gets 200 with the right body.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import hpack
import hyperframe.frame
import pytest
import trustme

from tests.e2e.test_public_tls import TOKEN, client_context, host_of, tls_stack
from tests.faults.conftest import Stack

from .fuzz_live import RecordingOrigin, converse, forwarding_problems, through_the_edge

pytestmark = pytest.mark.anyio

SEED = 20261204
CASES = 200
PARALLEL = 32
TIMEOUTS = {"head_timeout": 3.0, "keepalive_timeout": 1.0, "idle_timeout": 2.0}
DEADLINE = 15.0

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = 0, 1, 2, 3, 4, 5, 6, 7
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM, END_HEADERS, PADDED, ACK = 0x1, 0x4, 0x8, 0x1


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def stack(ca: trustme.CA, tmp_path: Path) -> AsyncIterator[Stack]:
    s = await tls_stack(ca, tmp_path, **TIMEOUTS)
    try:
        yield s
    finally:
        await s.close()


def frame(kind: int, flags: int, sid: int, payload: bytes, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return struct.pack(">I", n)[1:] + bytes([kind, flags]) + struct.pack(">I", sid) + payload


def block(headers: list[tuple[bytes, bytes]]) -> bytes:
    return hpack.Encoder().encode(headers)


def request_headers(
    host: bytes, path: bytes = b"/", method: bytes = b"GET"
) -> list[tuple[bytes, bytes]]:
    return [(b":method", method), (b":scheme", b"https"), (b":authority", host), (b":path", path)]


def bad_headers(rng: random.Random, host: bytes, other: bytes) -> list[tuple[bytes, bytes]]:
    """A request header list with one defect (or a valid one for another host)."""
    good = request_headers(host, b"/headers")
    spoof = [
        (b"x-forwarded-for", b"spoof"),
        (b"x-sandbox-name", b"spoof"),
        (b"x_real_ip", b"spoof"),
    ]
    choice = rng.randrange(16)
    if choice == 0:
        return good[1:]  # no :method
    if choice == 1:
        return [h for h in good if h[0] != b":path"]
    if choice == 2:
        return [*good, (b":method", b"POST")]  # duplicate pseudo-header
    if choice == 3:
        return [(b"x-a", b"1"), *good]  # regular before pseudo
    if choice == 4:
        return [*good, (b":status", b"200")]  # response pseudo-header in a request
    if choice == 5:
        return [*good, (b"X-Upper", b"1")]  # uppercase name
    if choice == 6:
        return [*good, (b"connection", b"keep-alive")]  # connection-specific
    if choice == 7:
        return [*good, (b"te", b"gzip")]
    if choice == 8:
        return [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", host),
            (b":path", b""),
        ]
    if choice == 9:
        return [(b":method", b"CONNECT"), (b":authority", host)]  # plain CONNECT
    if choice == 10:
        return [*good, (b":protocol", b"websocket")]  # :protocol without CONNECT
    if choice == 11:
        return [*request_headers(other, b"/headers"), *spoof]  # another sandbox, spoofed
    if choice == 12:
        return [*good, *spoof, (b"x-fuzz", b"a\x00b")]  # NUL in a value
    if choice == 13:
        return [*good, (b"x-f\xff", b"1"), *spoof]  # a byte past ASCII in a name
    if choice == 14:
        return [*good, (b"content-length", rng.choice([b"-1", b"abc", b"5, 6", b"99999999999"]))]
    return [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b"host", b"a\r\nb")]


def fuzz_frames(rng: random.Random, host: bytes, other: bytes, open_sid: int) -> list[bytes]:
    """One to four hostile frames (``open_sid``: a stream the case opened, or 0)."""
    out: list[bytes] = []
    sid = open_sid or 1
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(22)
        if kind == 0:  # bad frame lengths
            ftype = rng.choice([PING, RST_STREAM, WINDOW_UPDATE, PRIORITY, SETTINGS, GOAWAY])
            payload = rng.randbytes(rng.choice([0, 1, 3, 5, 7, 9, 13]))
            out.append(frame(ftype, 0, rng.choice([0, sid]), payload))
        elif kind == 1:  # unknown frame types (to be ignored)
            out.append(
                frame(
                    rng.randrange(10, 256),
                    rng.randrange(256),
                    rng.randrange(8),
                    rng.randbytes(rng.randrange(64)),
                )
            )
        elif kind == 2:  # HEADERS with invalid pseudo-headers, on a new stream
            new = open_sid + 2 if open_sid else 1
            out.append(
                frame(HEADERS, END_HEADERS | END_STREAM, new, block(bad_headers(rng, host, other)))
            )
        elif kind == 3:  # a CONTINUATION flood
            new = open_sid + 2 if open_sid else 1
            first = block(request_headers(host))
            out.append(frame(HEADERS, END_STREAM, new, first))
            piece = block([(b"x-flood", b"f" * rng.choice([10, 1000, 4000]))])
            for _ in range(rng.choice([20, 100, 400])):
                out.append(frame(CONTINUATION, 0, new, piece))
            if rng.random() < 0.5:
                out.append(frame(CONTINUATION, END_HEADERS, new, b""))
        elif kind == 4:  # CONTINUATION with no HEADERS, or on another stream
            out.append(
                frame(
                    CONTINUATION, END_HEADERS, rng.choice([sid, sid + 2, 0]), block([(b"a", b"b")])
                )
            )
        elif kind == 5:  # HEADERS without END_HEADERS, then another frame
            out.append(
                frame(HEADERS, 0, open_sid + 2 if open_sid else 1, block(request_headers(host)))
            )
            out.append(frame(PING, 0, 0, b"12345678"))
        elif kind == 6:  # WINDOW_UPDATE overflow, or an increment of 0
            inc = rng.choice([0, 2**31 - 1, 2**31 - 65535])
            target = rng.choice([0, sid])
            n = 2 if inc else 1
            out += [frame(WINDOW_UPDATE, 0, target, struct.pack(">I", inc))] * n
        elif kind == 7:  # RST_STREAM on an unknown, idle or closed stream, or on stream 0
            target = rng.choice([0, 2, 99, 2**31 - 1, sid])
            out.append(frame(RST_STREAM, 0, target, struct.pack(">I", rng.randrange(20))))
        elif kind == 8:  # SETTINGS with out-of-range values
            setting = rng.choice(
                [
                    (2, 2),
                    (4, 2**31),
                    (5, 100),
                    (5, 2**24),
                    (3, 0),
                    (1, 0),
                    (6, 0),
                    (8, 5),
                    (0x77, 1),
                    (4, 0),
                    (5, 16384),
                ]
            )
            out.append(frame(SETTINGS, 0, 0, struct.pack(">HI", *setting)))
        elif kind == 9:  # SETTINGS ACK with a payload, SETTINGS on a stream
            out.append(
                rng.choice(
                    [
                        frame(SETTINGS, ACK, 0, b"\x00\x01\x00\x00\x10\x00"),
                        frame(SETTINGS, 0, 1, b""),
                        frame(SETTINGS, ACK, 0, b""),
                    ]
                )
            )
        elif kind == 10:  # HPACK that does not decode
            out.append(
                frame(
                    HEADERS,
                    END_HEADERS | END_STREAM,
                    open_sid + 2 if open_sid else 1,
                    rng.randbytes(rng.randint(1, 40)),
                )
            )
        elif kind == 11:  # DATA on an idle stream, on stream 0, or padded past its end
            choice = rng.randrange(3)
            if choice == 0:
                out.append(frame(DATA, 0, sid + 40, b"x" * 10))
            elif choice == 1:
                out.append(frame(DATA, 0, 0, b"x"))
            else:
                out.append(frame(DATA, PADDED, sid, b"\xff" + b"x" * 10))
        elif kind == 12:  # a frame larger than SETTINGS_MAX_FRAME_SIZE
            out.append(frame(DATA, 0, sid, b"y" * 20000))
        elif kind == 13:  # a frame whose length says more than is sent (truncated)
            out.append(
                frame(rng.choice([DATA, HEADERS, PING]), 0, sid, b"zz", length=rng.choice([8, 300]))
            )
        elif kind == 14:  # PUSH_PROMISE from a client
            out.append(
                frame(
                    PUSH_PROMISE,
                    END_HEADERS,
                    sid,
                    struct.pack(">I", 2) + block(request_headers(host)),
                )
            )
        elif kind == 15:  # PRIORITY depending on itself; HEADERS on an even or smaller stream
            if rng.random() < 0.5:
                out.append(frame(PRIORITY, 0, sid, struct.pack(">IB", sid, 16)))
            else:
                out.append(
                    frame(
                        HEADERS,
                        END_HEADERS | END_STREAM,
                        rng.choice([2, 4]),
                        block(request_headers(host)),
                    )
                )
        elif kind == 16:  # PING with a stream id, or a PING flood
            if rng.random() < 0.5:
                out.append(frame(PING, 0, 1, b"12345678"))
            else:
                out += [frame(PING, 0, 0, b"%08d" % i) for i in range(rng.choice([50, 500]))]
        elif kind == 17:  # the client's GOAWAY, then a new stream anyway
            out.append(frame(GOAWAY, 0, 0, struct.pack(">II", 0, rng.randrange(14))))
            out.append(
                frame(
                    HEADERS,
                    END_HEADERS | END_STREAM,
                    open_sid + 2 if open_sid else 1,
                    block(request_headers(host)),
                )
            )
        elif kind == 18:  # random bytes
            out.append(rng.randbytes(rng.randint(1, 200)))
        elif kind == 19:  # DATA after END_STREAM on the open stream
            out.append(frame(DATA, END_STREAM, sid, b"late"))
            out.append(frame(DATA, 0, sid, b"later"))
        elif kind == 20:  # a header block over the 32 KiB head limit, in one HEADERS
            big = [*request_headers(host), (b"x-big", b"b" * 40000)]
            data = block(big)
            new = open_sid + 2 if open_sid else 1
            out.append(frame(HEADERS, 0, new, data[:16000]))
            out.append(frame(CONTINUATION, 0, new, data[16000:32000]))
            out.append(frame(CONTINUATION, END_HEADERS, new, data[32000:]))
        else:  # trailers with pseudo-headers on the open stream
            out.append(frame(HEADERS, END_HEADERS | END_STREAM, sid, block([(b":path", b"/x")])))
    return out


class Outcome:
    def __init__(self) -> None:
        self.frames: list[hyperframe.frame.Frame] = []
        self.closed = False
        self.problem: str | None = None


def parse_frames(data: bytes, out: Outcome) -> None:
    view = memoryview(data)
    while len(view) >= 9:
        try:
            f, length = hyperframe.frame.Frame.parse_frame_header(view[:9])
        except hyperframe.exceptions.UnknownFrameError as exc:
            out.problem = f"the edge sent a frame of unknown type: {exc}"
            return
        if len(view) < 9 + length:
            break  # cut short by the close: that is a close
        if length > 16384:
            out.problem = f"the edge sent a frame of {length} bytes past our max frame size"
            return
        try:
            f.parse_body(view[9 : 9 + length])
        except hyperframe.exceptions.HyperframeError as exc:
            out.problem = f"the edge sent a malformed {type(f).__name__}: {exc}"
            return
        out.frames.append(f)
        if isinstance(f, hyperframe.frame.GoAwayFrame):
            try:
                h2.errors.ErrorCodes(f.error_code)
            except ValueError:
                out.problem = f"GOAWAY with an unknown error code {f.error_code}"
        view = view[9 + length :]


async def run_case(
    port: int, ca: trustme.CA, host: bytes, prefix: bytes, frames: list[bytes]
) -> Outcome:
    out = Outcome()
    context = client_context(ca, ["h2"])
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname=host.decode().rpartition(":")[0]
            ),
            10,
        )
    except (ConnectionError, ssl.SSLError):
        # The TLS handshake counts against head_timeout (3 s here): on a loaded machine the
        # edge may cut it. That is the edge closing, within its timeout.
        out.closed = True
        return out
    received = bytearray()

    async def send() -> None:
        writer.write(prefix)
        for f in frames:
            writer.write(f)
            await writer.drain()

    out.closed = await converse(reader, writer, send, DEADLINE, received)
    parse_frames(bytes(received), out)
    return out


def client_prefix(rng: random.Random, host: bytes) -> tuple[bytes, int]:
    """A valid connection start, maybe with a request (returns the bytes and its stream id)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sid = 0
    choice = rng.randrange(4)
    if choice == 1:
        sid = 1
        conn.send_headers(1, request_headers(host, b"/headers"), end_stream=True)
    elif choice == 2:  # a POST whose body is still coming
        sid = 1
        conn.send_headers(1, request_headers(host, b"/upload", b"POST"))
        conn.send_data(1, b"part of a body")
    elif choice == 3:
        sid = 1
        conn.send_headers(1, request_headers(host, b"/echo", b"POST"))
    return conn.data_to_send(), sid


async def fresh_connection_works(stack: Stack, ca: trustme.CA, host: bytes) -> None:
    assert stack.edge is not None
    context = client_context(ca, ["h2"])
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            "127.0.0.1",
            stack.edge.public_port,
            ssl=context,
            server_hostname=host.decode().rpartition(":")[0],
        ),
        10,
    )
    try:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(1, request_headers(host), end_stream=True)
        writer.write(conn.data_to_send())
        status, body = b"", bytearray()
        async with asyncio.timeout(10):
            while True:
                data = await reader.read(65536)
                assert data, "the edge closed the fresh connection"
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        status = dict(event.headers)[b":status"]
                    elif isinstance(event, h2.events.DataReceived):
                        body += event.data
                    elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                        assert isinstance(event, h2.events.StreamEnded), event
                        assert (status, bytes(body)) == (b"200", b"hello from origin")
                        return
                writer.write(conn.data_to_send())
    finally:
        writer.close()


async def test_hostile_frames_end_in_goaway_or_close_and_h2_still_works(
    stack: Stack, ca: trustme.CA
) -> None:
    assert stack.edge is not None
    origins: dict[str, RecordingOrigin] = {}
    urls: dict[str, str] = {}
    for sandbox in ("sb1", "sb2"):
        origin = RecordingOrigin()
        await origin.start()
        origins[sandbox] = origin
        stack.origins.append(origin)
        await stack.agent(sandbox)
        urls[sandbox] = (await stack.expose(sandbox, origin.port, token=TOKEN))["exposedAt"]
    host, other = host_of(urls["sb1"]).encode(), host_of(urls["sb2"]).encode()

    rng = random.Random(SEED)
    cases = []
    for i in range(CASES):
        prefix, sid = client_prefix(rng, host)
        cases.append((f"case{i}", prefix, fuzz_frames(rng, host, other, sid)))
    limit = asyncio.Semaphore(PARALLEL)

    async def one(name: str, prefix: bytes, frames: list[bytes]) -> tuple[str, Outcome]:
        async with limit:
            return name, await run_case(stack.edge.public_port, ca, host, prefix, frames)  # type: ignore[union-attr]

    results = await asyncio.gather(*(one(*c) for c in cases))
    problems = []
    for name, outcome in results:
        if not outcome.closed:
            problems.append(f"{name}: the edge kept the connection past {DEADLINE} s")
        if outcome.problem:
            problems.append(f"{name}: {outcome.problem}")
    for sandbox, origin in origins.items():
        for received in through_the_edge(origin.received):
            problems += [
                f"origin of {sandbox} got {received.target[:60]!r}: {p}"
                for p in forwarding_problems(received, origin.port, sandbox)
            ]
    assert not problems, "\n".join(problems[:40])
    goaways = [
        f for _, o in results for f in o.frames if isinstance(f, hyperframe.frame.GoAwayFrame)
    ]
    codes = {h2.errors.ErrorCodes(f.error_code).name for f in goaways}
    assert "PROTOCOL_ERROR" in codes, codes  # the fuzz did reach the edge's error handling
    assert origins["sb1"].received, "no fuzz case reached the origin"
    await fresh_connection_works(stack, ca, host)
