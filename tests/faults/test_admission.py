"""Admission control: past each limit a clear 429 with a JSON body and Retry-After, counted in the
metrics, and the traffic within the limits unaffected (issue 10)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.e2e.conftest import Stack, raw_request

pytestmark = pytest.mark.anyio


@pytest.fixture
async def strict() -> AsyncIterator[Stack]:
    stack = await Stack(
        miss_rate=0.5, miss_burst=5, stream_rate=0.5, stream_burst=8, admin_rate=0.5,
        admin_burst=30,
    ).start()  # fmt: skip
    try:
        yield stack
    finally:
        await stack.close()


def _status_and_headers(answer: bytes) -> tuple[int, bytes]:
    head = answer.split(b"\r\n\r\n", 1)[0]
    return int(head.split(b" ", 2)[1]), head.lower()


async def test_token_guessing_gets_429_after_the_burst_and_real_urls_still_work(
    strict: Stack,
) -> None:
    origin = await strict.origin()
    await strict.agent("sb1")
    url = (await strict.expose("sb1", origin.port))["exposedAt"]
    host = strict.host_of(url)
    guess = host.replace("-sb1-", "-sb1-x", 1).encode()
    statuses = []
    for _ in range(8):
        answer = await raw_request(
            strict.edge.public_port, b"GET / HTTP/1.1\r\nHost: " + guess + b"\r\n\r\n"
        )
        status, head = _status_and_headers(answer)
        statuses.append(status)
    assert statuses[:5] == [404] * 5 and set(statuses[5:]) == {429}
    assert b"retry-after: 1" in head and b'"code":"TOO_MANY_MISSES"' in answer
    async with strict.client(url) as client:  # the real URL is not slowed down
        assert (await client.get("/")).status_code == 200
    metrics = (await strict.admin.get("/metrics")).text
    assert 'tunneld_public_refusals_total{code="TOO_MANY_MISSES"} 3.0' in metrics


async def test_new_connections_per_sandbox_are_bounded(strict: Stack) -> None:
    origin = await strict.origin()
    await strict.agent("sb1")
    host = strict.host_of((await strict.expose("sb1", origin.port))["exposedAt"]).encode()
    statuses = []
    for _ in range(12):  # a new connection (a new stream) each
        answer = await raw_request(
            strict.edge.public_port,
            b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n",
        )
        statuses.append(_status_and_headers(answer)[0])
    assert statuses.count(200) <= 9 and statuses[-1] == 429, statuses
    assert b"TOO_MANY_STREAMS" in answer and b"retry-after: 1" in answer.lower()


async def test_admin_requests_are_bounded_but_probes_are_not(strict: Stack) -> None:
    codes = [(await strict.admin.get("/v1/sandboxes")).status_code for _ in range(40)]
    assert codes[:25].count(200) == 25 and codes[-1] == 429
    r = await strict.admin.get("/v1/sandboxes")
    assert r.status_code == 429 and r.json()["code"] == "RATE_LIMITED"
    assert r.headers["retry-after"] == "1"
    for _ in range(20):
        assert (await strict.admin.get("/healthz")).status_code == 200
        assert (await strict.admin.get("/readyz")).status_code == 200
