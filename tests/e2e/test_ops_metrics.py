"""docs/operations.md, Metrics (names and meanings in docs/admin-api.md#metrics): the series
an operator reads in an incident move when the doc says they do, and no series carries a
sandbox, path or client label ("unbounded cardinality").

tests/e2e/test_doc_claims_operations.py checks that every name is served with its kind;
tests/e2e/test_admin.py counts refusals, open connections, store writes and session lifetimes.
Here: connections accepted, agent sessions authenticated, streams open, agents connected and
exposures, each before, during and after the traffic that moves it, and every label of every
sample after traffic that names a sandbox, a token, a path and a client address.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from tunneld.store import DB_FILE, SqliteStore

from .conftest import Stack, raw_request, wait_until

pytestmark = pytest.mark.anyio

SAMPLE = re.compile(r"^(\w+)(?:\{([^}]*)\})? (\S+)$")
ERROR_CODE = re.compile(r"[A-Z][A-Z_]*")


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, line
        name, labels, value = match.groups()
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', labels or ""))
        samples.append((name, pairs, float(value)))
    return samples


def _value(text: str, name: str) -> float:
    found = [v for n, labels, v in _samples(text) if n == name and not labels]
    assert len(found) == 1, (name, found)
    return found[0]


async def _metrics(stack: Stack) -> str:
    r = await stack.admin.get("/metrics")
    assert r.status_code == 200, r.text
    return r.text


async def test_the_incident_series_move_when_the_doc_says() -> None:
    stack = await Stack().start()
    opened: list[asyncio.StreamWriter] = []
    try:
        edge = stack.edge
        assert edge is not None
        before = await _metrics(stack)
        assert _value(before, "tunneld_agents_connected") == 0
        assert _value(before, "tunneld_streams_open") == 0
        origin = await stack.origin()
        agent1 = await stack.agent("sb1")
        await stack.agent("sb2")
        host = await stack.preview_host(origin.port, "sb3")  # a third agent, one exposure
        await stack.expose("sb1", origin.port)
        text = await _metrics(stack)
        # "agent sessions authenticated", "sandboxes with a live agent session", "exposed ports"
        assert _value(text, "tunneld_agent_sessions_total") == 3
        assert _value(text, "tunneld_agents_connected") == 3
        assert _value(text, "tunneld_exposures") == 2
        # "client connections accepted on the public listener": one per connection, whatever
        # became of it (answered, refused, silent)
        accepted = _value(text, "tunneld_public_connections_total")
        for _ in range(3):
            answer = await raw_request(
                edge.public_port,
                b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n",
            )
            assert answer.startswith(b"HTTP/1.1 200 ")
        assert (await raw_request(edge.public_port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))[
            9:12
        ] == (b"404")
        _, silent = await asyncio.open_connection("127.0.0.1", edge.public_port)
        opened.append(silent)
        await wait_until(lambda: len(edge.public_connections) == 1, 5, "the silent connection")
        text = await _metrics(stack)
        assert _value(text, "tunneld_public_connections_total") == accepted + 5
        silent.close()
        # "streams open across all sessions": a response the service holds open is one
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.public_port)
        opened.append(writer)
        writer.write(b"GET /sse HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert _value(await _metrics(stack), "tunneld_streams_open") == 1
        origin.sse_release.set()
        writer.close()
        for _ in range(200):  # the stream ends once the service and the client are done
            if _value(await _metrics(stack), "tunneld_streams_open") == 0:
                break
            await asyncio.sleep(0.02)
        assert _value(await _metrics(stack), "tunneld_streams_open") == 0
        # an unexpose and an agent gone are seen at the next scrape
        r = await stack.admin.delete(f"/v1/sandboxes/sb1/ports/{origin.port}")
        assert r.is_success, r.text
        await agent1.stop()
        await wait_until(
            lambda: getattr(edge.registry.get("sb1"), "session", None) is None, 5, "sb1 gone"
        )
        text = await _metrics(stack)
        assert _value(text, "tunneld_exposures") == 1
        assert _value(text, "tunneld_agents_connected") == 2
        assert _value(text, "tunneld_agent_sessions_total") == 3  # a counter: never goes down
    finally:
        for opened_writer in opened:
            opened_writer.close()
        await stack.close()


async def test_no_series_carries_a_sandbox_path_token_or_client_label() -> None:
    """Traffic of sandbox `cardinalsb7`, with a custom token, to a distinctive path, from
    127.0.0.5, with the access log on (so the tunneld_http_* series move), with 200s, 404s
    (wrong token, unknown host) and a 503 (a sandbox not connected). Then: every label of every
    sample is `code` (an error code), `status` (a class) or `le` (a bucket), and none of the
    request's names appears anywhere in /metrics."""
    stack = await Stack(access_log=True).start()
    try:
        edge = stack.edge
        assert edge is not None
        origin = await stack.origin()
        host = await stack.preview_host(origin.port, "cardinalsb7", token="tok9marker")
        offline = stack.host_of((await stack.expose("offlinesb8", 8123))["exposedAt"]).encode()
        wrong = host.replace(b"tok9marker", b"tok9wrong", 1)
        for h, path in [
            (host, b"/pathmarker42?q=1"),
            (host, b"/"),
            (wrong, b"/pathmarker42"),
            (b"unknown-host-marker.example", b"/"),
            (offline, b"/pathmarker42"),
        ]:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", edge.public_port, local_addr=("127.0.0.5", 0)),
                10,
            )
            writer.write(b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (path, h))
            assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 ")
            writer.close()
        text = await _metrics(stack)
        samples = _samples(text)
        codes = {labels["code"] for _, labels, _ in samples if "code" in labels}
        assert {"INVALID_TOKEN", "UNKNOWN_HOST", "SANDBOX_NOT_CONNECTED"} <= codes, codes
        for name, labels, _ in samples:
            assert set(labels) <= {"code", "status", "le"}, (name, labels)
            if "code" in labels:
                assert ERROR_CODE.fullmatch(labels["code"]), (name, labels)
            if "status" in labels:
                assert labels["status"] in {"1xx", "2xx", "3xx", "4xx", "5xx", "none"}, labels
        assert any(n == "tunneld_http_requests_total" and v > 0 for n, _, v in samples)
        for marker in ("cardinalsb7", "offlinesb8", "tok9", "pathmarker", "127.0.0.5", "marker"):
            assert marker not in text, marker
    finally:
        await stack.close()


async def test_a_failed_store_write_counts_in_store_write_failures(tmp_path: Path) -> None:
    """ "Alert on a rising ... `tunneld_store_write_failures_total`": the sqlite database
    deleted under a running edge makes the next expose 503 STORE_UNAVAILABLE, and the counter
    (and the write-latency histogram, which observes failures too) moves by one; a write that
    succeeds moves only the histogram."""
    stack = Stack()
    stack.store = SqliteStore.open(tmp_path / "state")
    await stack.start()
    try:
        await stack.expose("sb1", 8000)
        text = await _metrics(stack)
        assert _value(text, "tunneld_store_write_failures_total") == 0
        assert _value(text, "tunneld_store_write_seconds_count") == 1
        (tmp_path / "state" / DB_FILE).unlink()
        r = await stack.admin.post("/v1/sandboxes/sb1/ports", json={"port": 8001})
        assert r.status_code == 503 and r.json()["code"] == "STORE_UNAVAILABLE", r.text
        text = await _metrics(stack)
        assert _value(text, "tunneld_store_write_failures_total") == 1
        assert _value(text, "tunneld_store_write_seconds_count") == 2
    finally:
        await stack.close()
