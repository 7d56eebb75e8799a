"""docs/operations.md, Limits and the configuration table: the admission limits are per tenant.

What tests/faults/test_admission.py does not check: that each budget is the one the doc names,
so that one sandbox or one client address spending its own cannot refuse anyone else's:

- `stream_rate` / `stream_burst`: "new public connections per second **per sandbox session**";
  past it 429 `TOO_MANY_STREAMS` (JSON, `Retry-After: 1`), counted in
  `tunneld_public_refusals_total{code}` ("Every refusal of the public side is counted");
- `miss_rate` / `miss_burst`: "preview 404s (**wrong token, unknown host**) per second **per
  client IP**", "requests that find their URL are never counted";
- `max_connections_per_ip`: "public connections per client IP", and a connection that ends
  gives its place back, whatever it ended with (a leak would lock an address out for good).

Several client addresses come from binding the client socket to 127.0.0.x before connecting
(Linux routes all of 127/8 to lo). Rates are tiny (one token a minute or less), so no budget
refills while a test runs: nothing here depends on timing.
"""

from __future__ import annotations

import asyncio
import re

import httpx
import orjson
import pytest

from tests.e2e.conftest import Stack, wait_until
from tests.e2e.test_public_tcp import HashService, expose_tcp, port_range

pytestmark = pytest.mark.anyio

SLOW = 0.001  # tokens per second: none comes back during a test


