"""Fuzzing the live admin API port: seeded mutated requests to its real endpoints.

Each case starts from a valid request to a real endpoint of an in-process edge with a real agent
and origin (health probes, metrics, sandboxes, expose / list / unexpose, wait, inspection,
recorded requests, WebSocket and raw TCP connect), with the admin token or without it, and
mutates it with a seeded ``random.Random``: bytes of the head flipped, inserted or deleted, CRLFs
duplicated or dropped, hostile ``Content-Length``, odd path segments and query strings, and JSON
bodies whose fields get every JSON type, huge numbers, long strings and deep nesting. For every
case:

* the admin API answers with well-formed HTTP/1.1 (h11 as the client) or closes, within its
  documented timeouts (10 s per request), never hangs;
* every error is a JSON body ``{"error", "code"}`` whose status and code are in the errors
  table of docs/admin-api.md, and never 500 ``INTERNAL_ERROR`` (nor a traceback: the autouse
  ``no_unhandled_errors``);
* a request without the token gets nothing but 401 (or the answers to malformed HTTP, or the
  health probes) and changes nothing;
* afterwards the API still answers a normal request.
"""

from __future__ import annotations

import asyncio
import random

import orjson
import pytest

from tests.faults.conftest import Stack

from .fuzz_live import Exchange, documented_admin_codes, exchange

pytestmark = pytest.mark.anyio

SEED = 20261205
CASES = 360
PARALLEL = 24
DEADLINE = 20.0  # the admin API's request timeout is 10 s, its linger after an error 2 s or so
UNAUTHENTICATED_OK = {400, 401, 404, 405, 408, 413, 429, 431}  # 404, 405: only the probes


def seeds(token: str, port: int) -> list[tuple[bytes, bool]]:
    """(request, body may be mutated) for the real endpoints, with the token."""
    auth = b"Authorization: Bearer " + token.encode() + b"\r\n"
    h = b"Host: 127.0.0.1\r\n"

    def req(method: bytes, path: bytes, body: bytes | None = None, extra: bytes = b"") -> bytes:
        head = method + b" " + path + b" HTTP/1.1\r\n" + h + auth + extra
        if body is None:
            return head + b"\r\n"
        return (
            head
            + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )

    expose = orjson.dumps(
        {"port": 9001, "name": "api", "token": "tok9001", "protocol": "http", "inspect": True}
    )
    wait = orjson.dumps({"timeout": 1, "path": "/", "mode": "http", "statusMin": 200})
    ws = (
        b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    )
    p = b"%d" % port
    return [
        (req(b"GET", b"/healthz"), True),
        (req(b"GET", b"/readyz"), True),
        (req(b"GET", b"/metrics"), True),
        (req(b"GET", b"/v1/sandboxes"), True),
        (req(b"GET", b"/v1/sandboxes/sb1"), True),
        (req(b"GET", b"/v1/sandboxes/sb1/ports"), True),
        (req(b"POST", b"/v1/sandboxes/sb1/ports", expose), True),
        (req(b"DELETE", b"/v1/sandboxes/sb1/ports/9002"), True),
        (req(b"POST", b"/v1/sandboxes/sb1/ports/" + p + b"/wait", wait), False),
        (req(b"PUT", b"/v1/sandboxes/sb1/inspect"), True),
        (req(b"GET", b"/v1/sandboxes/sb1/inspect"), True),
        (req(b"GET", b"/v1/sandboxes/sb1/requests?since=0"), True),
        (req(b"GET", b"/v1/sandboxes/sb1/requests/1"), True),
        (req(b"GET", b"/v1/sandboxes/sb1/ports/" + p + b"/ws?path=/", extra=ws), True),
        (
            req(
                b"GET",
                b"/v1/sandboxes/sb1/ports/" + p + b"/tcp",
                extra=b"Upgrade: tcp\r\nConnection: Upgrade\r\n",
            ),
            True,
        ),
        (req(b"GET", b"/v1/sandboxes") + req(b"GET", b"/v1/sandboxes/sb1/ports"), True),
    ]


JSON_VALUES: list[object] = [
    None,
    True,
    False,
    0,
    -1,
    1023,
    3000,
    65536,
    2**63 - 1,
    1.5,
    1e308,
    "",
    "x" * 300,
    "\u0000",
    "\ud7ff\ue000",
    "Bad_ID",
    [],
    {},
    [[[[[]]]]],
    {"port": {"port": 1}},
    "8000",
]


