"""Fuzzing the live public HTTP/1.1 listener: seeded hostile requests over real sockets.

``tests/protocol/test_fuzz.py`` fuzzes the sans-IO tunnel protocol and ``tests/test_httphead.py``
the head parsers; this throws mutated requests at a real in-process edge with a real agent and a
real origin (``fuzz_live.RecordingOrigin``). Each case starts from a valid request to a real
preview URL (GET, POST with ``Content-Length``, chunked POSTs, a WebSocket upgrade, pipelined
pairs, each with spoofed internal headers), mutated by a ``random.Random`` with a fixed seed, and
is sent whole or slowly, half-closed or left open. For every case:

* the edge closes the connection within its configured timeouts (``head_timeout``,
  ``keepalive_timeout``, the ``idle_timeout`` sweep; short here), never hangs;
* everything it sends is well-formed HTTP/1.1 responses (h11 as the client), each the origin's
  200/404 or a documented JSON error page (docs/admin-api.md, "Preview-URL error pages", and the
  429s of docs/operations.md). A page is never cut short. The origin's responses are relayed raw,
  so one may end early with a FIN: when the origin closes mid-response (its request was cut),
  and when the edge's keep-alive timer or idle sweep closes a connection whose response went
  silent (``close_gracefully``: a FIN, not the RST of a reset stream; e.g. ``/echo`` waiting for
  the rest of a chunked body);
* every request that reached the origin has exactly the edge's ``Host``, ``X-Forwarded-For``
  and ``X-Sandbox-Name``, and no client-sent internal header or header with ``_``: nothing was
  smuggled past the edge's framing;
* no traceback is logged (the autouse ``no_unhandled_errors``), and after the run a normal
  request on the same edge still gets 200 with the right body.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from tests.faults.conftest import Stack

from .fuzz_live import (
    Exchange,
    RecordingOrigin,
    documented_preview_codes,
    exchange,
    forwarding_problems,
    page_problem,
    through_the_edge,
)

pytestmark = pytest.mark.anyio

SEED = 20261203
CASES = 320
PARALLEL = 48
# Short timeouts, so that a case the edge has to time out ends soon; the deadline of a case is
# far past the longest of them (the idle sweep closes between 1x and 1.5x idle_timeout).
TIMEOUTS = {"head_timeout": 1.0, "keepalive_timeout": 1.0, "idle_timeout": 2.0}
DEADLINE = 15.0

SPOOFED = (
    b"X-Forwarded-For: 6.6.6.6 spoof\r\n"
    b"X-Sandbox-Name: spoof\r\n"
    b"X-Tunnel-Stream: spoof\r\n"
    b"Forwarded: for=spoof\r\n"
    b"X-Real-IP: spoof\r\n"
    b"X_Forwarded_For: spoof\r\n"
    b"X-Forwarded-Host: spoof.example\r\n"
    b"x-FORWARDED-proto: spoof\r\n"
)


def seeds(host: bytes) -> list[bytes]:
    """Valid requests to the preview URL ``host``."""
    h = b"Host: " + host + b"\r\n"
    get = b"GET / HTTP/1.1\r\n" + h + SPOOFED + b"\r\n"
    headers = b"GET /headers HTTP/1.1\r\n" + h + b"Accept: */*\r\n" + SPOOFED + b"\r\n"
    post = b"POST /upload HTTP/1.1\r\n" + h + SPOOFED + b"Content-Length: 11\r\n\r\nhello world"
    chunked = (
        b"POST /upload HTTP/1.1\r\n" + h + SPOOFED + b"Transfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n"
    )
    echo = (
        b"POST /echo HTTP/1.1\r\n" + h + SPOOFED + b"Transfer-Encoding: chunked\r\n\r\n"
        b"4\r\necho\r\n0\r\n\r\n"
    )
    upgrade = (
        b"GET /ws HTTP/1.1\r\n" + h + SPOOFED + b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    return [get, headers, post, chunked, echo, upgrade, get + headers, post + get, chunked + post]


def _replace_value(data: bytes, name: bytes, value: bytes) -> bytes:
    i = data.lower().find(name.lower() + b":")
    if i < 0:
        return data
    end = data.find(b"\r\n", i)
    return data[:i] + name + b": " + value + data[end:]


def _insert_header(rng: random.Random, data: bytes, line: bytes) -> bytes:
    first = data.find(b"\r\n") + 2
    ends = [i + 2 for i in range(first, data.find(b"\r\n\r\n") + 1) if data[i : i + 2] == b"\r\n"]
    at = rng.choice(ends or [first])
    return data[:at] + line + data[at:]


def mutate(rng: random.Random, data: bytes, host: bytes, other_hosts: list[bytes]) -> bytes:
    """One mutation of ``data``."""
    kind = rng.randrange(18)
    n = len(data)
    if kind == 0:  # flip bits of a byte
        i = rng.randrange(n)
        return data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1 :]
    if kind == 1:  # insert an interesting byte
        i = rng.randrange(n + 1)
        b = rng.choice([b"\x00", b"\x80", b"\xff", b" ", b"\t", b":", b"\r", b"\n", b";", b"_"])
        return data[:i] + b + data[i:]
    if kind == 2:  # delete a few bytes
        i = rng.randrange(n)
        return data[:i] + data[i + rng.randint(1, 4) :]
    if kind in (3, 4):  # duplicate or drop a CRLF
        spots = [i for i in range(n - 1) if data[i : i + 2] == b"\r\n"]
        i = rng.choice(spots)
        return data[:i] + (b"\r\n\r\n" if kind == 3 else b"") + data[i + 2 :]
    if kind == 5:  # a hostile Content-Length
        value = rng.choice(
            [
                b"99999999999999999999999",
                b"-1",
                b"0x10",
                b"+11",
                b"11, 12",
                b"1 1",
                b"",
                b"abc",
                b"11\x00",
                b"0011",
                b"4294967307",
                b"18446744073709551627",
                b"\xb9",
            ]
        )
        line = b"Content-Length: " + value + b"\r\n"
        if b"content-length:" in data.lower() and rng.random() < 0.6:
            return _replace_value(data, b"Content-Length", value)
        return _insert_header(rng, data, line)
    if kind == 6:  # a duplicate Content-Length, or CL together with TE
        line = rng.choice(
            [
                b"Content-Length: 11\r\n",
                b"Content-Length: 5\r\n",
                b"Transfer-Encoding: chunked\r\n",
                b"Content-Length: 0\r\n",
            ]
        )
        return _insert_header(rng, data, line)
    if kind == 7:  # a hostile Transfer-Encoding
        value = rng.choice(
            [
                b"chunked, chunked",
                b"gzip, chunked",
                b"chunked, identity",
                b"Chunked",
                b" chunked",
                b"xchunked",
                b"chunked\x00",
                b"identity",
                b"\x80chunked",
            ]
        )
        if b"transfer-encoding:" in data.lower():
            return _replace_value(data, b"Transfer-Encoding", value)
        return _insert_header(rng, data, b"Transfer-Encoding: " + value + b"\r\n")
    if kind == 8:  # a bad chunk size line
        i = data.find(b"\r\n\r\n") + 4
        bad = rng.choice(
            [
                b"0x5",
                b"-5",
                b"+5",
                b"5 ",
                b" 5",
                b"fffffffffffffffff",
                b"5;ext=\x00",
                b"5;\xff",
                b'5;a="b\r\n"',
                b"5\n",
                b"1_0",
                b"",
                b"ffffffffffffffff",
                b"5;" + b"e" * 5000,
                b"g",
            ]
        )
        if b"chunked" not in data[:i].lower():
            data = _insert_header(rng, data, b"Transfer-Encoding: chunked\r\n")
            i = data.find(b"\r\n\r\n") + 4
            return data[:i] + bad + b"\r\nhello\r\n0\r\n\r\n"
        end = data.find(b"\r\n", i)
        return data[:i] + bad + data[end:]
    if kind == 9:  # obs-fold: a continuation line, maybe hiding an internal header
        line = rng.choice(
            [
                b" folded\r\n",
                b"\tX-Forwarded-For: spoof\r\n",
                b" X-Sandbox-Name: spoof\r\n",
                b"\r\n X-Real-IP: spoof\r\n",
            ]
        )
        return _insert_header(rng, data, line)
    if kind == 10:  # NUL and high bytes in a header name or value
        line = rng.choice(
            [
                b"X-Fu\x00zz: 1\r\n",
                b"X-Fuzz: a\x00b\r\n",
                b"X-\xffFuzz: 1\r\n",
                b"X-Fuzz: \xff\xfe\r\n",
                b"X-Forwarded-For\x00: spoof\r\n",
                b"X-Forwarded-For : spoof\r\n",
                b"X-Forwarded-For\t: spoof\r\n",
                b"X-Forwarded-\x80For: spoof\r\n",
                b": novalue\r\n",
                b"X Forwarded For: spoof\r\n",
                b"X_Sandbox_Name: spoof\r\n",
                b"x-forwarded-for:spoof\r\n",
                b"X-Real-Ip:\tspoof\r\n",
                b"x-tunnel-:spoof\r\n",
            ]
        )
        return _insert_header(rng, data, line)
    if kind == 11:  # another Host: another sandbox, a wrong token, a second one, none
        choice = rng.randrange(4)
        if choice == 0:
            return _replace_value(data, b"Host", rng.choice(other_hosts))
        if choice == 1:
            return _insert_header(rng, data, b"Host: " + rng.choice([*other_hosts, host]) + b"\r\n")
        if choice == 2:
            return data.replace(b"Host: " + host + b"\r\n", b"", 1)
        return _replace_value(data, b"Host", host.upper() + rng.choice([b"", b".", b":", b"\x00"]))
    if kind == 12:  # the request line: version, method, target
        line_end = data.find(b"\r\n")
        line = rng.choice(
            [
                b"GET / HTTP/1.0",
                b"GET / HTTP/1.2",
                b"GET / HTTP/2.0",
                b"GET / HTTP/1.1x",
                b"CONNECT " + host + b" HTTP/1.1",
                b"GET http://evil.example/ HTTP/1.1",
                b"GET * HTTP/1.1",
                b"OPTIONS * HTTP/1.1",
                b"G\x00ET / HTTP/1.1",
                b"GET /\x00 HTTP/1.1",
                b"GET  / HTTP/1.1",
                b"GET / HTTP/1.1 ",
                b"HEAD / HTTP/1.1",
                b"GET /" + b"a" * 40000 + b" HTTP/1.1",
                b"GET /\xff HTTP/1.1",
                b"POST /echo HTTP/1.1",
                b"\r\nGET / HTTP/1.1",
            ]
        )
        return line + data[line_end:]
    if kind == 13:  # truncate
        return data[: rng.randrange(n)]
    if kind == 14:  # a huge head or many fields
        if rng.random() < 0.5:
            return _insert_header(
                rng, data, b"X-Big: " + b"b" * rng.choice([20000, 33000]) + b"\r\n"
            )
        return _insert_header(rng, data, b"".join(b"X-F%d: 1\r\n" % i for i in range(101)))
    if kind == 15:  # bare LF or bare CR line ends
        i = data.find(b"\r\n", rng.randrange(n))
        if i < 0:
            return data
        return data[:i] + rng.choice([b"\n", b"\r", b"\n\r"]) + data[i + 2 :]
    if kind == 16:  # append junk after the request (a second, smuggled request, or garbage)
        return data + rng.choice(
            [
                b"GET /headers HTTP/1.1\r\nHost: " + host + b"\r\nX-Forwarded-For: spoof\r\n\r\n",
                b"\x00\xff" * rng.randint(1, 50),
                b"0\r\n\r\n",
                b"\r\n\r\n",
                b"GET /headers HTTP/1.1\r\nHost: " + rng.choice(other_hosts) + b"\r\n\r\n",
            ]
        )
    # an upgrade where there was none, or an h2c upgrade
    return _insert_header(
        rng,
        data,
        rng.choice(
            [
                b"Connection: Upgrade\r\nUpgrade: websocket\r\n",
                b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
                b"Connection: keep-alive, close\r\n",
                b"Expect: 100-continue\r\n",
            ]
        ),
    )


def cases(host: bytes, other_hosts: list[bytes]) -> list[tuple[str, list[bytes], bool, float]]:
    """(name, pieces, half-close, pace) for every case, from the fixed seed."""
    rng = random.Random(SEED)
    base = seeds(host)
    out: list[tuple[str, list[bytes], bool, float]] = []
    # truncation at every point of the GET and of the chunked POST, half-closed (every 7th left
    # open, so the head timeout or the idle sweep must end it)
    for which in (0, 3):
        data = base[which]
        for cut in range(len(data)):
            out.append((f"seed{which}-cut{cut}", [data[:cut]], cut % 7 != 0, 0.0))
    for i in range(CASES):
        which = rng.randrange(len(base))
        data = base[which]
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            data = mutate(rng, data, host, other_hosts)
        pieces = [data]
        pace = 0.0
        if rng.random() < 0.15:  # slow: in small pieces, paced
            size = rng.randint(1, 64)
            pieces = [data[j : j + size] for j in range(0, len(data), size)][:40] or [b""]
            if len(data) > 40 * size:
                pieces.append(data[40 * size :])
            pace = 0.01
        out.append((f"case{i}-seed{which}", pieces, rng.random() < 0.8, pace))
    return out


async def run_case(
    port: int, name: str, pieces: list[bytes], half_close: bool, pace: float
) -> tuple[str, Exchange]:
    result = await exchange(port, pieces, half_close=half_close, pace=pace, deadline=DEADLINE)
    return name, result


def answer_problems(name: str, result: Exchange, codes: dict[int, set[str]]) -> list[str]:
    problems: list[str] = []
    if result.hung:
        problems.append(f"{name}: the edge kept the connection past {DEADLINE} s")
    if result.problem:
        problems.append(f"{name}: {result.problem}")
    for status, headers, body in result.responses:
        if status == 200 or (status == 404 and body == b"not found"):
            continue  # the origin's own answers
        problem = page_problem(status, headers, body, codes)
        if problem:
            problems.append(f"{name}: {problem}")
    return problems


async def fuzz(
    stack: Stack, origins: dict[str, RecordingOrigin], host: bytes, others: list[bytes]
) -> None:
    assert stack.edge is not None
    codes = documented_preview_codes()
    limit = asyncio.Semaphore(PARALLEL)

    async def one(case: tuple[str, list[bytes], bool, float]) -> tuple[str, Exchange]:
        async with limit:
            return await run_case(stack.edge.public_port, *case)  # type: ignore[union-attr]

    results = await asyncio.gather(*(one(c) for c in cases(host, others)))
    problems = [p for name, result in results for p in answer_problems(name, result, codes)]
    for sandbox, origin in origins.items():
        for received in through_the_edge(origin.received):
            problems += [
                f"origin of {sandbox} got {received.method!r} {received.target[:60]!r}: {p}"
                for p in forwarding_problems(received, origin.port, sandbox)
            ]
    assert not problems, "\n".join(problems[:40])
    # the fuzz reached the origin, and answered 400s: it was not all refused at the door
    statuses = {status for _, r in results for status, _, _ in r.responses}
    assert {200, 400} <= statuses, statuses
    assert len(origins["sb1"].received) > 50, len(origins["sb1"].received)


async def setup(
    stack: Stack, *, inspect: bool = False
) -> tuple[dict[str, RecordingOrigin], bytes, list[bytes]]:
    origins: dict[str, RecordingOrigin] = {}
    for sandbox in ("sb1", "sb2"):
        origin = RecordingOrigin()
        await origin.start()
        origins[sandbox] = origin
        stack.origins.append(origin)
        await stack.agent(sandbox)
    url = (await stack.expose("sb1", origins["sb1"].port, inspect=inspect))["exposedAt"]
    other = (await stack.expose("sb2", origins["sb2"].port))["exposedAt"]
    host = stack.host_of(url).encode()
    other_host = stack.host_of(other).encode()
    label, _, rest = host.partition(b".")
    wrong_token = label[:-1] + (b"a" if label[-1:] != b"a" else b"b") + b"." + rest
    unexposed = b"9999" + label[label.find(b"-") :] + b"." + rest
    return origins, host, [other_host, wrong_token, unexposed, b"127.0.0.1", b"evil.example"]


async def normal_request_works(stack: Stack, host: bytes) -> None:
    async with stack.client("http://" + host.decode() + "/") as client:
        response = await client.get("/")
        assert response.status_code == 200
        assert response.content == b"hello from origin"


@pytest.mark.parametrize(
    ("parser", "logged"),
    [("httptools", False), ("h11", False), ("httptools", True)],
    ids=["httptools", "h11", "httptools-access-log-inspect"],
)
async def test_mutated_requests_get_documented_answers_and_nothing_spoofed(
    parser: str, logged: bool
) -> None:
    """``logged``: with the access log and request inspection on, responses go through the
    edge's response framer (tunneld/accesslog.py) and the inspection recorder instead of raw."""
    stack = await Stack(parser=parser, access_log=logged, **TIMEOUTS).start()
    try:
        origins, host, others = await setup(stack, inspect=logged)
        await fuzz(stack, origins, host, others)
        await normal_request_works(stack, host)
    finally:
        await stack.close()