async def _request(port: int, host: bytes, source: str = "127.0.0.1", path: bytes = b"/") -> bytes:
    """One request on a new connection from ``source``; the whole answer (until close)."""
    reader, writer = await _connect(port, source)
    try:
        writer.write(b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (path, host))
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def _connect(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        return await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), 10
        )
    except OSError:  # pragma: no cover - a kernel without 127/8 on lo
        pytest.skip(f"{source} is not a local address here")


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def _error(answer: bytes) -> tuple[int, dict[str, str], dict[str, str]]:
    """(status, headers, JSON body) of an edge error page."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return _status(answer), headers, orjson.loads(body)


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_one_sandbox_past_its_stream_budget_does_not_refuse_another() -> None:
    """sb1 spends its burst of 3 new connections: its 4th is 429 TOO_MANY_STREAMS with the
    documented JSON and Retry-After, counted once; sb2, on the same edge, from the same client,
    still gets its own 3 (and then its own 429)."""
    stack = await Stack(stream_rate=SLOW, stream_burst=3).start()
    try:
        assert stack.edge is not None
        port = stack.edge.public_port
        origin = await stack.origin()
        host1 = await stack.preview_host(origin.port, "sb1")
        host2 = await stack.preview_host(origin.port, "sb2")
        assert [_status(await _request(port, host1)) for _ in range(3)] == [200] * 3
        status, headers, body = _error(await _request(port, host1))
        assert status == 429 and body["code"] == "TOO_MANY_STREAMS", body
        assert headers["retry-after"] == "1" and headers["content-type"] == "application/json"
        assert headers["connection"] == "close" and "sb1" in body["error"]
        # another tenant: untouched by sb1's budget
        assert [_status(await _request(port, host2)) for _ in range(3)] == [200] * 3
        assert _error(await _request(port, host2))[2]["code"] == "TOO_MANY_STREAMS"
        metrics = (await stack.admin.get("/metrics")).text
        assert _metric(metrics, 'tunneld_public_refusals_total{code="TOO_MANY_STREAMS"}') == 2
    finally:
        await stack.close()


async def test_the_404_budget_is_per_client_ip_counts_unknown_hosts_and_never_hits() -> None:
    """miss_burst = 3. 127.0.0.2 spends it on two wrong tokens and an unknown host, then gets
    429 TOO_MANY_MISSES (JSON, Retry-After: 1, counted). 127.0.0.3, meanwhile, gets its own
    three 404s; 127.0.0.4 first finds its URL ten times (more than the burst), and still has
    all three 404s: hits are never counted. And 127.0.0.2 is refused only its misses: its real
    URL still answers."""
    stack = await Stack(miss_rate=SLOW, miss_burst=3).start()
    try:
        assert stack.edge is not None
        port = stack.edge.public_port
        origin = await stack.origin()
        host = await stack.preview_host(origin.port, "sb1")
        wrong = host.replace(b"-sb1-", b"-sb1-x", 1)
        unknown = b"nothing-here.localhost"
        answers = [await _request(port, h, "127.0.0.2") for h in (wrong, unknown, wrong)]
        codes = [_error(a)[2]["code"] for a in answers]
        assert codes == ["INVALID_TOKEN", "UNKNOWN_HOST", "INVALID_TOKEN"], codes
        status, headers, body = _error(await _request(port, unknown, "127.0.0.2"))
        assert (status, body["code"], headers["retry-after"]) == (429, "TOO_MANY_MISSES", "1")
        assert "127.0.0.2" in body["error"]
        assert _status(await _request(port, host, "127.0.0.2")) == 200  # a hit: never refused
        # another client address: a budget of its own
        assert [_status(await _request(port, wrong, "127.0.0.3")) for _ in range(3)] == [404] * 3
        assert _status(await _request(port, wrong, "127.0.0.3")) == 429
        # hits first, more of them than the burst: none of them is counted
        assert [_status(await _request(port, host, "127.0.0.4")) for _ in range(10)] == [200] * 10
        assert [_status(await _request(port, wrong, "127.0.0.4")) for _ in range(3)] == [404] * 3
        assert _status(await _request(port, wrong, "127.0.0.4")) == 429
        metrics = (await stack.admin.get("/metrics")).text
        assert _metric(metrics, 'tunneld_public_refusals_total{code="TOO_MANY_MISSES"}') == 3
    finally:
        await stack.close()


async def test_a_client_ip_at_its_connection_limit_does_not_refuse_another_and_gets_it_back(
) -> None:  # fmt: skip
    """max_connections_per_ip = 2. Connections of every kind come and go from 127.0.0.2 (a
    preview answered, a wrong token, a malformed head, one closed before a byte, one refused
    past the limit), then it holds 2 idle ones: its 3rd is 503 TOO_MANY_CONNECTIONS, while
    127.0.0.3 is served. Once it lets one go it may open one again, and once it lets both go
    its count is gone: none of the ended connections kept a place."""
    stack = await Stack(max_connections_per_ip=2).start()
    held: list[asyncio.StreamWriter] = []
    try:
        edge = stack.edge
        assert edge is not None
        port = edge.public_port
        origin = await stack.origin()
        host = await stack.preview_host(origin.port, "sb1")
        per_ip = edge.public_limits.per_ip
        src = "127.0.0.2"
        for _ in range(3):  # more ended connections than the limit, of each kind
            assert _status(await _request(port, host, src)) == 200
            wrong = host.replace(b"-sb1-", b"-sb1-x", 1)
            assert _status(await _request(port, wrong, src)) == 404
            reader, writer = await _connect(port, src)
            writer.write(b"GET / HTTP/1.1\r\nHost: \x00\r\n\r\n")
            assert _status(await asyncio.wait_for(reader.read(), 10)) == 400
            writer.close()
            _, writer = await _connect(port, src)
            writer.close()  # not a byte sent
        await wait_until(lambda: src not in per_ip, 5, "127.0.0.2's connections to be released")
        for _ in range(2):
            held.append((await _connect(port, src))[1])
        await wait_until(lambda: per_ip.get(src) == 2, 5, "two held connections")
        status, _, body = _error(await _request(port, host, src))
        assert (status, body["code"]) == (503, "TOO_MANY_CONNECTIONS")
        assert _status(await _request(port, host, "127.0.0.3")) == 200  # another address
        held.pop().close()
        await wait_until(lambda: per_ip.get(src) == 1, 5, "the place given back")
        assert _status(await _request(port, host, src)) == 200
        held.pop().close()
        await wait_until(lambda: src not in per_ip, 5, "every place given back")
        for _ in range(2):
            held.append((await _connect(port, src))[1])
        await wait_until(lambda: per_ip.get(src) == 2, 5, "two held connections again")
        assert _error(await _request(port, host, src))[2]["code"] == "TOO_MANY_CONNECTIONS"
        metrics = (await stack.admin.get("/metrics")).text
        assert _metric(metrics, 'tunneld_public_refusals_total{code="TOO_MANY_CONNECTIONS"}') == 2
    finally:
        for writer in held:
            writer.close()
        await stack.close()


async def test_raw_tcp_and_http_connections_share_one_table_and_one_stream_budget() -> None:
    """Public TCP ports, "Limits are the public listener's: a raw connection counts towards
    `max_connections` and `max_connections_per_ip` (one table with HTTP connections), takes
    from the sandbox's `stream_rate`": an address holding one HTTP and one raw connection is at
    max_connections_per_ip = 2 for both kinds; sb1's stream_burst = 4 spent by raw connections
    and HTTP requests together refuses both kinds (a raw one with a reset: no page to send)."""
    stack = await Stack(
        public_tcp_ports=port_range(4), max_connections_per_ip=2, stream_rate=SLOW, stream_burst=4
    ).start()
    service = await HashService(b"ok").start()
    held: list[asyncio.StreamWriter] = []
    try:
        edge = stack.edge
        assert edge is not None
        origin = await stack.origin()
        host = await stack.preview_host(origin.port, "sb1")
        raw_port = await expose_tcp(stack, "sb1", service.port)
        per_ip = edge.public_limits.per_ip

        async def refused_raw(source: str) -> None:
            reader, writer = await _connect(raw_port, source)
            try:
                with pytest.raises(ConnectionResetError):
                    await asyncio.wait_for(reader.read(), 10)
            finally:
                writer.close()

        held.append((await _connect(edge.public_port, "127.0.0.2"))[1])  # HTTP, idle
        held.append((await _connect(raw_port, "127.0.0.2"))[1])  # raw: sb1's 1st stream
        await wait_until(lambda: len(service.peers) == 1, 5, "the raw connection through")
        await wait_until(lambda: per_ip.get("127.0.0.2") == 2, 5, "two connections counted")
        await refused_raw("127.0.0.2")
        status, _, body = _error(await _request(edge.public_port, host, "127.0.0.2"))
        assert (status, body["code"]) == (503, "TOO_MANY_CONNECTIONS")
        # sb1's stream budget: the raw one above, two HTTP requests, one more raw: 4
        assert [_status(await _request(edge.public_port, host, "127.0.0.3")) for _ in range(2)] == [
            200,
            200,
        ]
        held.append((await _connect(raw_port, "127.0.0.4"))[1])
        await wait_until(lambda: len(service.peers) == 2, 5, "the second raw connection through")
        assert _error(await _request(edge.public_port, host, "127.0.0.3"))[2]["code"] == (
            "TOO_MANY_STREAMS"
        )
        await refused_raw("127.0.0.3")
        assert len(service.peers) == 2  # no refused connection reached the sandbox
        metrics = (await stack.admin.get("/metrics")).text
        assert _metric(metrics, 'tunneld_public_refusals_total{code="TOO_MANY_CONNECTIONS"}') == 2
        assert _metric(metrics, 'tunneld_public_refusals_total{code="TOO_MANY_STREAMS"}') == 2
    finally:
        for writer in held:
            writer.close()
        await service.close()
        await stack.close()


async def test_the_admin_budgets_with_and_without_the_token_are_apart_and_of_one_size() -> None:
    """`admin_rate` / `admin_burst`: "requests without the admin token are counted apart, with a
    budget of the same size": admin_burst = 5 gives 5 answers without the token (401), then 429
    RATE_LIMITED (Retry-After: 1); the token holder still has all 5 of its own, then 429."""
    stack = await Stack(admin_rate=SLOW, admin_burst=5).start()
    try:
        assert stack.admin is not None and stack.edge is not None
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{stack.edge.admin_port}", timeout=10
        ) as anon:
            codes = [(await anon.get("/v1/sandboxes")).status_code for _ in range(7)]
            assert codes == [401] * 5 + [429] * 2, codes
            r = await anon.get("/v1/sandboxes")
            assert r.json()["code"] == "RATE_LIMITED" and r.headers["retry-after"] == "1"
        codes = [(await stack.admin.get("/v1/sandboxes")).status_code for _ in range(7)]
        assert codes == [200] * 5 + [429] * 2, codes
    finally:
        await stack.close()
