"""The access log (``access_log = true``): one record per completed request with its status,
sizes, timings and request id; X-Request-Id kept or made, passed to the service and echoed; and
the service's bytes otherwise untouched (tunneld/accesslog.py, tunneld/responses.py)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import AsyncIterator

import pytest

from tests.speedups_impl import implementation  # noqa: F401  (the fixture)

from .conftest import Stack, raw_request, wait_until
from .origin import pattern_sha256

# With the C extension's functions and with their pure-Python references (tests/speedups_impl.py).
pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("implementation")]


@pytest.fixture
async def logged() -> AsyncIterator[Stack]:
    """An edge whose access lines (JSON) go to a StringIO instead of stderr."""
    stack = await Stack(access_log=True, log_format="json").start()
    stack.edge.access_writer.stream = io.StringIO()
    try:
        yield stack
    finally:
        await stack.close()


_ENVELOPE = ("time", "level", "logger", "message")


def records(stack: Stack) -> list[dict]:
    """The access fields of every line the edge's access writer wrote so far."""
    stream = stack.edge.access_writer.stream
    assert isinstance(stream, io.StringIO)
    rows = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert all(row["logger"] == "tunneld.access" and row["level"] == "info" for row in rows)
    return [{k: v for k, v in row.items() if k not in _ENVELOPE} for row in rows]


async def _url(stack: Stack) -> str:
    origin = await stack.origin()
    await stack.agent("sb1")
    return (await stack.expose("sb1", origin.port))["exposedAt"]


async def test_one_record_per_request_with_sizes_and_the_request_id(
    logged: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "tunneld.access")
    url = await _url(logged)
    async with logged.client(url) as client:
        r = await client.get("/headers", headers={"x-request-id": "client-id.1"})
        sent = dict(r.json())
        assert sent["x-request-id"] == "client-id.1"  # kept, passed on
        assert r.headers["x-request-id"] == "client-id.1"  # and echoed
        r = await client.get("/headers", headers={"x-request-id": "bad id"})
        made = dict(r.json())["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", made) and r.headers["x-request-id"] == made
        r = await client.get("/bytes", params={"n": 500_000, "seed": 3})
        assert hashlib.sha256(r.content).hexdigest() == pattern_sha256(500_000, 3)
        r = await client.get("/chunked", params={"n": 70_000})
        assert len(r.content) == 70_000
        body = b"x" * 123_456
        assert (await client.post("/upload", content=body)).json()["length"] == len(body)
        r = await client.head("/bytes", params={"n": 10})
        assert r.status_code == 200
        r = await client.get("/")
    await wait_until(lambda: len(records(logged)) == 7, 5, "seven access records")
    rows = records(logged)
    assert [(x["method"], x["status"]) for x in rows] == [
        ("GET", 200), ("GET", 200), ("GET", 200), ("GET", 200), ("POST", 200), ("HEAD", 200),
        ("GET", 200),
    ]  # fmt: skip
    assert rows[0]["request_id"] == "client-id.1" and rows[1]["request_id"] == made
    assert rows[2]["bytes_out"] == 500_000 and rows[2]["path"].startswith("/bytes?n=500000")
    assert rows[3]["bytes_out"] >= 70_000  # chunk framing counted
    assert rows[4]["bytes_in"] == len(body)
    assert rows[5]["bytes_out"] == 0  # HEAD: no body
    for row in rows:
        assert row["sandbox"] == "sb1" and row["client"] == "127.0.0.1"
        assert 0 <= row["ttfb_ms"] <= row["duration_ms"]


async def test_edge_answers_and_unanswered_requests_are_logged_too(
    logged: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "tunneld.access")
    origin = await logged.origin()
    await logged.agent("sb1")
    host = logged.host_of((await logged.expose("sb1", origin.port))["exposedAt"]).encode()
    await origin.close()  # nothing listens now: the edge answers 502 itself
    request = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
    answer = await raw_request(logged.edge.public_port, request)
    assert answer.startswith(b"HTTP/1.1 502 ")
    await wait_until(lambda: records(logged), 5, "the record")
    (row,) = records(logged)
    assert row["status"] == 502 and row["note"] == "edge: UPSTREAM_CONNECT_FAILED"