def mutate_json(rng: random.Random, body: bytes) -> bytes:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    choice = rng.randrange(6)
    if choice == 0 and payload:
        payload[rng.choice(sorted(payload))] = rng.choice(JSON_VALUES)
        return orjson.dumps(payload)
    if choice == 1:
        payload[rng.choice(["foo", "port", "proxyProtocol", "inspect", "interval"])] = rng.choice(
            JSON_VALUES
        )
        return orjson.dumps(payload)
    if choice == 2:
        return b"[" * rng.choice([100, 2000, 20000]) + b"]" * rng.choice([0, 100])
    if choice == 3:
        return rng.choice(
            [
                b"",
                b"null",
                b"1",
                b'"x"',
                b"{",
                b'{"port": NaN}',
                b'{"port": 1e999}',
                b'{"port": 99999999999999999999999}',
                b'{"port": 8000, "port": 9000}',
                b'{"port": "\\ud800"}',
                b"\xff\xfe",
                b'{"port": 9003}' + b" " * 70000,
            ]
        )
    if choice == 4 and payload:
        payload.pop(rng.choice(sorted(payload)))
        return orjson.dumps(payload)
    return orjson.dumps({"port": rng.choice(JSON_VALUES), "name": rng.choice(JSON_VALUES)})


def with_body(request: bytes, body: bytes) -> bytes:
    head = request.split(b"\r\n\r\n", 1)[0]
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"content-length")]
    return b"\r\n".join(lines) + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body


PATHS = [
    b"/v1/sandboxes/SB1/ports",
    b"/v1/sandboxes/%ff/ports",
    b"/v1/sandboxes/sb1%00/ports",
    b"/v1/sandboxes/" + b"a" * 70,
    b"/v1/sandboxes/-sb1-",
    b"/v1/sandboxes/admin/ports",
    b"/v1/sandboxes/sb1/ports/0",
    b"/v1/sandboxes/sb1/ports/65536",
    b"/v1/sandboxes/sb1/ports/1e3",
    b"/v1/sandboxes/sb1/ports/%EF%BC%98%EF%BC%90%EF%BC%90%EF%BC%90",
    b"/v1/sandboxes/sb1/ports/-1",
    b"/v1/sandboxes/sb1/ports/9999999999999",
    b"/v1/sandboxes/sb1/ports/8000/nothing",
    b"/v1/sandboxes/sb1/ports/8000/ws?path=relative",
    b"/v1/sandboxes/sb1/ports/8000/ws?path=%00",
    b"/v1/sandboxes/sb1/requests?since=-1",
    b"/v1/sandboxes/sb1/requests?since=abc",
    b"/v1/sandboxes/sb1/requests?since=99999999999999999999",
    b"/v1/sandboxes/sb1/requests/abc",
    b"/v1/sandboxes/sb1/requests/-5",
    b"/v1/sandboxes/sb1/requests?follow=0&since=1&since=2",
    b"/v1/sandboxes/sb1/inspect/extra",
    b"/v1//sandboxes///sb1",
    b"/../../etc/passwd",
    b"/v1/sandboxes/sb1/ports/%2e%2e",
    b"*",
    b"http://127.0.0.1/v1/sandboxes",
    b"/metrics?x=%",
    b"/v1/sandboxes/sb1/ports/\xff",
    b"/v1/sandboxes/sb1/ports/8000/wait?x",
]


