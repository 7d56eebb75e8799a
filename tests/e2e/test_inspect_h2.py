"""Request inspection of HTTP/2 requests (tunneld/inspect.py over tunneld/h2public.py).

Each h2 stream is an ``H2Stream``, a public connection fed an HTTP/1.1 request built from the
pseudo-headers, so an inspected sandbox or exposure records its h2 requests as it records
HTTP/1.1 ones: what the service saw, the status, the sizes, the timings, and ``httpVersion``
"2" (what the client spoke). Real clients: httpx with ``http2=True`` over TLS to the HTTPS
listener (the TLS stack of tests/e2e/test_http2.py).
"""

from __future__ import annotations

import hashlib
import os

import pytest
import trustme

from . import test_http2
from .conftest import Stack, wait_until
from .origin import pattern_sha256
from .test_http2 import exposed_origin, h2_client
from .test_public_tls import TOKEN, host_of

pytestmark = pytest.mark.anyio

# The TLS stack and its CA, as tests/e2e/test_http2.py makes them (its fixtures, reused).
ca = test_http2.ca
stack = test_http2.stack


async def _records(stack: Stack) -> list[dict]:
    assert stack.admin is not None
    r = await stack.admin.get("/v1/sandboxes/sb1/requests")
    assert r.status_code == 200, r.text
    return r.json()["requests"]


async def _record(stack: Stack, rid: int) -> dict:
    assert stack.admin is not None
    r = await stack.admin.get(f"/v1/sandboxes/sb1/requests/{rid}")
    assert r.status_code == 200, r.text
    return r.json()


def _ring_size(stack: Stack) -> int:
    assert stack.edge is not None
    ring = stack.edge.inspector.ring("sb1")
    return 0 if ring is None else len(ring.records)


async def test_h2_requests_are_recorded_only_when_inspection_is_on(
    stack: Stack, ca: trustme.CA
) -> None:
    url, _ = await exposed_origin(stack)
    assert stack.admin is not None
    async with h2_client(stack, ca, url) as client:
        r = await client.get("/")
        assert r.http_version == "HTTP/2" and r.status_code == 200
    assert await _records(stack) == []  # off: nothing recorded

    r = await stack.admin.put("/v1/sandboxes/sb1/inspect")
    assert r.status_code == 200 and r.json()["inspect"] is True
    body = os.urandom(40_000)
    async with h2_client(stack, ca, url) as client:
        got = await client.get("/headers?x=1", headers={"x-trace": "abc"})
        up = await client.post("/upload", content=body)
        down = await client.get("/bytes", params={"n": 300_000, "seed": 2})
        missing = await client.get("/nothing-here")
    for response in (got, up, down, missing):
        assert response.http_version == "HTTP/2"
    assert up.json()["sha256"] == hashlib.sha256(body).hexdigest()  # relayed whole
    assert hashlib.sha256(down.content).hexdigest() == pattern_sha256(300_000, 2)
    assert missing.status_code == 404
    await wait_until(lambda: _ring_size(stack) == 4, 5, "four records")

    rows = await _records(stack)
    assert [(x["method"], x["target"], x["status"]) for x in rows] == [
        ("GET", "/headers?x=1", 200),
        ("POST", "/upload", 200),
        ("GET", "/bytes?n=300000&seed=2", 200),
        ("GET", "/nothing-here", 404),
    ]
    for row in rows:
        assert row["state"] == "complete" and row["sandbox"] == "sb1"
        assert 0 <= row["ttfbMs"] <= row["durationMs"] < 30_000
    headers_row, upload_row, bytes_row, missing_row = rows
    assert headers_row["responseBytes"] == len(got.content)
    assert upload_row["requestBytes"] == len(body)
    assert upload_row["responseBytes"] == len(up.content)
    assert bytes_row["responseBytes"] == 300_000
    assert missing_row["responseBytes"] == len(b"not found")

    full = await _record(stack, headers_row["id"])
    assert full["request"]["httpVersion"] == "2"  # what the client spoke, not the relay's 1.1
    recorded = full["request"]["headers"]
    # the HTTP/1.1 head built from the stream's pseudo-headers: :authority as Host first
    name, authority = recorded[0]
    assert name == "host" and authority.partition(":")[0] == host_of(url).partition(":")[0]
    assert ["x-trace", "abc"] in recorded and ["connection", "close"] in recorded
    # the headers as the service saw them: the service echoes what it got
    seen = dict(got.json())
    assert seen["x-trace"] == "abc"
    assert seen["x-request-id"] == headers_row["requestId"] == got.headers["x-request-id"]
    assert full["response"]["status"] == 200
    assert full["response"]["body"] == got.text
    upload = await _record(stack, upload_row["id"])
    assert upload["request"]["httpVersion"] == "2"
    assert upload["request"]["bodySize"] == len(body)

    # off again: new h2 requests are not recorded
    r = await stack.admin.delete("/v1/sandboxes/sb1/inspect")
    assert r.status_code == 200 and r.json()["inspect"] is False
    async with h2_client(stack, ca, url) as client:
        assert (await client.get("/")).status_code == 200
    assert [x["id"] for x in await _records(stack)] == [x["id"] for x in rows]


async def test_h2_requests_of_an_inspected_exposure_only(stack: Stack, ca: trustme.CA) -> None:
    """``inspect: true`` on one exposure: its h2 requests are recorded, another port's not."""
    url, _ = await exposed_origin(stack)  # not inspected
    inspected_origin = await stack.origin()
    inspected = (
        await stack.expose("sb1", inspected_origin.port, token="othertoken", inspect=True)
    )["exposedAt"]
    async with h2_client(stack, ca, url) as client:
        assert (await client.get("/?plain")).status_code == 200
    async with h2_client(stack, ca, inspected) as client:
        r = await client.get("/?inspected")
        assert r.http_version == "HTTP/2" and r.status_code == 200
    await wait_until(lambda: _ring_size(stack) == 1, 5, "a record")
    (row,) = await _records(stack)
    assert (row["target"], row["port"], row["status"]) == (
        "/?inspected",
        inspected_origin.port,
        200,
    )
    assert row["responseBytes"] == len(b"hello from origin")
    assert (await _record(stack, row["id"]))["request"]["httpVersion"] == "2"
    assert TOKEN not in row["target"]