async def test_a_websocket_upgrade_is_logged_and_then_relayed_untouched(
    logged: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    import websockets

    caplog.set_level(logging.INFO, "tunneld.access")

    async def echo(ws) -> None:
        async for message in ws:
            await ws.send(message)

    server = await websockets.serve(echo, "127.0.0.1", 0)
    try:
        await logged.agent("sb1")
        exposed = await logged.expose("sb1", server.sockets[0].getsockname()[1])
        async with websockets.connect(
            f"ws://{logged.host_of(exposed['exposedAt'])}/",
            host="127.0.0.1",
            port=logged.edge.public_port,
        ) as ws:
            for i in range(5):
                await ws.send(b"\x00\r\n\r\nHTTP/1.1 200 OK\r\n" * i)
                assert await ws.recv() == b"\x00\r\n\r\nHTTP/1.1 200 OK\r\n" * i
    finally:
        server.close()
        await server.wait_closed()
    await wait_until(lambda: records(logged), 5, "the record")
    assert records(logged)[0]["status"] == 101


async def test_without_the_access_log_nothing_is_added(stack: Stack) -> None:
    url = await _url(stack)
    async with stack.client(url) as client:
        r = await client.get("/headers", headers={"x-request-id": "bad id"})
    assert "x-request-id" not in r.headers
    assert dict(r.json())["x-request-id"] == "bad id"  # passed through as before


async def test_no_line_when_the_access_logger_is_above_info(
    logged: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """``log_level = warning`` silences access lines, as it did through ``logging``; the
    request id is still made and echoed (the connection follows its responses)."""
    caplog.set_level(logging.WARNING, "tunneld.access")
    url = await _url(logged)
    async with logged.client(url) as client:
        response = await client.get("/")
    assert response.status_code == 200 and len(response.headers["x-request-id"]) == 32
    logged.edge.access_writer.flush()
    assert records(logged) == []


async def test_a_text_line_carries_every_field(caplog: pytest.LogCaptureFixture) -> None:
    """The default (text) format: the fields in the message, as operations.md shows it."""
    caplog.set_level(logging.INFO, "tunneld.access")
    stack = await Stack(access_log=True).start()
    stack.edge.access_writer.stream = io.StringIO()
    try:
        url = await _url(stack)
        async with stack.client(url) as client:
            response = await client.get("/?q=1")
        stack.edge.access_writer.flush()
        (line,) = stack.edge.access_writer.stream.getvalue().splitlines()
    finally:
        await stack.close()
    rid = response.headers["x-request-id"]
    pattern = (
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO    tunneld\.access: "
        r'127\.0\.0\.1 "GET /\?q=1" 200 0 (\d+)B [\d.]+ms ttfb [\d.]+ms '
        rf"sb1:\d+ id={rid}$"
    )
    match = re.fullmatch(pattern, line)
    assert match is not None, line
    assert int(match.group(1)) == len(response.content)


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    assert match is not None, name
    return float(match.group(1))


async def test_request_metrics_count_what_the_access_log_saw(
    logged: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """Duration/TTFB histograms, status classes and body bytes in /metrics: the same requests
    and sizes as the access records, and no per-sandbox or per-path label."""
    caplog.set_level(logging.INFO, "tunneld.access")
    url = await _url(logged)
    async with logged.client(url) as client:
        for _ in range(3):
            assert (await client.get("/bytes?n=1000&seed=1")).status_code == 200
        assert (await client.post("/upload", content=b"x" * 700)).status_code == 200
        assert (await client.get("/no-such-page")).status_code == 404
    await wait_until(lambda: len(records(logged)) == 5, 5, "five access records")
    rows = records(logged)
    text = (await logged.admin.get("/metrics")).text
    assert _metric(text, "tunneld_http_request_duration_seconds_count") == 5
    assert _metric(text, "tunneld_http_ttfb_seconds_count") == 5
    assert _metric(text, 'tunneld_http_request_duration_seconds_bucket{le="+Inf"}') == 5
    total = sum(r["duration_ms"] for r in rows) / 1000
    assert _metric(text, "tunneld_http_request_duration_seconds_sum") == pytest.approx(total, 0.05)
    assert _metric(text, 'tunneld_http_requests_total{status="2xx"}') == 4
    assert _metric(text, 'tunneld_http_requests_total{status="4xx"}') == 1
    assert _metric(text, "tunneld_http_request_body_bytes_total") == 700
    assert _metric(text, "tunneld_http_response_body_bytes_total") == sum(
        r["bytes_out"] for r in rows
    )
    assert "sb1" not in "".join(ln for ln in text.splitlines() if ln.startswith("tunneld_http_"))


async def test_without_followed_responses_the_request_metrics_stay_zero(stack: Stack) -> None:
    url = await _url(stack)
    async with stack.client(url) as client:
        assert (await client.get("/")).status_code == 200
    text = (await stack.admin.get("/metrics")).text
    assert _metric(text, "tunneld_http_request_duration_seconds_count") == 0
    assert _metric(text, 'tunneld_http_requests_total{status="2xx"}') == 0


async def test_a_stop_writes_every_pending_line_the_cut_requests_included(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Lines leave in batches (a timer), so a stop must write what is pending, and the lines of
    the requests the stop itself cuts short, which are made as their connections end during the
    stop. The timer is pushed out of reach here: only the stop can have written them."""
    import asyncio

    from tunneld import accesslog

    caplog.set_level(logging.INFO, "tunneld.access")
    monkeypatch.setattr(accesslog, "FLUSH_AFTER", 3600.0)
    stack = await Stack(access_log=True, log_format="json").start()
    stream = io.StringIO()
    stack.edge.access_writer.stream = stream
    try:
        url = await _url(stack)
        async with stack.client(url) as client:
            assert (await client.get("/")).status_code == 200
            host = url.split("//", 1)[1].split("/", 1)[0]
            reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
            writer.write(f"GET /sse HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert (await asyncio.wait_for(reader.readuntil(b"data: first"), 10)).startswith(
                b"HTTP/1.1 200"
            )
            assert stream.getvalue() == ""  # both lines pending (no timer will write them)
            edge, stack.edge = stack.edge, None
            await edge.stop(grace=0.2)
            writer.close()
    finally:
        await stack.close()
    rows = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(r["path"], r["status"], r.get("note")) for r in rows] == [
        ("/", 200, None),
        ("/sse", None, "response cut short"),
    ]
