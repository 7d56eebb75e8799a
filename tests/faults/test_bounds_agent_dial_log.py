"""Bound: the agent's "cannot connect to port" lines are rate-limited.

An exposed port whose service is down makes the agent fail one dial per tunnel stream, and any
public client of the preview URL opens as many streams as it sends requests: one log line each
would let the world write the sandbox's log at the edge's stream rate (10,000/s). The lines go
through ``Agent.dial_failures`` (relay/budget.py ``RateLimitedLog``): a burst of ``LOG_BURST``,
then one a second, the rest counted.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from relay.budget import LOG_BURST, LOG_RATE

from .conftest import Stack, raw_request

pytestmark = pytest.mark.anyio

REQUESTS = 200
CONCURRENCY = 40


def _closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_flood_of_requests_to_a_dead_service_logs_a_bounded_number_of_lines(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "tunnel.agent")
    agent = await stack.agent("sb1")
    port = _closed_port()
    url = (await stack.expose("sb1", port))["exposedAt"]
    await asyncio.wait_for(_until(lambda: port in agent.exposures), 10)
    host = stack.host_of(url).encode()
    assert stack.edge is not None
    request = b"GET / HTTP/1.1\r\nhost: " + host + b"\r\nconnection: close\r\n\r\n"

    loop = asyncio.get_running_loop()
    started = loop.time()
    answers: list[bytes] = []
    for _ in range(REQUESTS // CONCURRENCY):
        answers += await asyncio.gather(
            *(raw_request(stack.edge.public_port, request) for _ in range(CONCURRENCY))
        )
    elapsed = loop.time() - started

    # Every request really made the agent fail a dial (a 502 for each)...
    assert all(a.startswith(b"HTTP/1.1 502") for a in answers), {a[:40] for a in answers}
    assert all(b"UPSTREAM_CONNECT_FAILED" in a for a in answers)
    # ...but the agent wrote a burst and then at most one line a second, not one per request.
    lines = [r for r in caplog.records if "cannot connect to port" in r.getMessage()]
    assert len(lines) <= LOG_BURST + LOG_RATE * elapsed + 1, (len(lines), elapsed)
    assert len(lines) < REQUESTS
    assert any("not logged one by one" in r.getMessage() for r in caplog.records)


async def _until(predicate: object) -> None:
    while not predicate():  # type: ignore[operator]
        await asyncio.sleep(0.01)