def mutate(rng: random.Random, data: bytes, body_ok: bool) -> bytes:
    head_end = data.find(b"\r\n\r\n")
    kind = rng.randrange(12)
    n = head_end if not body_ok and head_end > 0 else len(data)
    if kind == 0:
        i = rng.randrange(n)
        return data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1 :]
    if kind == 1:
        i = rng.randrange(n + 1)
        b = rng.choice([b"\x00", b"\x80", b"\xff", b" ", b"\t", b":", b"\r", b"\n", b"%", b"/"])
        return data[:i] + b + data[i:]
    if kind == 2:
        i = rng.randrange(n)
        return data[:i] + data[i + rng.randint(1, 4) :]
    if kind == 3:
        spots = [i for i in range(n - 1) if data[i : i + 2] == b"\r\n"]
        i = rng.choice(spots)
        return data[:i] + rng.choice([b"\r\n\r\n", b"", b"\n", b"\r\n "]) + data[i + 2 :]
    if kind == 4 and body_ok and head_end > 0 and data.startswith(b"POST"):
        return with_body(data, mutate_json(rng, data[head_end + 4 :]))
    if kind == 5:  # the request line
        first = data.find(b"\r\n")
        method, _, rest = data[:first].partition(b" ")
        method = rng.choice(
            [method, b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS", b"G\x00T"]
        )
        target = rng.choice([*PATHS, rest.rpartition(b" ")[0]])
        version = rng.choice([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 x"])
        return method + b" " + target + b" " + version + data[first:]
    if kind == 6:  # hostile Content-Length / Transfer-Encoding
        line = rng.choice(
            [
                b"Content-Length: 99999999999999999999\r\n",
                b"Content-Length: -1\r\n",
                b"Content-Length: 70000\r\n",
                b"Content-Length: 1, 2\r\n",
                b"Content-Length: 0x10\r\n",
                b"Transfer-Encoding: chunked\r\n",
                b"Transfer-Encoding: gzip\r\n",
                b"Expect: 100-continue\r\n",
                b"Connection: close\r\n",
            ]
        )
        i = data.find(b"\r\n") + 2
        return data[:i] + line + data[i:]
    if kind == 7:  # the token: another, two, a malformed one
        line = rng.choice(
            [
                b"Authorization: Bearer wrong\r\n",
                b"Authorization: Basic eDp5\r\n",
                b"Authorization: Bearer\r\n",
                b"Authorization: Bearer \xff\r\n",
                b"Authorization:\r\n",
            ]
        )
        i = data.find(b"\r\n") + 2
        return data[:i] + line + data[i:]
    if kind == 8:  # a huge head
        i = data.find(b"\r\n") + 2
        return data[:i] + b"X-Big: " + b"b" * rng.choice([10000, 17000]) + b"\r\n" + data[i:]
    if kind == 9:
        return data[: rng.randrange(len(data))]
    if kind == 10:  # the chunked body of a JSON request
        if head_end > 0 and data.startswith(b"POST"):
            head = data[:head_end].replace(b"Content-Length", b"X-Was-Length")
            body = data[head_end + 4 :]
            chunks = rng.choice(
                [
                    b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n",
                    b"zz\r\n\r\n",
                    b"fffffffffffffffffff\r\n",
                    b"5\r\n{}\r\n",
                ]
            )
            return head + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
        return data
    # pipelined garbage after the request
    return data + rng.choice([b"\x00\xff" * 10, b"GET /metrics HTTP/1.1\r\n\r\n", b"\r\n"])


def case_list(token: str, port: int) -> list[tuple[str, bytes, bool, bool, float]]:
    """(name, request, authorized, half-close, pace) from the fixed seed."""
    rng = random.Random(SEED)
    base = seeds(token, port)
    out = []
    for i in range(CASES):
        which = rng.randrange(len(base))
        data, body_ok = base[which]
        authorized = rng.random() < 0.75
        if not authorized:
            data = data.replace(b"Authorization: Bearer " + token.encode() + b"\r\n", b"")
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            data = mutate(rng, data, body_ok)
        out.append((f"case{i}-seed{which}", data, authorized, rng.random() < 0.85, 0.0))
    return out


def problems_of(
    name: str, request: bytes, authorized: bool, result: Exchange, codes: dict[int, set[str]]
) -> list[str]:
    problems = []
    if result.hung:
        problems.append(f"{name}: no answer nor close within {DEADLINE} s: {request[:300]!r}")
    if result.problem:
        problems.append(f"{name}: {result.problem} for {request[:200]!r}")
    probe = request.startswith((b"GET /healthz ", b"GET /readyz "))
    for status, _headers, body in result.responses:
        if not authorized and not probe and status not in UNAUTHENTICATED_OK:
            problems.append(f"{name}: {status} without the token for {request[:200]!r}")
        if status < 400 or (request.startswith(b"HEAD ") and body == b""):
            continue  # (the answer to a HEAD has no body)
        try:
            page = orjson.loads(body)
        except orjson.JSONDecodeError:
            problems.append(f"{name}: {status} not JSON: {body[:200]!r}")
            continue
        code = page.get("code") if isinstance(page, dict) else None
        message = page.get("error") if isinstance(page, dict) else None
        agent_refusal = status == 502 and str(message).startswith("The agent refused")
        if code not in codes.get(status, set()) and not agent_refusal:
            problems.append(f"{name}: undocumented {status} {code}: {body[:200]!r}")
        if status == 500:
            problems.append(f"{name}: 500 for {request[:300]!r}")
    return problems


async def test_mutated_admin_requests_get_documented_json_errors(stack: Stack) -> None:
    assert stack.edge is not None and stack.admin is not None
    origin = await stack.origin()
    await stack.agent("sb1")
    await stack.expose("sb1", origin.port)
    codes = documented_admin_codes()
    port = stack.edge.admin_port
    limit = asyncio.Semaphore(PARALLEL)

    async def one(name: str, data: bytes, authorized: bool, half: bool, pace: float) -> list[str]:
        async with limit:
            result = await exchange(
                port,
                [data],
                half_close=half,
                pace=pace,
                deadline=DEADLINE,
                upgrades=True,
                head=data.startswith(b"HEAD "),
                answered_is_enough=not half,  # else the keep-alive idle timeout is 60 s
            )
        return problems_of(name, data, authorized, result, codes)

    results = await asyncio.gather(
        *(one(*case) for case in case_list(stack.admin_token, origin.port))
    )
    problems = [p for case in results for p in case]
    assert not problems, "\n".join(problems[:30])
    # nothing sent without the token changed anything; the API still answers
    response = await stack.admin.get("/v1/sandboxes/sb1/ports")
    assert response.status_code == 200
    assert {p["port"] for p in response.json()["ports"]} <= {origin.port, 9001}
    assert (await stack.admin.get("/healthz")).json() == {"status": "ok"}
